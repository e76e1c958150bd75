"""Which stages share one launch: consecutive stages on the same nodes swap the engine in the
running ranks instead of a relaunch. Pure."""
from __future__ import annotations

from harness.stages.stage import Stage

def launch_groups(stages: list[Stage], todo: set[int]) -> list[list[Stage]]:
    """The launches that run the stages numbered in `todo`, in run order. With cluster.transitions
    `swap`, consecutive stages on the same nodes and ranks per node share one launch (the ranks
    swap the engine in place); a topology change, a stage not to run, or `relaunch` starts a new one."""
    groups: list[list[Stage]] = []
    previous: Stage | None = None
    for stage in stages:
        if stage.index not in todo:
            previous = None
            continue
        joins = (previous is not None and stage.cluster.transitions == "swap"
                 and (stage.nodes, stage.procs_per_node) == (previous.nodes, previous.procs_per_node))
        if joins:
            groups[-1].append(stage)
        else:
            groups.append([stage])
        previous = stage
    return groups


def launch_name(group: list[Stage]) -> str:
    """"stage 03 'sft'", or "stages 03-06 ('ms.c1.s1-sgd' .. 'ms.c1.s4-adamw') in one launch": what a launch runs."""
    first, last = group[0], group[-1]
    if first is last:
        return f"stage {first.index:02d} '{first.name}'"
    return f"stages {first.index:02d}-{last.index:02d} ('{first.name}' .. '{last.name}') in one launch"
