"""Which parameters a stage trains, in which learning-rate groups: resolved on the launch side.

A stage's `trainable` selectors (plan.TrainableSpec) are matched against the model's real
parameter names and roles (harness/stages/params.py ParamTable); the result, a TrainableSet, is part of the
Stage: `harness plan` shows it, the load-mode rule compares it between stages, and the worker
builds its optimizer's parameter groups from it by name (everything else frozen). A selector
that matches nothing, a parameter in two lr_scale entries, or a stage that would train nothing
is a plan problem naming the selector and a few real names. Pure; no torch.
"""
from __future__ import annotations

import fnmatch
import hashlib
import re
from typing import Any

from harness.plan import LAYER_RANGE, RegularizationSpec, Strict, TrainableSpec, TrainSettings
from harness.records import Adapter, GroupRecord, TrainableRecord
from harness.stages.params import ParamInfo, ParamTable

NAMES_SHOWN = 16  # real parameter names listed in a "matches nothing" problem


class ParamGroup(Strict):
    """One optimizer parameter group: parameters that share an lr multiplier and weight-decay rule."""

    label: str
    """What it holds, e.g. 'layers 0-1, norms'."""
    lr_scale: float
    """Multiplier of the stage's (scheduled) learning rate: lr_scale entry x layer decay."""
    lr: float
    """Peak learning rate of the group: the plan's optimizer lr x lr_scale."""
    decay: bool
    """False: the regularization's weight decay (l2_mode weight_decay) skips these 1-D parameters."""
    params: int
    """Elements."""
    names: list[str]


class TrainableSet(Strict):
    """A stage's trainable parameters as optimizer groups, and the frozen rest."""

    spec: TrainableSpec
    groups: list[ParamGroup]
    frozen: list[str]
    trainable_params: int
    """Trained elements: what holds gradients and optimizer state (with an adapter: its matrices and modules_to_save copies)."""
    total_params: int
    """Elements of the model as it trains (with an adapter: the base plus what the adapter adds)."""
    adapter: Adapter | None = None
    """The adapter trained on the frozen base (harness/stages/adapter.py); None: the model's own parameters train."""
    added_params: int = 0
    """Elements the adapter adds (its matrices, modules_to_save copies): total_params - added_params is the base."""

    @property
    def share(self) -> float:
        return self.trainable_params / self.total_params

    def trained(self) -> str:
        """Which parameters train, whatever their groups: 'all', or a digest of their names."""
        if not self.frozen:
            return "all"
        return hashlib.sha256(",".join(sorted(n for g in self.groups for n in g.names)).encode()).hexdigest()[:16]

    def layout(self) -> str:
        """What optimizer moments depend on: which parameters train, grouped how (not the lrs).
        'all' for every parameter in one group, the default."""
        if len(self.groups) == 1 and not self.frozen:
            return "all"
        return hashlib.sha256("|".join(",".join(g.names) for g in self.groups).encode()).hexdigest()[:16]


def needs_resolving(settings: TrainSettings) -> bool:
    """Whether the stage's optimizer groups depend on parameter names: a trainable spec other than
    the default (an adapter among them), or weight decay from the regularization that skips 1-D parameters."""
    return not settings.trainable.is_default or _splits_decay(settings.regularization)


def _splits_decay(reg: RegularizationSpec) -> bool:
    return reg.l2_mode == "weight_decay" and reg.l2 > 0 and not reg.include_1d


def selected(selector: str, table: ParamTable) -> list[ParamInfo]:
    """The parameters a selector names (see plan.TrainableSpec for the forms)."""
    if selector == "all":
        return list(table.params)
    role = {"embeddings": "embedding", "head": "head", "norms": "norm"}.get(selector)
    if role is not None:
        return [p for p in table.params if role in p.roles]
    match = LAYER_RANGE.fullmatch(selector)
    if match is not None:
        layers = list(range(table.num_layers))
        if match[2]:  # a slice: layers[a:b]
            start, stop = (int(x) if x else None for x in (match[1], match[3]))
            chosen = set(layers[start:stop])
        else:  # one layer: layers[k]
            k = int(match[1])
            chosen = {layers[k]} if -len(layers) <= k < len(layers) else set()
        return [p for p in table.params if p.layer in chosen]
    if selector.startswith("re:"):
        pattern = re.compile(selector[3:])
        return [p for p in table.params if pattern.fullmatch(p.name)]
    return [p for p in table.params if fnmatch.fnmatchcase(p.name, selector)]


def resolve(settings: TrainSettings, table: ParamTable, adapter: Adapter | None = None) -> tuple[TrainableSet | None, list[tuple[str, Any, str]]]:
    """The stage's trainable set, or None and its problems as (field under the stage's block, value,
    allowed). With an adapter, `table` is the model's with the adapter applied: what the adapter
    added trains (the plan's train and freeze keep their defaults), lr_scale and layer_decay group it."""
    spec = settings.trainable
    problems = []

    def pick(field: str, selector: str) -> list[ParamInfo]:
        found = selected(selector, table)
        if not found:
            problems.append((field, selector, f"a selector that matches parameters of this model ({_some_names(table)})"))
        return found

    if adapter is not None:
        trained = {p.name for p in table.params if p.adapter}
    else:
        trained = {p.name for k, s in enumerate(spec.train) for p in pick(f"trainable.train[{k}]", s)}
        trained -= {p.name for k, s in enumerate(spec.freeze) for p in pick(f"trainable.freeze[{k}]", s)}
    scale_of: dict[str, tuple[str, float]] = {}
    for selector, scale in spec.lr_scale.items():
        found = pick(f"trainable.lr_scale.{selector}", selector)
        if found and not trained & {p.name for p in found}:
            problems.append((f"trainable.lr_scale.{selector}", scale, "a selector of trained parameters (it matches only frozen ones)"))
        overlaps = {scale_of[p.name][0]: p.name for p in reversed(found) if p.name in scale_of}  # the first shared name per entry
        problems += [(f"trainable.lr_scale.{selector}", scale, f"selectors that do not overlap: {name} is in '{other}' too "
                      "(give each parameter one multiplier)") for other, name in overlaps.items()]
        for p in found:
            scale_of.setdefault(p.name, (selector, scale))
    if not trained and not problems:
        problems.append(("trainable", spec.model_dump(), f"at least one trained parameter (train minus freeze leaves none; {_some_names(table)})"))
    if problems:
        return None, problems
    chosen = _grouped(settings, table, trained, {name: scale for name, (_, scale) in scale_of.items()})
    return chosen.model_copy(update={"adapter": adapter, "added_params": sum(p.numel for p in table.params if p.adapter)}), []


def _grouped(settings: TrainSettings, table: ParamTable, trained: set[str], scale_of: dict[str, float]) -> TrainableSet:
    """Trained parameters grouped by (lr multiplier, weight decay), in model order."""
    spec, split = settings.trainable, _splits_decay(settings.regularization)
    members: dict[tuple[float, bool], list[ParamInfo]] = {}
    for p in table.params:
        if p.name in trained:
            key = (scale_of.get(p.name, 1.0) * spec.layer_decay ** (table.num_layers - _depth(p, table)), not split or len(p.shape) >= 2)
            members.setdefault(key, []).append(p)
    groups = [ParamGroup(label=_label(params) + ("" if decay else " (no weight decay)"), lr_scale=scale, lr=settings.optimizer.lr * scale,
                         decay=decay, params=sum(p.numel for p in params), names=[p.name for p in params])
              for (scale, decay), params in members.items()]
    return TrainableSet(spec=spec, groups=groups, frozen=[p.name for p in table.params if p.name not in trained],
                        trainable_params=sum(g.params for g in groups), total_params=sum(p.numel for p in table.params))


def _depth(p: ParamInfo, table: ParamTable) -> int:
    """k of the layer-decay rule: decoder layer i is k = i + 1, the embeddings 0, the rest (head, final norm) L."""
    if p.layer is not None:
        return p.layer + 1
    return 0 if "embedding" in p.roles and "head" not in p.roles else table.num_layers


def _label(params: list[ParamInfo]) -> str:
    """'embeddings, layers 0-1, norms, head': what a group holds, in model order. A layer's norms
    belong to the layer when the group holds the rest of it too, else they read as norms."""
    whole = {p.layer for p in params if p.layer is not None and "norm" not in p.roles}
    parts: list[str] = []
    for p in params:
        if p.layer in whole:
            part = "layers"
        else:
            part = next((name for role, name in (("head", "head"), ("embedding", "embeddings"), ("norm", "norms")) if role in p.roles), "other")
        if part not in parts:
            parts.append(part)
    if whole:
        layers = sorted(whole)
        span = f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers[0]}-{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1)) \
            else "layers " + ",".join(map(str, layers))
        parts[parts.index("layers")] = span
    return ", ".join(parts)


def _some_names(table: ParamTable) -> str:
    """A hint of what there is to select: the names with each decoder layer's index as *."""
    names = list(dict.fromkeys(_layer_glob(p) for p in table.params))
    more = f", ... ({len(names)} in all)" if len(names) > NAMES_SHOWN else ""
    return f"{table.num_layers} decoder layers; names: {', '.join(names[:NAMES_SHOWN])}{more}"


def _layer_glob(p: ParamInfo) -> str:
    return p.name if p.layer is None else re.sub(rf"\.{p.layer}\.", ".*.", p.name, count=1)


def trainable_record(settings: TrainSettings, chosen: TrainableSet | None, total_params: int, frozen_digests: tuple[str, str]) -> TrainableRecord:
    """The manifest's record of what a stage trained (chosen: its trainable set, None for every
    parameter in one group; total_params: the model's, counted on the engine)."""
    spec = settings.trainable
    if chosen is None:
        groups = [GroupRecord(label="all", lr_scale=1.0, lr=settings.optimizer.lr, params=total_params)]
        counts = {"trainable_params": total_params, "share": 1.0, "trained": "all", "layout": "all"}
    else:
        groups = [GroupRecord(label=g.label, lr_scale=g.lr_scale, lr=g.lr, params=g.params) for g in chosen.groups]
        counts = {"trainable_params": chosen.trainable_params, "share": chosen.share, "trained": chosen.trained(), "layout": chosen.layout()}
    return TrainableRecord(train=spec.train, freeze=spec.freeze, lr_scale=spec.lr_scale, layer_decay=spec.layer_decay, total_params=total_params,
                           groups=groups, frozen_digest_start=frozen_digests[0], frozen_digest_end=frozen_digests[1],
                           adapter=chosen.adapter if chosen else None, **counts)
