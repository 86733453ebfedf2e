"""Search spaces: a low-dimensional parameterisation of RAPID schedules, read from YAML.

A trial samples the *shape* of a schedule; its *scale* is then solved so that the schedule
meets the budget (projection onto the budget), so no calibration forward pass is spent on a
schedule that cannot meet it. Parameters (see ``rapid_search/search/spaces/default.yaml`` for the why):

``switch``         first merging block, as a fraction of the depth (rounded to a block).
``prune_weight``   per-block count in prune blocks relative to merge blocks.
``prune_span``     (optional, default 1) the fraction of the blocks before ``switch`` that prune,
                   from the first (rounded to a block); the rest, up to ``switch``, reduce nothing.
``decay``          linear slope of the counts over depth: > 0 reduces more early (like ToMe's
                   decreasing schedule), < 0 more late.
``protect``        protected fraction of important tokens in merge blocks.
``prune_threshold``/``merge_threshold``  similarity thresholds; each may be off, on, or searched.
``merged_norm``    (optional, default ``max``) norm of merged tokens: ``max`` (MLERP), ``mean``,
                   or the list ``[mean, max]`` to search it.
``similarity``     (optional, default ``tokens``) what prune and merge layers compare tokens by:
                   ``tokens`` (the residual stream), ``keys``, or ``[keys, tokens]`` to search it.

Per-block count: ``r_l = round(s * w_l)`` with ``w_l = phase_l * (1 + decay * (1 - 2 l / (L - 1)))``,
``phase_l`` = ``prune_weight`` for ``l < round(prune_span * switch)``, 0 from there to ``switch`` and 1
after; ``s`` is the largest scale whose cost meets the budget.
"""

from __future__ import annotations

import hashlib
from importlib import resources
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

from ..outputs import input_problem
from ..runtime.flops import ModelInfo, schedule_macs
from ..runtime.presets import DEFAULT_MERGED_NORM, DEFAULT_SIMILARITY, rapid_layers
from ..runtime.schedule import MERGED_NORMS, SIMILARITIES, LayerSpec
from ..errors import RapidSearchError
from ..yamlsafe import YAMLInputError, load_yaml, read_yaml

__all__ = ["SearchSpaceError", "FloatRange", "ThresholdRange", "SearchSpace", "DEFAULT_SPACE", "layers_for"]

#: The default search space, shipped inside the package (found with importlib.resources, so it is
#: there in a wheel install as in a source checkout); copy it to write your own.
DEFAULT_SPACE = Path(str(resources.files(__package__) / "spaces" / "default.yaml"))
_FORMAT = "rapid-search-space/v1"


class SearchSpaceError(RapidSearchError, ValueError):
    """An invalid search-space file; the message names the field and the fix."""


@dataclass(frozen=True)
class FloatRange:
    """A float parameter: fixed (``low == high``) or searched in ``[low, high]``."""

    low: float
    high: float
    log: bool = False

    @property
    def fixed(self) -> bool:
        return self.low == self.high

    def suggest(self, trial: Any, name: str) -> float:
        if self.fixed:
            return self.low
        return float(trial.suggest_float(name, self.low, self.high, log=self.log))


@dataclass(frozen=True)
class ThresholdRange:
    """A similarity threshold: ``modes`` ⊆ {off, on}; when on, searched in ``[low, high]``."""

    modes: tuple[str, ...]
    low: float
    high: float

    def suggest(self, trial: Any, name: str) -> Optional[float]:
        mode = self.modes[0] if len(self.modes) == 1 else trial.suggest_categorical(f"{name}_mode", list(self.modes))
        if mode == "off":
            return None
        if self.low == self.high:
            return self.low
        return float(trial.suggest_float(name, self.low, self.high))


def _num(where: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise SearchSpaceError(f"{where} = {v!r} must be a number")
    return float(v)


def _check_keys(where: str, v: Mapping[Any, Any], allowed: set[str], fix: str) -> None:
    unknown = set(map(str, v)) - allowed
    if unknown:
        raise SearchSpaceError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} — {fix}")


def _float_range(where: str, v: Any, lo: float, hi: float, *, allow_log: bool = True) -> FloatRange:
    if not isinstance(v, Mapping):
        x = _num(where, v)
        v = {"low": x, "high": x}
    _check_keys(where, v, {"low", "high", "log"}, "use low, high (and log)")
    if "low" not in v or "high" not in v:
        raise SearchSpaceError(f"{where}: give both low and high (or a single number to fix it)")
    a, b = _num(f"{where}.low", v["low"]), _num(f"{where}.high", v["high"])
    if not (lo <= a <= b <= hi):
        raise SearchSpaceError(f"{where}: need {lo} <= low <= high <= {hi}, got low={a}, high={b}")
    log = v.get("log", False)
    if not isinstance(log, bool):  # 'false' (a string) is not a boolean: bool('false') is True
        raise SearchSpaceError(f"{where}.log = {log!r} must be true or false (unquoted)")
    if log and (not allow_log or a <= 0):
        raise SearchSpaceError(f"{where}: log: true needs low > 0")
    return FloatRange(a, b, log)


def _threshold_range(where: str, v: Any) -> ThresholdRange:
    if v is None or v is False or v == "off":  # YAML 1.1 reads a bare `off` as False
        return ThresholdRange(("off",), 0.0, 0.0)
    if not isinstance(v, Mapping):
        x = _num(where, v)
        if not -1 <= x <= 1:
            raise SearchSpaceError(f"{where} = {x} must be a cosine similarity in [-1, 1]")
        return ThresholdRange(("on",), x, x)
    _check_keys(where, v, {"modes", "low", "high"}, "use modes, low, high")
    modes = v.get("modes", ["off", "on"])
    if isinstance(modes, list):
        modes = [{False: "off", True: "on"}.get(m, m) if isinstance(m, bool) else m for m in modes]
    if not isinstance(modes, list) or not modes or any(m not in ("off", "on") for m in modes) or len(set(modes)) != len(modes):
        raise SearchSpaceError(f"{where}.modes = {modes!r} must be a non-empty list drawn from [off, on]")
    if "on" in modes:
        r = _float_range(where, {"low": v.get("low"), "high": v.get("high")}, -1.0, 1.0, allow_log=False)
        return ThresholdRange(tuple(modes), r.low, r.high)
    return ThresholdRange(tuple(modes), 0.0, 0.0)


def _choices(name: str, v: Any, allowed: tuple[str, ...]) -> tuple[str, ...]:
    """A categorical entry: one of ``allowed`` (fixed) or a list of them (searched)."""
    got = v if isinstance(v, list) else [v]
    if not got or any(not isinstance(n, str) or n not in allowed for n in got) or len(set(got)) != len(got):
        raise SearchSpaceError(f"{name} = {v!r} must be one of {', '.join(allowed)}, or a list of them to search (e.g. [{', '.join(allowed)}])")
    return tuple(got)


@dataclass(frozen=True)
class SearchSpace:
    """A validated search space (see module docstring)."""

    switch: FloatRange
    prune_weight: FloatRange
    decay: FloatRange
    protect: FloatRange
    prune_threshold: ThresholdRange
    merge_threshold: ThresholdRange
    source: str = "<default>"
    prune_span: FloatRange = FloatRange(1.0, 1.0)  # every block before the switch prunes unless the space says otherwise
    merged_norm: tuple[str, ...] = (DEFAULT_MERGED_NORM,)  # one: fixed; several: searched
    similarity: tuple[str, ...] = (DEFAULT_SIMILARITY,)

    @classmethod
    def from_dict(cls, d: Any, *, source: str = "<dict>") -> "SearchSpace":
        if not isinstance(d, Mapping):
            raise SearchSpaceError(f"{source}: a search space must be a YAML mapping — see {DEFAULT_SPACE}")
        keys = {"format", "switch", "prune_weight", "decay", "protect", "prune_threshold", "merge_threshold"}
        optional = {"merged_norm", "similarity", "prune_span"}
        _check_keys(source, d, keys | optional, f"allowed: {', '.join(sorted(keys | optional))}")
        if d.get("format") != _FORMAT:
            raise SearchSpaceError(f"{source}: format must be {_FORMAT!r}, got {d.get('format')!r}")
        missing = sorted(keys - {"format"} - set(d))
        if missing:
            raise SearchSpaceError(f"{source}: missing key(s) {', '.join(missing)} — copy them from {DEFAULT_SPACE}")
        try:
            return cls(
                switch=_float_range("switch", d["switch"], 0.0, 1.0, allow_log=False),
                prune_weight=_float_range("prune_weight", d["prune_weight"], 1e-3, 1e3),
                decay=_float_range("decay", d["decay"], -0.99, 0.99, allow_log=False),
                protect=_float_range("protect", d["protect"], 0.0, 0.95, allow_log=False),
                prune_threshold=_threshold_range("prune_threshold", d["prune_threshold"]),
                merge_threshold=_threshold_range("merge_threshold", d["merge_threshold"]),
                source=source,
                prune_span=_float_range("prune_span", d.get("prune_span", 1.0), 0.0, 1.0, allow_log=False),
                merged_norm=_choices("merged_norm", d.get("merged_norm", DEFAULT_MERGED_NORM), MERGED_NORMS),
                similarity=_choices("similarity", d.get("similarity", DEFAULT_SIMILARITY), SIMILARITIES),
            )
        except SearchSpaceError as e:
            raise SearchSpaceError(f"{source}: {e}") from None

    @classmethod
    def load(cls, path: Union[str, Path, None] = None) -> "SearchSpace":
        """Read a search space YAML (default: :data:`DEFAULT_SPACE`, shipped in the package)."""
        p = Path(path) if path is not None else DEFAULT_SPACE
        problem = input_problem(p)
        if problem is not None:
            raise SearchSpaceError(f"search space {p} {problem} — pass --space with a YAML file like {DEFAULT_SPACE}")
        try:
            data = load_yaml(read_yaml(p))  # safe, bounded (size, depth, aliases), duplicate keys refused
        except YAMLInputError as e:
            at = f" at line {e.line}" if e.line and not e.syntax else ""
            raise SearchSpaceError(f"{p}: {e.reason}{at} — fix it (see {DEFAULT_SPACE})") from None
        except OSError as e:
            raise SearchSpaceError(f"cannot read search space {p}: {e.__class__.__name__}") from None
        return cls.from_dict(data, source=str(p))

    def without_thresholds(self) -> "SearchSpace":
        """The same space with thresholds off (latency budgets search fixed-count schedules)."""
        off = ThresholdRange(("off",), 0.0, 0.0)
        return replace(self, prune_threshold=off, merge_threshold=off)

    def fingerprint(self) -> str:
        """Stable hash of the space, stored with the study to refuse mixing spaces."""
        d: dict[str, Any] = {k: getattr(self, k).__dict__ for k in ("switch", "prune_weight", "decay", "protect", "prune_threshold", "merge_threshold")}
        if self.merged_norm != ("mean",):  # plain averages were all there was before: older studies' fingerprints match
            d["merged_norm"] = list(self.merged_norm)
        if self.similarity != ("keys",):  # the same for what came after: keys were all there was
            d["similarity"] = list(self.similarity)
        if not (self.prune_span.fixed and self.prune_span.low == 1.0):  # and for spaces where every block before the switch prunes
            d["prune_span"] = self.prune_span.__dict__
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=list).encode()).hexdigest()[:16]

    def suggest(self, trial: Any, depth: int) -> dict[str, Any]:
        """Sample a schedule shape; returns the shape parameters."""
        lo, hi = round(self.switch.low * depth), round(self.switch.high * depth)
        return {
            "switch": lo if self.switch.fixed else int(trial.suggest_int("switch", lo, hi)),
            "prune_weight": self.prune_weight.suggest(trial, "prune_weight"),
            "prune_span": self.prune_span.suggest(trial, "prune_span"),
            "decay": self.decay.suggest(trial, "decay"),
            "protect": self.protect.suggest(trial, "protect"),
            "prune_threshold": self.prune_threshold.suggest(trial, "prune_threshold"),
            "merge_threshold": self.merge_threshold.suggest(trial, "merge_threshold"),
            "merged_norm": _categorical(trial, "merged_norm", self.merged_norm),
            "similarity": _categorical(trial, "similarity", self.similarity),
        }


def _categorical(trial: Any, name: str, choices: tuple[str, ...]) -> str:
    return choices[0] if len(choices) == 1 else trial.suggest_categorical(name, list(choices))


def _weights(depth: int, shape: Mapping[str, Any]) -> list[float]:
    """Relative per-block counts of a shape: linear over depth (``prune_weight`` in the first
    ``round(prune_span * switch)`` blocks, 0 from there to ``switch``, slope ``decay``), or the
    shape's own ``weights`` (one per block) where it gives them."""
    if "weights" in shape:
        w = [max(0.0, float(v)) for v in shape["weights"]]
        if len(w) != depth:
            raise SearchSpaceError(f"a shape's weights give {len(w)} blocks for a model of depth {depth} — give one weight per block")
        return w
    w = []
    switch = shape["switch"]
    prune_stop = round(float(shape.get("prune_span", 1.0)) * switch)  # blocks [prune_stop, switch) reduce nothing
    for i in range(depth):
        t = 1.0 - 2.0 * i / (depth - 1) if depth > 1 else 0.0
        phase = shape["prune_weight"] if i < prune_stop else 0.0 if i < switch else 1.0
        w.append(max(0.0, phase * (1.0 + shape["decay"] * t)))
    return w


def layers_for(info: ModelInfo, shape: Mapping[str, Any], scale: float) -> list[LayerSpec]:
    """Layers for a shape at a given scale (counts ``round(scale * w_l)``)."""
    return _layers_from_counts(info, shape, [int(scale * w + 0.5) for w in _weights(info.depth, shape)])


def _layers_from_counts(info: ModelInfo, shape: Mapping[str, Any], r: list[int]) -> list[LayerSpec]:
    return rapid_layers(
        info,
        r,
        switch=int(shape["switch"]),
        protect=float(shape["protect"]),
        prune_threshold=shape.get("prune_threshold"),
        merge_threshold=shape.get("merge_threshold"),
        merged_norm=shape.get("merged_norm", DEFAULT_MERGED_NORM),
        similarity=shape.get("similarity", DEFAULT_SIMILARITY),
    )


def project(
    info: ModelInfo,
    shape: Mapping[str, Any],
    target: float,
    *,
    cost: Optional[Callable[[list[LayerSpec]], float]] = None,
) -> Optional[tuple[list[LayerSpec], float]]:
    """Largest-cost schedule of this ``shape`` (:meth:`SearchSpace.suggest`) that meets ``target``.

    Args:
        info: Model facts.
        shape: The schedule's shape.
        target: Cost target, in the units of ``cost``.
        cost: Cost of a layer list; default analytic MACs (fixed counts).

    Returns:
        ``(layers, cost)``, or None when even the largest counts miss the target.
    """
    cost = cost or (lambda layers: float(schedule_macs(info, layers)))
    wmax = max(_weights(info.depth, shape) or [0.0])
    if wmax <= 0:
        return None
    hi = info.num_tokens / wmax + 1.0
    top = layers_for(info, shape, hi)
    if cost(top) > target:
        return None
    lo = 0.0  # cost(lo) > target (unless the target is the full model)
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if cost(layers_for(info, shape, mid)) <= target:
            hi = mid
        else:
            lo = mid
    # rounding makes the cost a step function of the scale: give tokens back, last block first,
    # while the target still holds, so the budget is used rather than undershot
    r = [int(hi * w + 0.5) for w in _weights(info.depth, shape)]
    for i in reversed(range(info.depth)):  # at most one token per block: the shape stays as sampled
        if r[i] > 0:
            trial_r = r[:i] + [r[i] - 1] + r[i + 1 :]
            if cost(_layers_from_counts(info, shape, trial_r)) <= target:
                r = trial_r
    layers = _layers_from_counts(info, shape, r)
    return layers, cost(layers)
