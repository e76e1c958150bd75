"""Objectives: what a phase optimizes, one unit each, split by the process boundary into a
launch-side half here (rows it reads and checks, how rows become token-store records, the metric
columns it adds) and a rank-side twin in harness/worker/objectives/ (batches from those records,
its loss and metrics, its eval). The rest of the harness asks the registry below and never
branches on a kind.

    base.py          the launch-side interface (Objective), RowProblem, DataProblem
    pretrain.py      packed next-token prediction on text
    finetune.py      next-token prediction on responses only (prompt/response, alpaca, chat rows)
    preference.py    pairs of a chosen and a rejected response: DPO, IPO, SimPO, ORPO
    chat.py          conversations rendered with a chat template, and where their loss goes
    samples.py       reading a data file's first rows to check them, counting rows
    task_metrics.py  scores of generated text (exact match, F1, BLEU, chrF, ROUGE)

Adding an objective: its kind in plan.OBJECTIVE_KINDS (with any options it takes in the plan
schema), objectives/<kind>.py and worker/objectives/<kind>.py, one line in each registry.
"""
from harness.objectives.base import DataProblem, Objective, RowProblem
from harness.objectives.finetune import FINETUNE
from harness.objectives.preference import PREFERENCE
from harness.objectives.pretrain import PRETRAIN
from harness.objectives.samples import count_rows
from harness.objectives import samples
from harness.plan import OBJECTIVE_KINDS, DataSpec

OBJECTIVES: dict[str, Objective] = {objective.kind: objective for objective in (PRETRAIN, FINETUNE, PREFERENCE)}
if set(OBJECTIVES) != set(OBJECTIVE_KINDS):
    raise ImportError(f"the objectives registered ({sorted(OBJECTIVES)}) differ from the plan's kinds ({sorted(OBJECTIVE_KINDS)})")


def file_problem(path: str, spec: DataSpec, kind: str) -> str | None:
    """What keeps a data file from being read as rows of this objective kind (plan.FileProblem)."""
    return samples.file_problem(path, spec, OBJECTIVES[kind])


__all__ = ["OBJECTIVES", "DataProblem", "Objective", "RowProblem", "count_rows", "file_problem"]
