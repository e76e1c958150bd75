"""The launch side's child programs (harness/jobs/), which need torch, DeepSpeed or transformers:
each is started here as `python -m harness.jobs.<name>` and its answer read back, so the launch
side never imports them itself."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

from harness.plan import ModelSpec, PlanError
from harness.records import Adapter, InvalidRecord
from harness.records.token_store import DATA_PROBLEM_EXIT, META, StoreRequest
from harness.stages.model_fit import FactsRequest, ModelFacts, facts_key
from harness.stages.params import ParamTable


def _job(name: str) -> list[str]:
    return [sys.executable, "-m", f"harness.jobs.{name}"]


def validate_with_deepspeed(configs: list[dict[str, Any]]) -> list[tuple[int, str]]:
    """DeepSpeed's own config class on each config (harness/jobs/ds_check.py): (index of the
    config, problem) pairs."""
    result = subprocess.run(
        _job("ds_check"),
        input=json.dumps(configs),
        capture_output=True,
        text=True,
        # Validation only: the CPU accelerator keeps CUDA from initialising in the child.
        env={**os.environ, "DS_ACCELERATOR": "cpu"},
    )
    if result.returncode != 0:
        raise RuntimeError(f"the DeepSpeed config check crashed:\n{result.stderr[-2000:]}")
    return [(index, problem) for index, problem in json.loads(result.stdout.strip().splitlines()[-1])]


class FactsJob:
    """The model facts of a plan (harness/jobs/model_facts.py, about as long as importing
    transformers), started at once in the background and read when first needed; answered from
    <cache_dir>/facts/ when the same facts were found before (harness/stages/model_fit.py facts_key)."""

    def __init__(self, request: FactsRequest, cache_dir: str):
        self.cached = Path(cache_dir) / "facts" / f"{facts_key(request)}.json"
        self._facts: ModelFacts | None = None
        try:
            self._facts = ModelFacts.read(self.cached)
        except InvalidRecord:
            self._process = subprocess.Popen([*_job("model_facts"), request.model_dump_json()], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                             text=True)

    def result(self) -> ModelFacts:
        if self._facts is None:
            out, err = self._process.communicate()
            if self._process.returncode != 0:
                raise RuntimeError(f"reading the model's and tokenizer's facts failed:\n{err[-2000:]}")
            self._facts = ModelFacts.model_validate_json(out.strip().splitlines()[-1])
            try:
                self.cached.parent.mkdir(parents=True, exist_ok=True)
                self._facts.write(self.cached)
            except OSError:
                pass  # found again next time
        return self._facts


def read_param_table(model: ModelSpec, adapter: Adapter | None = None) -> ParamTable:
    """The parameters of the plan's model, with the adapter applied when given one
    (harness/jobs/param_table.py; about as long as importing transformers). The model's own table
    without an adapter comes with its facts (FactsJob)."""
    request = {"model": model.model_dump(mode="json"), "adapter": adapter.model_dump(mode="json") if adapter else None}
    result = subprocess.run(_job("param_table"), input=json.dumps(request), capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"listing the model's parameters failed:\n{result.stderr[-2000:]}")
    return ParamTable.model_validate_json(result.stdout.strip().splitlines()[-1])


def convert_checkpoint(request: dict[str, Any]) -> None:
    """A checkpoint tag made loadable at another topology (harness/jobs/reshard.py)."""
    result = subprocess.run([*_job("reshard"), json.dumps(request)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"converting {request['checkpoint']} for a {request['mode']} resume failed:\n{result.stderr[-3000:]}")


def build_stores(requests: list[StoreRequest], echo: Callable[[str], None] = print, part: tuple[int, int] = (1, 1)) -> None:
    """Build every store that is not complete yet, one child process each (harness/jobs/store_builder.py,
    with its progress bar); part (I, N): only part I of N of each, joined by the part that completes it.
    A problem in the data itself becomes a PlanError naming the data set (exit 2)."""
    for request in requests:
        if (request.folder / META).is_file():
            continue
        of = f" (part {part[0]}/{part[1]})" if part[1] > 1 else ""
        echo(f"[harness] tokenizing {request.where}{of} into {request.folder}")
        command = [*_job("store_builder"), request.model_dump_json(), "--part", f"{part[0]}/{part[1]}"]
        result = subprocess.run(command, stderr=subprocess.PIPE, text=True)
        if result.returncode == DATA_PROBLEM_EXIT:
            raise PlanError([(request.where, request.data.hub or request.data.files, result.stderr.strip().splitlines()[-1])])
        if result.returncode != 0:
            raise RuntimeError(f"tokenizing {request.where} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
