"""How a stage takes over from the previous one: full state or weights only.

Decided on the launch side before anything runs, as a pure function of (previous stage, this
stage); `harness plan` shows it, stage.json carries it, the worker carries it out and checks that
the previous stage's manifest says what the decision saw (harness/worker/handoff.py).

full_state (the previous DeepSpeed checkpoint, optimizer moments included, a fresh scheduler)
needs the same optimizer type, ZeRO family (native checkpoints do not load across ZeRO-1/2 <-> 3,
DeepSpeed 0.19.8), world size (a native load into another world size raises), precision and
offload, and the same trainable layout: optimizer state exists only for trained parameters, in
one flat partition per lr group, so it carries only when the same parameters train in the same
groups (their lrs may differ: they come from this stage). Anything else: weights_only, the
previous stage's Hugging Face model and a fresh optimizer.
"""
from __future__ import annotations

from harness.records import HandoffSide, Manifest, StartDecision
from harness.resume import zero_family
from harness.stages import Stage


def side_of_stage(stage: Stage) -> HandoffSide:
    """A stage as the plan resolves it."""
    s, chosen = stage.settings, stage.trainable
    return HandoffSide(optimizer=stage.optimizer_type, zero_stage=s.zero_stage, world_size=stage.world_size, dtype=stage.precision,
                       offload=s.offload, trained=chosen.trained() if chosen else "all", trainable=chosen.layout() if chosen else "all",
                       trainable_params=chosen.trainable_params if chosen and chosen.frozen else None)


def side_of_manifest(manifest: Manifest) -> HandoffSide:
    """A finished stage as its manifest records it (what ran, even if the plan changed since)."""
    record = manifest.trainable
    partial = record is not None and record.share < 1
    return HandoffSide(optimizer=manifest.optimizer, zero_stage=manifest.zero_stage, world_size=manifest.world_size, dtype=manifest.dtype,
                       offload=manifest.offload, trained=record.trained if record else "all", trainable=record.layout if record else "all",
                       trainable_params=record.trainable_params if partial else None)


def start_decision(previous: HandoffSide | None, stage: HandoffSide) -> StartDecision:
    """init for the first stage; full_state when nothing that optimizer moments depend on changed;
    else weights_only, with the first thing that changed as the reason."""
    if previous is None:
        return StartDecision(mode="init", reason="first stage: weights from the plan's model")
    blocker = _full_state_blocker(previous, stage)
    if blocker is None:
        return StartDecision(mode="full_state", previous=previous,
                             reason=f"same optimizer ({stage.optimizer}), ZeRO family, world size, precision, offload and trainable set: "
                                    "optimizer moments carried, fresh scheduler")
    return StartDecision(mode="weights_only", reason=f"{blocker}: weights only, fresh optimizer state", previous=previous)


def _full_state_blocker(before: HandoffSide, now: HandoffSide) -> str | None:
    wanted = {
        "optimizer": (before.optimizer, now.optimizer),
        "ZeRO family": (zero_family(before.zero_stage), zero_family(now.zero_stage)),
        "world size": (before.world_size, now.world_size),
        "precision": (before.dtype, now.dtype),
        "offload": (before.offload.model_dump(), now.offload.model_dump()),
    }
    for what, (old, new) in wanted.items():
        if old != new:
            return f"{what} changed ({old} -> {new})"
    if before.trained != now.trained:
        return f"trainable set changed ({_count(before)} -> {_count(now)} parameters; moments exist only for trained ones)"
    if before.trainable != now.trainable:
        return f"trainable groups changed (the same parameters ({_count(now)}) in other lr groups; moments are kept per group)"
    return None


def _count(side: HandoffSide) -> str:
    return "all" if side.trainable_params is None else f"{side.trainable_params:,}"
