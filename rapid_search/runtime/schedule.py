"""The schedule: a versioned YAML contract between the search and the runtime.

A schedule has one explicit entry per transformer block plus the fingerprint of the model it was
made for, the budget it was tuned for (with the cost it achieved) and provenance. Example::

    format: rapid-schedule/v1
    model: {name: deit_tiny_patch16_224, depth: 12, embed_dim: 192, num_tokens: 197, num_prefix_tokens: 1}
    budget: {spec: 50%GFLOPs, kind: gflops, target: 0.627, achieved: {gflops: 0.621}}
    layers:
    - {block: 0, op: prune, r: 14, threshold: null}
    - {block: 6, op: merge, r: 9, threshold: 0.55, protect: 0.25, merged_norm: max}
    - {block: 11, op: none}
    scores: {calib_top1: 0.79}
    provenance: {tool: rapid-search 0.1.0, method: hand-set}

Operations: ``none``; ``prune`` (redundancy-aware dropping); ``merge`` (importance-aware,
size-weighted merging, ``protect`` = protected fraction); ``tome`` (ToMe's bipartite merge, the
baseline); ``evit`` (importance-only pruning, the EViT-style baseline). ``threshold`` is a cosine
similarity in ``[-1, 1]`` or ``null`` (off: reduce exactly ``r`` tokens). ``merged_norm``
(``merge`` only, optional): ``mean`` (the default: a merged token is the size-weighted average,
with that average's norm) or ``max`` (the average's direction with the largest norm among the
tokens merged into it: MLERP, from ToFu, Kim et al., WACV 2024). ``similarity`` (``prune`` and
``merge``, optional): what near-duplicates are found by, ``keys`` (the default: the attention's
head-averaged keys, as ToMe) or ``tokens`` (the residual stream the block reduces).

Loading validates every field (``rapid_search.yamlsafe``: safe, bounded, duplicate keys refused) and raises :class:`ScheduleError` with a
message naming the field and the fix. ``save`` writes atomically; load/save round-trips exactly.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import yaml

from ..errors import RapidSearchError
from .ops import merge_sizes
from ..outputs import atomic_write_text

__all__ = [
    "FORMAT",
    "OPS",
    "MERGED_NORMS",
    "SIMILARITIES",
    "ScheduleError",
    "LayerSpec",
    "ModelFingerprint",
    "Budget",
    "Schedule",
    "load_schedule",
    "save_schedule",
    "atomic_write_text",
    "effective_r",
]

FORMAT = "rapid-schedule/v1"
OPS = ("none", "prune", "merge", "tome", "evit")
#: How a ``merge`` layer sets a merged token's norm (see the module docstring).
MERGED_NORMS = ("mean", "max")
#: What ``prune`` and ``merge`` layers compare tokens by (see the module docstring).
SIMILARITIES = ("keys", "tokens")
_THRESHOLD_OPS = ("prune", "merge")


class ScheduleError(RapidSearchError, ValueError):
    """An invalid schedule; the message names the field and how to fix it."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(float(v))


def _check_keys(where: str, d: Any, required: Sequence[str], optional: Sequence[str] = ()) -> Mapping[str, Any]:
    if not isinstance(d, Mapping):
        raise ScheduleError(f"{where} must be a mapping, got {type(d).__name__} — see README 'Schedule format'")
    unknown = sorted(set(map(str, d)) - set(required) - set(optional))
    if unknown:
        allowed = ", ".join(list(required) + list(optional))
        raise ScheduleError(f"{where}: unknown key(s) {', '.join(unknown)} — allowed keys: {allowed}")
    missing = [k for k in required if k not in d]
    if missing:
        raise ScheduleError(f"{where}: missing key(s) {', '.join(missing)} — add them (see README 'Schedule format')")
    return d


@dataclass(frozen=True)
class LayerSpec:
    """What one transformer block does.

    Attributes:
        op: One of :data:`OPS`.
        r: Maximum tokens removed in this block (0 for ``none``).
        threshold: Cosine-similarity threshold for ``prune``/``merge`` (None = off, fixed count).
        protect: Fraction of patch tokens protected from merging (``merge`` only).
        merged_norm: Norm of a merged token (``merge`` only): ``mean`` (the size-weighted
            average's) or ``max`` (the largest among the tokens merged into it, MLERP).
        similarity: What ``prune``/``merge`` compare tokens by (cosine similarity): ``keys`` (the
            attention's head-averaged keys, ``head_dim`` wide) or ``tokens`` (the block's residual
            stream after attention, ``embed_dim`` wide).
    """

    op: str = "none"
    r: int = 0
    threshold: Optional[float] = None
    protect: Optional[float] = None
    merged_norm: str = "mean"
    similarity: str = "keys"

    def validate(self, where: str = "layer") -> "LayerSpec":
        """Check types and ranges; returns self."""
        if self.op not in OPS:
            raise ScheduleError(f"{where}.op = {self.op!r} is unknown — use one of: {', '.join(OPS)}")
        if not _is_int(self.r):
            raise ScheduleError(f"{where}.r = {self.r!r} must be a whole number of tokens (e.g. 8)")
        if self.r < 0:
            raise ScheduleError(f"{where}.r = {self.r} is negative — use 0 or more tokens")
        if self.op == "none" and self.r != 0:
            raise ScheduleError(f"{where}: op 'none' with r = {self.r} — set r: 0 or choose an op that reduces")
        if self.threshold is not None:
            if self.op not in _THRESHOLD_OPS:
                raise ScheduleError(f"{where}.threshold is set for op {self.op!r} — thresholds apply to prune and merge only; use null")
            if not _is_num(self.threshold) or not -1.0 <= float(self.threshold) <= 1.0:
                raise ScheduleError(f"{where}.threshold = {self.threshold!r} must be a cosine similarity in [-1, 1], or null for off")
        if self.op == "merge":
            if self.protect is None:
                raise ScheduleError(f"{where}.protect is required for merge — give the protected fraction, e.g. protect: 0.25")
            if not _is_num(self.protect) or not 0.0 <= float(self.protect) < 1.0:
                raise ScheduleError(f"{where}.protect = {self.protect!r} must be a fraction in [0, 1)")
        elif self.protect is not None:
            raise ScheduleError(f"{where}.protect is set for op {self.op!r} — it applies to merge only; remove it")
        if self.merged_norm not in MERGED_NORMS:
            raise ScheduleError(f"{where}.merged_norm = {self.merged_norm!r} is unknown — use one of: {', '.join(MERGED_NORMS)}")
        if self.op != "merge" and self.merged_norm != "mean":
            raise ScheduleError(f"{where}.merged_norm is set for op {self.op!r} — it applies to merge only; remove it")
        if self.similarity not in SIMILARITIES:
            raise ScheduleError(f"{where}.similarity = {self.similarity!r} is unknown — use one of: {', '.join(SIMILARITIES)}")
        if self.op not in _THRESHOLD_OPS and self.similarity != "keys":
            raise ScheduleError(f"{where}.similarity is set for op {self.op!r} — it applies to prune and merge only; remove it")
        return self

    @property
    def reduces(self) -> bool:
        return self.op != "none" and self.r > 0

    def to_dict(self, block: int) -> dict[str, Any]:
        d: dict[str, Any] = {"block": block, "op": self.op}
        if self.op != "none":
            d["r"] = self.r
        if self.op in _THRESHOLD_OPS:
            d["threshold"] = None if self.threshold is None else float(self.threshold)
            if self.similarity != "keys":  # written only when set: older files stay byte-identical
                d["similarity"] = self.similarity
        if self.op == "merge":
            d["protect"] = float(self.protect)  # type: ignore[arg-type]
            if self.merged_norm != "mean":  # written only when set: older files stay byte-identical
                d["merged_norm"] = self.merged_norm
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str) -> tuple[int, "LayerSpec"]:
        _check_keys(where, d, ["block", "op"], ["r", "threshold", "protect", "merged_norm", "similarity"])
        op = d["op"]
        if not isinstance(op, str):
            raise ScheduleError(f"{where}.op = {op!r} must be a string — use one of: {', '.join(OPS)}")
        r = d.get("r", 0)
        if op != "none" and "r" not in d:
            raise ScheduleError(f"{where}.r is missing for op {op!r} — give the number of tokens to remove")
        thr = d.get("threshold")
        if thr is not None and _is_num(thr):
            thr = float(thr)
        prot = d.get("protect")
        if prot is not None and _is_num(prot):
            prot = float(prot)
        spec = cls(op=op, r=r, threshold=thr, protect=prot, merged_norm=d.get("merged_norm", "mean"),
                   similarity=d.get("similarity", "keys")).validate(where)
        return d["block"], spec


@dataclass(frozen=True)
class ModelFingerprint:
    """The facts a schedule depends on, read from the model (see ``ModelInfo.fingerprint``)."""

    name: str
    depth: int
    embed_dim: int
    num_tokens: int
    num_prefix_tokens: int

    def check(self, other: "ModelFingerprint") -> None:
        """Raise :class:`ScheduleError` if a schedule made for ``self`` cannot run on ``other``."""
        for f in ("depth", "num_tokens", "num_prefix_tokens", "embed_dim"):
            a, b = getattr(self, f), getattr(other, f)
            if a != b:
                raise ScheduleError(
                    f"schedule was made for {self.name} ({f} = {a}) but the model {other.name} has {f} = {b} — "
                    f"make a schedule for this model (rapid-search search --model {other.name}, or rapid_search.rapid_schedule)"
                )

    @classmethod
    def from_dict(cls, d: Any) -> "ModelFingerprint":
        _check_keys("model", d, ["name", "depth", "embed_dim", "num_tokens", "num_prefix_tokens"])
        if not isinstance(d["name"], str) or not d["name"]:
            raise ScheduleError("model.name must be the timm model name (a string)")
        for k in ("depth", "embed_dim", "num_tokens"):
            if not _is_int(d[k]) or d[k] < 1:
                raise ScheduleError(f"model.{k} = {d[k]!r} must be a positive whole number")
        if not _is_int(d["num_prefix_tokens"]) or not 0 <= d["num_prefix_tokens"] < d["num_tokens"]:
            raise ScheduleError(f"model.num_prefix_tokens = {d['num_prefix_tokens']!r} must be a whole number in [0, num_tokens)")
        return cls(**{k: d[k] for k in ("name", "depth", "embed_dim", "num_tokens", "num_prefix_tokens")})


@dataclass(frozen=True)
class Budget:
    """The budget a schedule was tuned for.

    Attributes:
        spec: The budget as the user typed it, e.g. ``"50%GFLOPs"``.
        kind: ``"gflops"`` or ``"latency"``.
        target: GFLOPs (MACs x 1e-9) or milliseconds per batch.
        achieved: What the schedule achieved (``gflops``, ``latency_ms``, ...).
    """

    spec: str
    kind: str
    target: float
    achieved: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Any) -> "Budget":
        _check_keys("budget", d, ["spec", "kind", "target"], ["achieved"])
        if d["kind"] not in ("gflops", "latency"):
            raise ScheduleError(f"budget.kind = {d['kind']!r} must be 'gflops' or 'latency'")
        if not _is_num(d["target"]) or d["target"] <= 0:
            raise ScheduleError(f"budget.target = {d['target']!r} must be a positive number")
        ach = d.get("achieved") or {}
        if not isinstance(ach, Mapping):
            raise ScheduleError("budget.achieved must be a mapping, e.g. {gflops: 0.62}")
        return cls(spec=str(d["spec"]), kind=d["kind"], target=float(d["target"]), achieved=dict(ach))


@dataclass(frozen=True)
class Schedule:
    """A token-reduction schedule for one model: one :class:`LayerSpec` per block.

    Example:
        >>> import timm, rapid_search
        >>> model = timm.create_model("test_vit").eval()
        >>> s = rapid_search.rapid_schedule(model, 0.5)
        >>> s.save("/tmp/s.yaml"); rapid_search.Schedule.load("/tmp/s.yaml") == s
        True
    """

    model: ModelFingerprint
    layers: tuple[LayerSpec, ...]
    budget: Optional[Budget] = None
    scores: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))

    # ---- validation -------------------------------------------------------------------------
    def validate(self) -> "Schedule":
        """Check every layer and the token arithmetic against the fingerprint; returns self."""
        if len(self.layers) != self.model.depth:
            raise ScheduleError(
                f"layers has {len(self.layers)} entries but model.depth is {self.model.depth} — give one entry per block"
            )
        n = self.model.num_tokens
        P = self.model.num_prefix_tokens
        seen_threshold = None
        for i, layer in enumerate(self.layers):
            where = f"layers[{i}]"
            layer.validate(where)
            if layer.op != "none" and layer.r > n - P:
                raise ScheduleError(
                    f"{where}.r = {layer.r} would remove more tokens than the {n - P} patch tokens left at block {i} — lower r"
                )
            if layer.op == "tome" and seen_threshold is not None:
                raise ScheduleError(
                    f"{where}: op 'tome' follows the threshold layer {seen_threshold}; ToMe is a fixed-count baseline — "
                    "set earlier thresholds to null or use merge"
                )
            if layer.threshold is not None and seen_threshold is None:
                seen_threshold = i
            n -= effective_r(layer, n, P)
        return self

    # ---- (de)serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"format": FORMAT, "model": asdict(self.model)}
        if self.budget is not None:
            d["budget"] = asdict(self.budget)
        d["layers"] = [layer.to_dict(i) for i, layer in enumerate(self.layers)]
        if self.scores:
            d["scores"] = dict(self.scores)
        if self.provenance:
            d["provenance"] = dict(self.provenance)
        return d

    @classmethod
    def from_dict(cls, d: Any) -> "Schedule":
        """Build and validate a schedule from plain data (as loaded from YAML)."""
        _check_keys("schedule", d, ["format", "model", "layers"], ["budget", "scores", "provenance"])
        if d["format"] != FORMAT:
            raise ScheduleError(f"format = {d['format']!r} is not supported — this version reads {FORMAT!r}")
        model = ModelFingerprint.from_dict(d["model"])
        raw = d["layers"]
        if not isinstance(raw, list) or not raw:
            raise ScheduleError("layers must be a non-empty list with one entry per block")
        layers = []
        for i, entry in enumerate(raw):
            block, spec = LayerSpec.from_dict(entry, f"layers[{i}]")
            if not _is_int(block) or block != i:
                raise ScheduleError(f"layers[{i}].block = {block!r} — entries must be listed in block order 0, 1, 2, ...")
            layers.append(spec)
        budget = Budget.from_dict(d["budget"]) if d.get("budget") is not None else None
        for k in ("scores", "provenance"):
            if d.get(k) is not None and not isinstance(d[k], Mapping):
                raise ScheduleError(f"{k} must be a mapping")
        return cls(
            model=model,
            layers=tuple(layers),
            budget=budget,
            scores=dict(d.get("scores") or {}),
            provenance=dict(d.get("provenance") or {}),
        ).validate()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=120)

    @classmethod
    def from_yaml(cls, text: str, *, source: str = "<string>") -> "Schedule":
        from ..yamlsafe import YAMLInputError, load_yaml

        try:
            data = load_yaml(text)  # safe, bounded (size, depth, aliases), duplicate keys refused
        except YAMLInputError as e:
            at = f" at line {e.line}" if e.line else ""
            raise ScheduleError(f"{source}: {e.reason}{at} — fix the file or re-export it with rapid-search export") from None
        if data is None:
            raise ScheduleError(f"{source}: file is empty — export a schedule with rapid-search export")
        try:
            return cls.from_dict(data)
        except ScheduleError as e:
            raise ScheduleError(f"{source}: {e}") from None

    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write the schedule as YAML, atomically (a temporary file renamed into place)."""
        return atomic_write_text(path, self.to_yaml())

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "Schedule":
        """Read and validate a YAML schedule."""
        from ..outputs import input_problem
        from ..yamlsafe import YAMLInputError, read_yaml

        p = Path(path)
        problem = input_problem(p)
        if problem is not None:
            raise ScheduleError(f"schedule file {p} {problem} — check the path")
        try:
            text = read_yaml(p)
        except YAMLInputError as e:
            raise ScheduleError(f"{p}: {e.reason} — pass a schedule written by rapid-search") from None
        except OSError as e:
            raise ScheduleError(f"cannot read schedule {p}: {e.__class__.__name__} — pass a readable YAML file") from None
        return cls.from_yaml(text, source=str(p))

    # ---- conveniences -----------------------------------------------------------------------
    def with_meta(self, **changes: Any) -> "Schedule":
        """A copy with ``budget``, ``scores`` or ``provenance`` replaced."""
        return replace(self, **changes)

    @property
    def reduces(self) -> bool:
        return any(layer.reduces for layer in self.layers)

    @property
    def has_threshold(self) -> bool:
        return any(layer.threshold is not None and layer.reduces for layer in self.layers)

    def describe(self) -> str:
        """One compact line per block, for terminals and logs."""
        rows = []
        for i, layer in enumerate(self.layers):
            s = f"{i:3d} {layer.op:6s}"
            if layer.op != "none":
                s += f" r={layer.r:<3d}"
            if layer.threshold is not None:
                s += f" thr={layer.threshold:.3f}"
            if layer.protect is not None:
                s += f" protect={layer.protect:.2f}"
            if layer.merged_norm != "mean":
                s += f" merged_norm={layer.merged_norm}"
            if layer.similarity != "keys":
                s += f" similarity={layer.similarity}"
            rows.append(s)
        return "\n".join(rows)


def load_schedule(path: Union[str, os.PathLike]) -> Schedule:
    """Read and validate a YAML schedule (alias of :meth:`Schedule.load`)."""
    return Schedule.load(path)


def save_schedule(schedule: Schedule, path: Union[str, os.PathLike]) -> Path:
    """Write a schedule atomically (alias of :meth:`Schedule.save`)."""
    return schedule.save(path)


def effective_r(layer: LayerSpec, n: int, num_prefix: int) -> int:
    """Tokens a fixed-count layer removes from ``n`` input tokens (the op's cap applied).

    Caps: ``prune`` removes at most the A half ``ceil(T/2)`` of the ``T`` patch tokens; ``merge``
    at most half of the unprotected tokens (rounded up); ``tome`` at most ``T // 2`` as in ToMe;
    ``evit`` keeps at least one patch token. For threshold layers this is the maximum.
    """
    if not layer.reduces:
        return 0
    T = n - num_prefix
    if T < 2:  # one patch token has no partner to be pruned against or merged into
        return 0
    if layer.op == "prune":
        return min(layer.r, (T + 1) // 2)
    if layer.op == "merge":
        return merge_sizes(T, float(layer.protect), layer.r)[2]  # type: ignore[arg-type]
    if layer.op == "tome":
        return min(layer.r, T // 2)
    if layer.op == "evit":
        return min(layer.r, T - 1)
    raise ValueError(f"unknown op {layer.op!r}")
