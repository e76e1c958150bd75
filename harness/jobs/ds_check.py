"""`python -m harness.jobs.ds_check` (harness/launch/jobs.py validate_with_deepspeed): runs DeepSpeed's own config
class on each config (JSON list on stdin) and prints a JSON list of [config index, problem].

DeepSpeed rejects unknown keys inside its blocks, but silently ignores unknown
TOP-LEVEL keys (0.19.8); we record which keys it reads and report the rest.
Its batch assertion assumes world size 1 outside a distributed run, so the batch
rule for the real world size is checked by `check_ds_config` and the config is
shown to DeepSpeed with train_batch_size = micro x accumulation.
"""
import json
import sys


class _ReadTracker(dict):
    """A dict that remembers which keys were read."""

    def __init__(self, data):
        super().__init__(data)
        self.read = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __contains__(self, key):
        self.read.add(key)
        return super().__contains__(key)


def problems_of(config: dict) -> list[str]:
    from deepspeed.runtime.config import DeepSpeedConfig

    shown = _ReadTracker(config)
    if isinstance(config.get("train_micro_batch_size_per_gpu"), int) and isinstance(config.get("gradient_accumulation_steps"), int):
        dict.__setitem__(shown, "train_batch_size", config["train_micro_batch_size_per_gpu"] * config["gradient_accumulation_steps"])
    try:
        DeepSpeedConfig(shown)
    except Exception as error:  # DeepSpeed raises pydantic errors, asserts and ValueErrors
        return [f"DeepSpeed rejects the config: {' '.join(str(error).split())[:400]}"]
    unknown = sorted(set(config) - shown.read)
    return [f"unknown top-level DeepSpeed key {key!r} (DeepSpeed would ignore it)" for key in unknown]


def main() -> None:
    configs = json.load(sys.stdin)
    print(json.dumps([[i, problem] for i, config in enumerate(configs) for problem in problems_of(config)]))


if __name__ == "__main__":
    main()
