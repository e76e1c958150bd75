"""Plan problems: each one a field path, the value found and what is allowed, reported all at once."""
from __future__ import annotations

from typing import Any

from pydantic import ValidationError

Problem = tuple[str, Any, str]
"""(field path, value, what is allowed)."""

class PlanError(Exception):
    """Every problem found in a plan, each as (field path, value, what is allowed). A problem found
    twice (a multistep stage is checked once per cycle) is listed once."""

    def __init__(self, problems: list[Problem]):
        self.problems = list({(path, repr(value), allowed): (path, value, allowed) for path, value, allowed in problems}.values())
        super().__init__(self.message())

    def message(self) -> str:
        lines = [f"{len(self.problems)} problem(s) in the plan:"]
        for path, value, allowed in self.problems:
            lines.append(f"  {path or '<plan>'}: {_short(value)} -> {allowed}")
        return "\n".join(lines)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."




def problems_from(error: ValidationError, prefix: str, raw: Any) -> list[Problem]:
    """The problems of a pydantic error about raw (the input it validated), their paths under prefix."""
    problems = []
    for item in error.errors():
        if _other_data_form(item["loc"], raw):
            continue
        msg = item["msg"].removeprefix("Value error, ")
        problems.append((_field_path(item["loc"], raw, prefix), item.get("input", raw), msg))
    return problems


def _field_path(loc: tuple, raw: Any, prefix: str) -> str:
    """The plan field an error location names, e.g. 'phases[0].data.files[1]'. Besides the keys and
    indexes of the input, pydantic's locations hold labels, which are dropped: the branch of a union
    ('MultistepData', "literal['alternate']", 'function-after[_one_source(), DataSpec]') and '[key]'
    for a mapping's key. A name the input lacks is a missing field when it comes last."""
    path, node = prefix, raw
    for k, part in enumerate(loc):
        if isinstance(node, list) and isinstance(part, int) and part < len(node):
            path, node = f"{path}[{part}]", node[part]
        elif isinstance(node, dict) and (part in node or k == len(loc) - 1 and str(part).isidentifier()):
            path, node = f"{path}.{part}" if path else str(part), node.get(part)
    return path


def _other_data_form(loc: tuple, raw: Any) -> bool:
    """Whether an error is about the form of data the phase's kind does not take. PhaseSpec.data is
    a union, so pydantic says what is wrong with the data both as one data set (DataSpec) and as
    multistep's pair (MultistepData); the user meant the form their phase's kind takes."""
    if len(loc) < 4 or loc[0] != "phases" or loc[2] != "data":
        return False
    meant = "MultistepData" if raw["phases"][loc[1]].get("kind") == "multistep" else "DataSpec"
    return meant not in str(loc[3])
