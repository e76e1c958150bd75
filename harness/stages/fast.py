"""The fast path of a stage, decided on the launch side: which of compilation, fused kernels and
attention kernel the worker turns on (`resolve`), and the micro batches `micro_batch: auto` may
pick from (`micro_batch_candidates`). Pure, no torch: `harness plan` shows the result, the worker
(harness/worker/fast.py, harness/worker/batch_probe.py) carries it out, and a part that fails to
initialise there is turned off with a one-line warning.
"""
from __future__ import annotations

from typing import Literal

from harness.plan import FastParts, Strict, TrainSettings

# What `fast: auto` turns on, per accelerator. Only what was measured faster and correct on that
# accelerator belongs here (bench/throughput.py --fast, bench/RESULTS.md).
# cpu: nothing. torch.compile's first step costs 33 s for tiny-llama on one of this machine's two
#   cores (inductor), more than the short CPU stages it would speed up; Liger and DeepCompile need CUDA.
# cuda: SDPA attention (flash attention 2 for packed rows, as before). compile, DeepCompile and
#   Liger stay off until bench/throughput.py has measured them on a GPU here (issue 13: figures from
#   an H100 showed engine.compile 1.4x and Liger 1.2-1.8x over eager, and the two together crashed once).
AUTO = {
    "cpu": FastParts(),
    "cuda": FastParts(),
}
OFF = FastParts(attention="sdpa")


class FastChoice(Strict):
    """What the worker turns on for one stage (stage.json), and why each part is as it is."""

    compile: Literal["off", "engine", "deepcompile"] = "off"
    """engine: DeepSpeed's engine.compile() (torch.compile, inductor); deepcompile: the same with
    "compile": {"deepcompile": true} in the DeepSpeed config."""
    liger: bool = False
    attention: Literal["sdpa", "eager", "flash", "flash-or-sdpa"] = "sdpa"
    """flash: flash attention 2, with a warning where flash-attn is missing; flash-or-sdpa: flash
    attention 2 where flash-attn is installed, else SDPA, quietly (fast: auto on packed rows)."""
    notes: list[str] = []
    """Parts asked for that this stage cannot use, each with the reason (shown by harness plan and
    printed by the worker as it starts the stage)."""

    @property
    def parts(self) -> list[str]:
        """The parts that are on, for tables: e.g. ['compile', 'liger', 'sdpa']."""
        parts = [] if self.compile == "off" else [self.compile if self.compile == "deepcompile" else "compile"]
        return parts + (["liger"] if self.liger else []) + [self.attention]


def resolve(settings: TrainSettings, accelerator: Literal["cpu", "cuda"], precision: str, packed_rows: bool, zero_stage: int) -> FastChoice:
    """The parts a stage turns on: `fast: auto` takes AUTO for the accelerator, `off` nothing but
    SDPA, a mapping the parts it names; parts this accelerator or ZeRO stage (the stage's, resolved)
    cannot run are off, with a note."""
    asked = {"auto": AUTO[accelerator], "off": OFF}.get(settings.fast, settings.fast)  # type: ignore[call-overload]
    notes = []
    compile_mode = "deepcompile" if asked.deepcompile else "engine" if asked.compile else "off"
    if compile_mode == "deepcompile" and accelerator == "cpu":
        compile_mode = "engine"
        notes.append("deepcompile: DeepSpeed runs DeepCompile on CUDA only; engine.compile() without it")
    elif compile_mode == "deepcompile" and zero_stage == 0:
        compile_mode = "engine"
        notes.append("deepcompile: it schedules ZeRO's communication and needs zero_stage >= 1; engine.compile() without it")
    liger = asked.liger
    if liger and accelerator == "cpu":
        liger = False
        notes.append("liger: its Triton kernels need a CUDA device; off on cpu")
    half = accelerator == "cuda" and precision in ("bf16", "fp16")
    attention = {"auto": "flash-or-sdpa" if half and packed_rows else "sdpa", "sdpa": "sdpa", "eager": "eager", "flash": "flash"}[asked.attention]
    if attention == "flash" and not half:
        attention = "sdpa"
        notes.append(f"attention: flash attention needs CUDA and bf16/fp16 (this stage: {accelerator}, {precision}); sdpa instead")
    return FastChoice(compile=compile_mode, liger=liger, attention=attention, notes=notes)


def micro_batch_candidates(global_batch: int, world_size: int) -> list[int]:
    """The micro batches `micro_batch: auto` may pick, smallest first: those that split a rank's
    share of the global batch into whole accumulation steps, so the global batch stays."""
    per_rank = global_batch // world_size
    return [m for m in range(1, per_rank + 1) if per_rank % m == 0]
