"""Hand-set schedules and the one function that normalises every accepted schedule form.

* :func:`rapid_schedule` — the hand-set RAPID default: redundancy pruning in the first block,
  importance-aware merging from the ``switch`` block on (the blocks between reduce nothing), one
  count for every reducing block set to meet a GFLOPs ratio.
* :func:`tome_schedule` / :func:`tome_for_ratio` — ToMe baselines: constant ``r``, the paper's
  decreasing schedule ``(r, -1)`` (``2r`` in the first block down to 0 in the last), or any
  ``(r, inflect)`` of ToMe's ``parse_r``.
* :func:`variant_schedule` — the other baselines at the same counts (ToFu-style, EViT-style).
* :func:`as_schedule` — accepts a :class:`Schedule`, a YAML path, a ToMe ``r``, ``(r, inflect)``,
  a list of per-layer ``r``, a list of :class:`LayerSpec` or a mapping.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from torch import nn

from .flops import ModelInfo, effective_r, schedule_macs
from .schedule import Budget, LayerSpec, Schedule, ScheduleError
from ..errors import RapidSearchError

__all__ = [
    "UnreachableBudget",
    "model_info",
    "rapid_schedule",
    "rapid_layers",
    "tome_schedule",
    "tome_fitting",
    "tome_for_ratio",
    "variant_schedule",
    "empty_schedule",
    "as_schedule",
    "make_schedule",
    "DEFAULT_PROTECT",
    "DEFAULT_SWITCH_FRACTION",
    "DEFAULT_PRUNE_BLOCKS",
    "DEFAULT_MERGED_NORM",
    "DEFAULT_SIMILARITY",
    "TOME_DECREASING",
    "tome_method",
]

#: Protected fraction of the hand-set merge layers and the first merging block as a fraction of
#: the depth, chosen on calibration images (``python benchmarks/ablate_handset.py``, README).
DEFAULT_PROTECT = 0.5
DEFAULT_SWITCH_FRACTION = 0.25
#: Leading blocks of the hand-set schedule that prune; the blocks from there to the switch reduce
#: nothing. One, chosen on calibration images (``python benchmarks/handset_structure.py``, README
#: "Levers at moderate budgets"): pruning only in the first block lowered the calibration KL at
#: 35%, 50% and 70% GFLOPs on both tiny models against pruning in every block before the switch.
DEFAULT_PRUNE_BLOCKS = 1
#: Norm of merged tokens in hand-set merge layers: ``max`` (MLERP), chosen on calibration images
#: (``python benchmarks/merged_norm.py``, README "Levers at moderate budgets").
DEFAULT_MERGED_NORM = "max"
#: What hand-set prune and merge layers compare tokens by: ``tokens`` (the residual stream),
#: chosen on calibration images (``python benchmarks/similarity.py``, README "Levers at moderate budgets").
DEFAULT_SIMILARITY = "tokens"

#: ToMe's decreasing schedule as its ``parse_r`` documents it, ``(r, -1)``: ``2r`` down to 0.
TOME_DECREASING = -1.0

ModelLike = Union[nn.Module, ModelInfo]


class UnreachableBudget(RapidSearchError, ValueError):
    """No schedule of the requested family meets the cost target."""


def model_info(model: ModelLike) -> ModelInfo:
    """:class:`ModelInfo` of a model (or pass one through)."""
    return model if isinstance(model, ModelInfo) else ModelInfo.from_model(model)


def _clamped(info: ModelInfo, layers: Sequence[LayerSpec]) -> list[LayerSpec]:
    """Store the effective count of each fixed-count layer, so the YAML says what runs."""
    out, n = [], info.num_tokens
    for layer in layers:
        r = effective_r(layer, n, info.num_prefix_tokens)
        if layer.op == "none" or (r == 0 and layer.threshold is None):
            out.append(LayerSpec())
        else:
            out.append(replace(layer, r=max(r, 1) if layer.threshold is not None else r))
        n -= r
    return out


def make_schedule(info: ModelInfo, layers: Sequence[LayerSpec], *, method: str, ratio: Optional[float] = None, **provenance: Any) -> Schedule:
    """Wrap layers into a validated :class:`Schedule` with budget and provenance filled in."""
    from .. import __version__

    for i, layer in enumerate(layers):
        if not isinstance(layer, LayerSpec):
            raise ScheduleError(f"layers[{i}] is {type(layer).__name__}, not a LayerSpec")
        layer.validate(f"layers[{i}]")
    layers = _clamped(info, layers)
    macs = schedule_macs(info, layers)
    budget = None
    if ratio is not None:
        budget = Budget(
            spec=f"{ratio * 100:g}%GFLOPs",
            kind="gflops",
            target=round(ratio * info.base_gflops, 6),
            achieved={"gflops": round(macs / 1e9, 6), "ratio": round(macs / info.base_macs, 6)},
        )
    prov = {"tool": f"rapid-search {__version__}", "method": method, **provenance}
    return Schedule(model=info.fingerprint(), layers=tuple(layers), budget=budget, provenance=prov).validate()


def empty_schedule(model: ModelLike) -> Schedule:
    """The identity schedule (no reduction)."""
    info = model_info(model)
    return make_schedule(info, [LayerSpec()] * info.depth, method="none")


def rapid_layers(
    info: ModelInfo,
    r: Sequence[int],
    *,
    switch: int,
    protect: float = DEFAULT_PROTECT,
    prune_threshold: Optional[float] = None,
    merge_threshold: Optional[float] = None,
    merged_norm: str = DEFAULT_MERGED_NORM,
    similarity: str = DEFAULT_SIMILARITY,
) -> list[LayerSpec]:
    """RAPID layers from per-block counts: prune before ``switch``, merge from ``switch`` on."""
    layers = []
    for i, ri in enumerate(r):
        if ri <= 0:
            layers.append(LayerSpec())
        elif i < switch:
            layers.append(LayerSpec("prune", int(ri), prune_threshold, similarity=similarity))
        else:
            layers.append(LayerSpec("merge", int(ri), merge_threshold, protect, merged_norm, similarity))
    return layers


def _fit_two_level(info: ModelInfo, build, target: float, max_r: int) -> list[int]:
    """Smallest constant ``r`` meeting ``target`` MACs, then ``r - 1`` on as many late blocks as fit."""
    L = info.depth
    for r in range(0, max_r + 1):
        if schedule_macs(info, build([r] * L)) <= target:
            break
    else:
        raise UnreachableBudget("unreachable")
    counts = [r] * L
    if r > 0:
        for j in range(1, L + 1):
            trial = [r] * (L - j) + [r - 1] * j
            if schedule_macs(info, build(trial)) <= target:
                counts = trial
            else:
                break
    return counts


def rapid_schedule(
    model: ModelLike,
    ratio: float,
    *,
    switch: Optional[int] = None,
    prune_blocks: Optional[int] = None,
    protect: float = DEFAULT_PROTECT,
    prune_threshold: Optional[float] = None,
    merge_threshold: Optional[float] = None,
    merged_norm: str = DEFAULT_MERGED_NORM,
    similarity: str = DEFAULT_SIMILARITY,
) -> Schedule:
    """The hand-set RAPID schedule meeting ``ratio`` of the unreduced GFLOPs.

    The first ``prune_blocks`` blocks prune redundant tokens, blocks from ``switch`` (default: a
    quarter of the depth) merge unimportant ones with the top ``protect`` fraction protected, and
    the blocks between reduce nothing. The per-block count is the smallest constant ``r`` that
    meets the ratio, lowered by one in the last blocks while the ratio still holds (so the budget
    is used, not exceeded).

    Args:
        model: A timm ViT or its :class:`ModelInfo`.
        ratio: Target fraction of the unreduced GFLOPs, in (0, 1].
        switch: First merging block.
        prune_blocks: Leading prune blocks (capped at ``switch``). Default: ``DEFAULT_PRUNE_BLOCKS``,
            or as many more, up to ``switch``, as a budget below its reach needs (``switch``: every
            block before the switch prunes, the hand-set structure before ``DEFAULT_PRUNE_BLOCKS``).
        protect: Protected fraction in merge blocks.
        prune_threshold: Similarity threshold of prune blocks (None = fixed counts).
        merge_threshold: Similarity threshold of merge blocks (None = fixed counts).
        merged_norm: Norm of merged tokens, ``max`` (MLERP) or ``mean`` (see :class:`LayerSpec`).
        similarity: What prune and merge layers compare tokens by, ``tokens`` or ``keys`` (see :class:`LayerSpec`).

    Raises:
        UnreachableBudget: Even the largest counts do not reach ``ratio``.

    Example:
        >>> import timm
        >>> from rapid_search import rapid_schedule
        >>> s = rapid_schedule(timm.create_model("test_vit"), 0.5)
        >>> s.budget.achieved["ratio"] <= 0.5
        True
    """
    info = model_info(model)
    switch = round(info.depth * DEFAULT_SWITCH_FRACTION) if switch is None else switch
    if not 0 <= switch <= info.depth:
        raise ValueError(f"switch = {switch} must be in [0, {info.depth}]")
    if prune_blocks is not None and (isinstance(prune_blocks, bool) or not isinstance(prune_blocks, int) or prune_blocks < 0):
        raise ValueError(f"prune_blocks = {prune_blocks!r} must be a whole number >= 0")
    target = _check_ratio(ratio) * info.base_macs

    def active(r: Sequence[int], pb: int) -> list[int]:  # no reduction between the prune blocks and the switch
        return [ri if i < pb or i >= switch else 0 for i, ri in enumerate(r)]

    def builder(pb: int) -> Callable[[Sequence[int]], list[LayerSpec]]:
        return lambda r: rapid_layers(info, active(r, pb), switch=switch, protect=protect, merged_norm=merged_norm, similarity=similarity)

    first = min(DEFAULT_PRUNE_BLOCKS if prune_blocks is None else prune_blocks, switch)
    for pb in range(first, switch + 1 if prune_blocks is None else first + 1):
        try:
            counts = _fit_two_level(info, builder(pb), target, info.num_tokens)
            break
        except UnreachableBudget:
            continue
    else:
        raise UnreachableBudget(
            f"{ratio:.0%} GFLOPs is below the cheapest hand-set RAPID schedule for {info.name} "
            f"({min_ratio(info, builder(pb)):.0%}) — raise the budget"
        )
    layers = rapid_layers(
        info, active(counts, pb), switch=switch, protect=protect, prune_threshold=prune_threshold, merge_threshold=merge_threshold,
        merged_norm=merged_norm, similarity=similarity,
    )
    return make_schedule(info, layers, method="rapid-hand-set", ratio=ratio, switch=switch, prune_blocks=pb, protect=protect)


def min_ratio(info: ModelInfo, build) -> float:
    """Cheapest cost (as a fraction of the unreduced model) a builder reaches with maximal counts."""
    return schedule_macs(info, build([info.num_tokens] * info.depth)) / info.base_macs


def _tome_r_list(depth: int, r: int, inflect: float) -> list[int]:
    """ToMe's ``parse_r``: per-layer counts for a base ``r`` and an inflection."""
    min_val = int(r * (1.0 - inflect))
    max_val = 2 * r - min_val
    step = (max_val - min_val) / (depth - 1) if depth > 1 else 0
    return [int(min_val + step * i) for i in range(depth)]


def tome_schedule(model: ModelLike, r: Union[int, Sequence[int]], *, inflect: float = 0.0) -> Schedule:
    """ToMe's schedule: constant ``r`` (``inflect=0``), the paper's decreasing (``inflect=-1``), any
    ``(r, inflect)`` of ToMe's ``parse_r``, or a list of per-layer ``r``."""
    info = model_info(model)
    if isinstance(r, int):
        rs = _tome_r_list(info.depth, r, inflect)
    else:
        rs = list(r) + [0] * (info.depth - len(r))
    layers = [LayerSpec("tome", ri) if ri > 0 else LayerSpec() for ri in rs]
    return make_schedule(info, layers, method="tome", r=r if isinstance(r, int) else list(r), inflect=inflect)


def tome_method(inflect: float) -> str:
    """The method name of a ToMe ``(r, inflect)`` schedule: ``tome`` (constant), ``tome-decreasing``
    (the paper's ``(r, -1)``) or ``tome-inflect-0.5`` (any other inflection)."""
    return {0.0: "tome", TOME_DECREASING: "tome-decreasing"}.get(float(inflect), f"tome-inflect{inflect:g}")


def tome_fitting(model: ModelLike, fits: Callable[[Sequence[LayerSpec]], bool], *, inflect: float = 0.0, **provenance: Any) -> Optional[Schedule]:
    """The ToMe schedule with the smallest ``r`` whose layers ``fits`` accepts (None when none does).

    Args:
        model: The model (or its :class:`ModelInfo`).
        fits: Whether a layer list meets the budget (analytic MACs, predicted latency, ...).
        inflect: ToMe's inflection: 0 constant ``r``, :data:`TOME_DECREASING` (-1) the paper's
            decreasing schedule.
        provenance: Extra provenance of the schedule.
    """
    info = model_info(model)
    for r in range(1, info.num_tokens):
        s = tome_schedule(info, r, inflect=inflect)
        if fits(s.layers):
            return make_schedule(info, s.layers, method=tome_method(inflect), r=r, inflect=inflect, **provenance)
    return None


def tome_for_ratio(model: ModelLike, ratio: float, *, inflect: float = 0.0) -> Schedule:
    """The ToMe ``(r, inflect)`` schedule with the smallest ``r`` that meets ``ratio`` of the unreduced GFLOPs."""
    info = model_info(model)
    target = _check_ratio(ratio) * info.base_macs
    s = tome_fitting(info, lambda layers: schedule_macs(info, layers) <= target, inflect=inflect, ratio=ratio)
    if s is None:
        cheapest = schedule_macs(info, tome_schedule(info, info.num_tokens, inflect=inflect)) / info.base_macs
        raise UnreachableBudget(f"{ratio:.0%} GFLOPs is below the cheapest ToMe schedule for {info.name} ({cheapest:.0%}) — raise the budget")
    return s


def variant_schedule(base: Schedule, model: ModelLike, *, kind: str) -> Schedule:
    """Baselines at the same per-block counts as ``base`` (a hand-set RAPID schedule).

    ``kind="tofu"``: prune then merge as in ``base`` (merged norms too) but without importance protection
    (``protect = 0``). ``kind="evit"``: importance-only pruning (keep the most attended tokens)
    in every reducing block.
    """
    info = model_info(model)
    layers = []
    for layer in base.layers:
        if not layer.reduces:
            layers.append(LayerSpec())
        elif kind == "tofu":
            layers.append(replace(layer, protect=0.0) if layer.op == "merge" else layer)
        elif kind == "evit":
            layers.append(LayerSpec("evit", layer.r))
        else:
            raise ValueError(f"unknown variant {kind!r} — use 'tofu' or 'evit'")
    return make_schedule(info, layers, method=kind)


def _check_ratio(ratio: float) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ValueError(f"ratio = {ratio!r} must be a fraction of the unreduced GFLOPs in (0, 1], e.g. 0.5")
    return float(ratio)


def as_schedule(obj: Any, model: ModelLike) -> Schedule:
    """Normalise every accepted schedule form into a validated :class:`Schedule` for ``model``.

    Accepted: :class:`Schedule`; a path to a YAML file (str or PathLike); ``None`` (no
    reduction); an int ``r`` (ToMe, constant); ``(r, inflect)`` (ToMe's parameterisation); a list
    of ints (ToMe per-layer ``r``); a list of :class:`LayerSpec`; a mapping as in the YAML.

    Raises:
        ScheduleError: Invalid, or made for another model.
    """
    info = model_info(model)
    if obj is None:
        schedule = empty_schedule(info)
    elif isinstance(obj, Schedule):
        schedule = obj.validate()
    elif isinstance(obj, (str, os.PathLike)):
        schedule = Schedule.load(Path(obj))
    elif isinstance(obj, bool):
        raise ScheduleError("a schedule cannot be a bool — pass a Schedule, a YAML path or a ToMe r")
    elif isinstance(obj, int):
        schedule = tome_schedule(info, obj)
    elif isinstance(obj, tuple) and len(obj) == 2 and all(isinstance(v, (int, float)) for v in obj):
        schedule = tome_schedule(info, int(obj[0]), inflect=float(obj[1]))
    elif isinstance(obj, Mapping):
        schedule = Schedule.from_dict(obj)
    elif isinstance(obj, (list, tuple)) and obj and all(isinstance(v, LayerSpec) for v in obj):
        schedule = make_schedule(info, obj, method="custom")
    elif isinstance(obj, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in obj):
        schedule = tome_schedule(info, list(obj))
    else:
        raise ScheduleError(
            f"cannot make a schedule from {type(obj).__name__} — pass a Schedule, a YAML path, a ToMe r, (r, inflect) or a list of r"
        )
    schedule.model.check(info.fingerprint())
    return schedule

