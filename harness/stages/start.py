"""How a stage takes over from the previous one: full state or weights only.

Decided on the launch side before anything runs, as a pure function of the engines of the two
stages (harness/records/engine.py); `harness plan` shows it, stage.json carries it, the worker
carries it out and checks that the previous stage's manifest records the engine the decision saw
(harness/worker/handoff.py).

full_state (the previous DeepSpeed checkpoint, optimizer moments included, a fresh scheduler)
needs nothing that the moments depend on to differ: the same optimizer type, ZeRO family (native
checkpoints do not load across ZeRO-1/2 <-> 3, DeepSpeed 0.19.8), world size (a native load into
another world size raises), precision and offload, and the same trainable layout: optimizer state
exists only for trained parameters, in one flat partition per lr group, so it carries only when
the same parameters train in the same groups (their lrs may differ: they come from this stage).
An adapter (peft LoRA) is part of the engine: the same adapter carries the adapters with their
moments; any change of it (none -> lora, lora -> none, another rank, targets or alpha) starts
from the previous stage's merged Hugging Face model, with a fresh adapter where there is one.
Anything else: weights_only, the previous stage's Hugging Face model and a fresh optimizer.
"""
from __future__ import annotations

from typing import Any

from harness.records import EngineIdentity, Manifest, StartDecision, differences, zero_family
from harness.records.engine import adapter_text, trained_count


def start_decision(previous: EngineIdentity | None, stage: EngineIdentity) -> StartDecision:
    """init for the first stage; full_state when nothing that optimizer moments depend on changed;
    else weights_only, with the first thing that changed as the reason."""
    if previous is None:
        return StartDecision(mode="init", reason="first stage: weights from the plan's model")
    changed = differences(previous, stage)
    changed.pop("model", None)  # a stage starts from the previous stage's model, whatever the plan names
    if not changed:
        return StartDecision(mode="full_state", previous=previous,
                             reason=f"same optimizer ({stage.optimizer}), ZeRO family, world size, precision, offload and trainable set"
                                    + (f" and adapter ({stage.adapter.describe()}): adapters," if stage.adapter else ":")
                                    + " optimizer moments carried, fresh scheduler")
    what, values = next(iter(changed.items()))
    return StartDecision(mode="weights_only", reason=f"{_changed(what, values, previous, stage)}: weights only, fresh optimizer state",
                         previous=previous)


def _changed(what: str, values: tuple[Any, Any], before: EngineIdentity, now: EngineIdentity) -> str:
    if what == "ZeRO stage":
        return f"ZeRO family changed ({zero_family(before.zero_stage)} -> {zero_family(now.zero_stage)})"
    if what == "trainable set":
        return f"trainable set changed ({trained_count(before)} -> {trained_count(now)} parameters; moments exist only for trained ones)"
    if what == "adapter":
        return f"adapter changed ({adapter_text(values[0])} -> {adapter_text(values[1])}: from the merged model)"
    if what == "trainable groups":
        return f"trainable groups changed (the same parameters ({trained_count(now)}) in other lr groups; moments are kept per group)"
    return f"{what} changed ({values[0]} -> {values[1]})"


def expected_start_digest(mode: str, previous: Manifest, precision: str) -> str | None:
    """The digest the weights of a stage that takes over from `previous` start with, which its
    worker checks them against (harness/worker/handoff.py): full_state, the saved fp32 master
    weights; weights_only at fp32 or at the handoff's dtype, what the handoff files hold. None when
    the worker rounds them to a lower precision first (it digests the rounded weights itself)."""
    if mode == "full_state":
        return previous.weights_digest
    if precision in ("fp32", previous.handoff_dtype):
        return previous.handoff_weights_digest or previous.weights_digest
    return None
