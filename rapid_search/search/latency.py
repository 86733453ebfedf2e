"""Cheap latency prediction for latency budgets.

Timing the real reduced model for every trial would cost a forward pass per candidate (and the
budget projection evaluates dozens of candidates per trial), so a :class:`LatencyModel` is
measured once per (model, device, batch size) and predicts a schedule's latency from its token
counts in microseconds of arithmetic:

* one transformer block of the real model is timed on the target device at a grid of token
  counts (from ``num_prefix + 1`` to ``num_tokens``), separately for its attention half
  (``x + ls1(attn(norm1(x)))``) and its MLP half (``x + ls2(mlp(norm2(x)))``), calling the
  block's own submodules;
* each half gets a smooth least-squares fit ``c0 + c1 n + c2 n^2`` with non-negative
  coefficients, so predictions are monotone in the token count and robust to a noisy grid point;
* the patch embedding and the head (the "stem") are timed once;
* the cost of each reduction op is measured on the real patched block (``rapid_search.apply``
  with that op in block 0, at the model's token count): its time minus that of the plain block
  (timed whole at the same count, corrected for the tokens the op removes before the MLP) is the
  op's overhead. One more probe measures the extra cost of a block that runs
  while merged-token sizes are in flight (proportional attention), which every block after the
  first merge pays;
* optionally the unreduced model's full forward is timed and the prediction is scaled so that it
  matches (``scale``), which absorbs what isolated block timings miss (caches, the position
  embedding, Python overhead).

Prediction for a schedule with token counts ``N_0..N_L`` (:func:`rapid_search.token_counts`)::

    scale * (stem + sum_l [f * (attn(N_l) + mlp(N_{l+1})) + overhead_op(l) * N_l / N_ref
                           + sized * N_l / N_ref  (when sizes are in flight)])

where ``f`` (``block_factor``) is the whole block's time over the sum of its halves at ``N_ref``.
Threshold layers are predicted at their maximal reduction (latency budgets search fixed counts).
All times are milliseconds per batch.

Example:
    >>> import timm, rapid_search
    >>> from rapid_search.search.latency import LatencyModel
    >>> model = timm.create_model("test_vit").eval()
    >>> lat = LatencyModel.measure(model, device="cpu", batch_size=2, repeats=2, calibrate=False)
    >>> lat.predict_ms(rapid_search.tome_schedule(model, 8)) <= lat.predict_ms(rapid_search.tome_schedule(model, 2))
    True
"""

from __future__ import annotations

import datetime as _dt
import itertools
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from ..runtime.flops import ModelInfo, effective_r, token_counts
from ..tools.measure import Timing, measure_model, parse_device, time_callable
from ..runtime.patch import applied, is_patched
from ..runtime.presets import DEFAULT_PROTECT, as_schedule, make_schedule
from ..runtime.schedule import OPS, LayerSpec, Schedule, atomic_write_text
from ..errors import RapidSearchError

__all__ = ["LATENCY_FORMAT", "LatencyModel", "LatencyModelError", "measure_schedule_ms", "model_input_size"]

#: Version tag of :meth:`LatencyModel.to_dict`.
LATENCY_FORMAT = "rapid-latency/v1"

_REDUCING_OPS = tuple(op for op in OPS if op != "none")
_MERGING_OPS = ("merge", "tome")

DeviceLike = Union[str, torch.device]
ScheduleLike = Union[Schedule, Sequence[LayerSpec], None]


class LatencyModelError(RapidSearchError, ValueError):
    """A latency model that cannot be measured, loaded or used; the message names the fix."""


# ---- fitting -------------------------------------------------------------------------------------
def _fit_nonneg_quadratic(n: Sequence[float], y: Sequence[float]) -> tuple[float, float, float]:
    """Least-squares ``y ~ c0 + c1 n + c2 n^2`` with ``c >= 0`` (absolute error: large counts dominate a total).

    Exact non-negative least squares for three unknowns: every subset of the columns is solved
    unconstrained and the best solution with no negative coefficient wins.
    """
    nn_ = np.asarray(n, dtype=np.float64)
    yy = np.asarray(y, dtype=np.float64)
    basis = np.stack([np.ones_like(nn_), nn_, nn_**2], axis=1)  # (G, 3)
    best: tuple[float, tuple[float, float, float]] = (math.inf, (float(max(yy.mean(), 0.0)), 0.0, 0.0))
    for k in (1, 2, 3):
        for cols in itertools.combinations(range(3), k):
            sol, *_ = np.linalg.lstsq(basis[:, cols], yy, rcond=None)
            if np.any(sol < 0):
                continue
            c = [0.0, 0.0, 0.0]
            for j, v in zip(cols, sol):
                c[j] = float(v)
            err = float(np.sum((basis @ np.asarray(c) - yy) ** 2))
            if err < best[0]:
                best = (err, (c[0], c[1], c[2]))
    return best[1]


def _poly(c: Sequence[float], n: float) -> float:
    return float(c[0] + c[1] * n + c[2] * n * n)


def _grid(num_prefix: int, num_tokens: int, points: int) -> list[int]:
    lo, hi = num_prefix + 1, num_tokens
    if hi <= lo:
        return [hi]
    return sorted({int(round(v)) for v in np.linspace(lo, hi, max(2, points))})


# ---- helpers -------------------------------------------------------------------------------------
def model_input_size(model: nn.Module) -> tuple[int, int, int]:
    """``(C, H, W)`` of the images ``model`` expects (from its patch embedding)."""
    pe = model.patch_embed
    h, w = (int(v) for v in pe.img_size)
    return int(pe.proj.in_channels), h, w


def _model_device_dtype(model: nn.Module, device: torch.device) -> torch.dtype:
    p = next(model.parameters())
    if p.device.type != device.type or (device.index is not None and p.device.index != device.index):
        raise LatencyModelError(f"the model is on {p.device} but latency was asked for {device} — move it first: model.to({str(device)!r})")
    return p.dtype if p.dtype.is_floating_point else torch.float32


def _check_unpatched(model: nn.Module) -> None:
    if is_patched(model):
        raise LatencyModelError("the model has a schedule applied — call rapid_search.remove(model) before measuring latency")


def _as_device(device: DeviceLike) -> torch.device:
    return device if isinstance(device, torch.device) else parse_device(device)


def _layers(info: ModelInfo, schedule: ScheduleLike) -> Sequence[LayerSpec]:
    if schedule is None:
        return [LayerSpec()] * info.depth
    layers = schedule.layers if isinstance(schedule, Schedule) else list(schedule)
    if len(layers) != info.depth:
        raise LatencyModelError(f"the schedule has {len(layers)} layers but the model has depth {info.depth} — give one entry per block")
    return layers


def _env_key(device: torch.device) -> dict[str, Any]:
    key: dict[str, Any] = {"torch": torch.__version__}
    if device.type == "cpu":
        key["cpu_threads"] = torch.get_num_threads()
    else:
        key["gpu"] = torch.cuda.get_device_name(device)
    return key


@dataclass
class _Probe:
    """One timed piece of work: ``fn()``, with ``schedule`` applied to the model while it runs."""

    name: str
    fn: Any
    schedule: Optional[Schedule] = None
    rounds: Optional[int] = None  # None: every round
    warmup: Optional[int] = None  # None: the measurement's warmup


def _run_rounds(
    model: nn.Module, probes: Sequence[_Probe], *, device: torch.device, warmup: int, repeats: int, batch_size: int
) -> dict[str, float]:
    """Median time of each probe over interleaved rounds (``repeats``, or the probe's own ``rounds``),
    after ``warmup`` untimed runs."""
    times: dict[str, list[float]] = {p.name: [] for p in probes}
    n_rounds = max([repeats] + [p.rounds for p in probes if p.rounds is not None])
    for k in range(n_rounds):
        for p in probes:
            if k >= (repeats if p.rounds is None else p.rounds):
                continue
            w = (warmup if p.warmup is None else p.warmup) if k == 0 else 0
            if p.schedule is None:
                t = time_callable(p.fn, device=device, warmup=w, repeats=1, batch_size=batch_size)
            else:
                with applied(model, p.schedule):
                    t = time_callable(p.fn, device=device, warmup=w, repeats=1, batch_size=batch_size)
            times[p.name].append(t.median_ms)
    return {name: float(np.median(v)) for name, v in times.items()}


# ---- the model -----------------------------------------------------------------------------------
@dataclass
class LatencyModel:
    """Predicts the latency per batch of a schedule on one device at one batch size.

    Build it with :meth:`measure` (or :meth:`cached`); save it with :meth:`to_dict` / :meth:`save`.

    Attributes:
        info: The model's :class:`rapid_search.ModelInfo`.
        device: Device it was measured on (``"cpu"``, ``"cuda:0"``).
        batch_size: Images per batch.
        dtype: Parameter dtype (``"float32"``, ...).
        grid: Token counts the block halves were timed at.
        attn_ms: Median time of the attention half at each grid count.
        mlp_ms: Median time of the MLP half at each grid count.
        attn_fit: ``(c0, c1, c2)`` of the attention half's fit (ms).
        mlp_fit: ``(c0, c1, c2)`` of the MLP half's fit (ms).
        stem_ms: Patch embedding plus norm and head, per batch.
        op_overhead_ms: Extra time of a block running each reduction op, at ``ref_tokens`` tokens.
        sized_overhead_ms: Extra time of a block while merged-token sizes are in flight, at ``ref_tokens``.
        ref_tokens: Token count the overheads were measured at.
        block_factor: Whole block / sum of its separately timed halves, at ``ref_tokens``.
        scale: Calibration factor (measured unreduced forward / uncalibrated prediction); 1 if not calibrated.
        base_ms: Measured unreduced forward (None if not calibrated).
        compiled: The calibration timed the model compiled with ``torch.compile``.
        env: torch version, CPU threads or GPU name (a cache is only reused when they match).
        meta: Measurement settings and date.
    """

    info: ModelInfo
    device: str
    batch_size: int
    dtype: str
    grid: list[int]
    attn_ms: list[float]
    mlp_ms: list[float]
    attn_fit: tuple[float, float, float]
    mlp_fit: tuple[float, float, float]
    stem_ms: float
    op_overhead_ms: dict[str, float]
    sized_overhead_ms: float
    ref_tokens: int
    block_factor: float = 1.0
    scale: float = 1.0
    base_ms: Optional[float] = None
    compiled: bool = False
    env: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    # ---- measurement -------------------------------------------------------------------------
    @classmethod
    def measure(
        cls,
        model: nn.Module,
        *,
        device: DeviceLike,
        batch_size: int,
        repeats: int = 5,
        warmup: int = 1,
        grid_points: int = 8,
        calibrate: bool = True,
        calibrate_repeats: int = 3,
        compile: bool = False,
    ) -> "LatencyModel":
        """Time the model's parts on ``device`` and fit the predictor.

        The probes (block halves at each grid count, stem, one patched block per op, the sized-state
        probe and, with ``calibrate``, the full forward) are timed in interleaved rounds and the
        median per probe is used. Cost: about ``(warmup + repeats) * (grid_points + 7)`` block
        times plus ``calibrate_repeats`` full forward passes (a few seconds for DeiT-Tiny
        at batch 32 on two idle CPU cores; well under a second on a GPU).

        Args:
            model: A timm ViT in eval mode, already on ``device``, with no schedule applied.
            device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a ``torch.device``.
            batch_size: Images per batch (the latency budget's unit).
            repeats: Timed rounds (the median per probe is used).
            warmup: Untimed runs of each probe before the first round.
            grid_points: Token counts to time the block halves at.
            calibrate: Also time the unreduced forward and scale predictions to match it.
            calibrate_repeats: Timed full forward passes for the calibration.
            compile: Calibrate against the unreduced forward compiled with
                ``torch.compile(dynamic=False)`` (the parts stay eager, so the reduction
                overheads they measure are an upper bound of the compiled ones).

        Returns:
            The fitted :class:`LatencyModel`.

        Raises:
            LatencyModelError: The model is patched, on another device, or the settings are invalid.
            rapid_search.UnsupportedModelError: The model is not a supported timm ViT.
        """
        dev = _as_device(device)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise LatencyModelError(f"batch_size = {batch_size!r} must be a positive whole number (images per batch)")
        if repeats < 1 or warmup < 0 or grid_points < 2:
            raise LatencyModelError("need repeats >= 1, warmup >= 0 and grid_points >= 2 — e.g. repeats=5, warmup=1, grid_points=8")
        info = ModelInfo.from_model(model)
        _check_unpatched(model)
        dtype = _model_device_dtype(model, dev)
        if model.training:
            raise LatencyModelError("the model is in training mode — call model.eval() before measuring latency")
        B, N, P, C = batch_size, info.num_tokens, info.num_prefix_tokens, info.embed_dim
        gen = torch.Generator().manual_seed(0)

        def tokens(n: int) -> torch.Tensor:
            return torch.randn(B, n, C, generator=gen).to(dev, dtype)  # (B, n, C)

        blk = model.blocks[0]
        grid = _grid(P, N, grid_points)
        c_in, h, w = model_input_size(model)
        img = torch.randn(B, c_in, h, w, generator=gen).to(dev, dtype)  # (B, C_in, H, W)
        x_full = tokens(N)
        T = N - P
        r_ref = max(1, round(0.08 * T))

        # Every probe is timed once per round, round after round, and its median over the rounds
        # is used: a burst of load from other processes then hits every probe alike instead of
        # bending the fitted curves (shared CPUs are noisy).
        probes: list[_Probe] = []
        for n in grid:
            x = tokens(n)
            probes.append(_Probe(f"attn{n}", lambda x=x: x + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(x))))))
            probes.append(_Probe(f"mlp{n}", lambda x=x: x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))))
        # the whole unpatched block at the full count: overheads are measured against it, not
        # against the sum of the separately timed halves (which misses the block's own glue)
        probes.append(_Probe("block", lambda: blk(x_full)))
        # stem: patch embedding (entry) and final norm + head (exit, at the full count: an upper bound)
        probes.append(_Probe("entry", lambda: model.patch_embed(img)))
        probes.append(_Probe("exit", lambda: model.forward_head(model.norm(x_full))))
        # reduction overheads: the real patched block 0 with each op, at the model's token count
        specs = {op: LayerSpec(op, r_ref, None, DEFAULT_PROTECT if op == "merge" else None) for op in _REDUCING_OPS}
        scheds = {op: make_schedule(info, [spec] + [LayerSpec()] * (info.depth - 1), method="latency-probe") for op, spec in specs.items()}
        for op, sched in scheds.items():
            probes.append(_Probe(f"op_{op}", lambda: model.blocks[0](x_full), schedule=sched))
        # blocks after a merge run with token sizes in flight (proportional attention): tome, then a plain block
        probes.append(_Probe("sized", lambda: model.blocks[1](model.blocks[0](x_full)), schedule=scheds["tome"]))
        if calibrate:
            # last in each round: every part is warm by then, so the full forward needs no warm-up of its own
            if compile:
                import torch._dynamo as dynamo

                dynamo.reset()
                full = torch.compile(model, dynamic=False)
                probes.append(_Probe("full", lambda: full(img), rounds=calibrate_repeats, warmup=1))  # compiles in its warm-up
            else:
                probes.append(_Probe("full", lambda: model(img), rounds=calibrate_repeats, warmup=0))
        try:
            med = _run_rounds(model, probes, device=dev, warmup=warmup, repeats=repeats, batch_size=B)
        finally:
            if compile:
                import torch._dynamo as dynamo

                dynamo.reset()

        attn_ms = [med[f"attn{n}"] for n in grid]
        mlp_ms = [med[f"mlp{n}"] for n in grid]
        attn_fit = _fit_nonneg_quadratic(grid, attn_ms)
        mlp_fit = _fit_nonneg_quadratic(grid, mlp_ms)
        stem_ms = med["entry"] + med["exit"]
        # a plain block at n tokens in and m out, anchored to the measured whole block at N
        halves_n = _poly(attn_fit, N) + _poly(mlp_fit, N)
        glue = med["block"] / halves_n if halves_n > 0 else 1.0

        def plain_block(n: int, m: int) -> float:
            return glue * (_poly(attn_fit, n) + _poly(mlp_fit, m))

        overhead: dict[str, float] = {}
        for op, spec in specs.items():
            m_out = N - effective_r(spec, N, P)
            overhead[op] = max(0.0, med[f"op_{op}"] - plain_block(N, m_out))
        m_out = N - effective_r(specs["tome"], N, P)
        sized = max(0.0, (med["sized"] - med["op_tome"] - plain_block(m_out, m_out)) * N / m_out)

        lat = cls(
            info=info,
            device=str(dev),
            batch_size=B,
            dtype=str(dtype).replace("torch.", ""),
            grid=list(grid),
            attn_ms=[round(v, 6) for v in attn_ms],
            mlp_ms=[round(v, 6) for v in mlp_ms],
            attn_fit=attn_fit,
            mlp_fit=mlp_fit,
            stem_ms=stem_ms,
            op_overhead_ms=overhead,
            sized_overhead_ms=sized,
            ref_tokens=N,
            block_factor=glue,
            compiled=bool(compile and calibrate),
            env=_env_key(dev),
            meta={
                "repeats": repeats,
                "warmup": warmup,
                "r_ref": r_ref,
                "block_ms": round(med["block"], 6),
                "measured": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            },
        )
        if calibrate:
            lat.base_ms = med["full"]
            raw = lat.predict_ms(None, calibrated=False)
            lat.scale = med["full"] / raw if raw > 0 else 1.0
        return lat

    # ---- prediction --------------------------------------------------------------------------
    def predict_ms(self, schedule: ScheduleLike, *, calibrated: bool = True) -> float:
        """Predicted latency per batch of ``schedule`` (None: the unreduced model).

        Args:
            schedule: A :class:`rapid_search.Schedule`, a list of :class:`rapid_search.LayerSpec`
                (one per block), or None.
            calibrated: Apply :attr:`scale` (the calibration to the measured full forward).

        Returns:
            Milliseconds per batch of :attr:`batch_size` images on :attr:`device`.

        Raises:
            LatencyModelError: The schedule's length differs from the model's depth.
        """
        layers = _layers(self.info, schedule)
        counts = token_counts(self.info, layers)
        total = self.stem_ms
        sized = False
        for i, layer in enumerate(layers):
            n, m = counts[i], counts[i + 1]
            total += self.block_factor * (_poly(self.attn_fit, n) + _poly(self.mlp_fit, m))
            if layer.reduces:
                total += self.op_overhead_ms.get(layer.op, 0.0) * n / self.ref_tokens
            if sized:
                total += self.sized_overhead_ms * n / self.ref_tokens
            if layer.op in _MERGING_OPS and m < n:
                sized = True
        return total * (self.scale if calibrated else 1.0)

    __call__ = predict_ms

    def ratio(self, schedule: ScheduleLike) -> float:
        """Predicted latency of ``schedule`` relative to the unreduced model."""
        return self.predict_ms(schedule) / self.predict_ms(None)

    # ---- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (see :meth:`from_dict`)."""
        d = asdict(self)
        d["attn_fit"] = list(self.attn_fit)
        d["mlp_fit"] = list(self.mlp_fit)
        return {"format": LATENCY_FORMAT, **d}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LatencyModel":
        """Rebuild from :meth:`to_dict` output.

        Raises:
            LatencyModelError: Wrong format or missing fields.
        """
        if not isinstance(d, Mapping) or d.get("format") != LATENCY_FORMAT:
            raise LatencyModelError(f"not a {LATENCY_FORMAT} latency model — delete the cache file; it is re-measured on the next run")
        try:
            data = {k: v for k, v in d.items() if k != "format"}
            data["info"] = ModelInfo(**data["info"])
            data["attn_fit"] = tuple(float(v) for v in data["attn_fit"])
            data["mlp_fit"] = tuple(float(v) for v in data["mlp_fit"])
            data["grid"] = [int(v) for v in data["grid"]]
            data["op_overhead_ms"] = {str(k): float(v) for k, v in data["op_overhead_ms"].items()}
            return cls(**data)
        except (KeyError, TypeError, ValueError) as e:
            raise LatencyModelError(f"latency model data is incomplete ({e}) — delete the cache file; it is re-measured on the next run") from None

    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write :meth:`to_dict` as JSON, atomically."""
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "LatencyModel":
        """Read a latency model saved with :meth:`save`.

        Raises:
            LatencyModelError: Missing, unreadable or invalid file.
        """
        p = Path(path)
        try:
            return cls.from_dict(json.loads(p.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise LatencyModelError(f"latency model file {p} does not exist — measure one with LatencyModel.measure") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LatencyModelError(f"cannot read latency model {p} ({e.__class__.__name__}) — delete it; it is re-measured on the next run") from None

    def matches(self, model: nn.Module, *, device: DeviceLike, batch_size: int, compile: bool = False) -> bool:
        """Whether this latency model was measured for ``model`` on ``device`` at ``batch_size``
        (same architecture facts, dtype, compile mode, torch version and CPU threads or GPU)."""
        dev = _as_device(device)
        p = next(model.parameters())
        return (
            self.info == ModelInfo.from_model(model)
            and self.device == str(dev)
            and self.batch_size == batch_size
            and self.dtype == str(p.dtype).replace("torch.", "")
            and self.compiled == bool(compile)
            and self.env == _env_key(dev)
        )

    @classmethod
    def cached(
        cls,
        path: Union[str, os.PathLike],
        model: nn.Module,
        *,
        device: DeviceLike,
        batch_size: int,
        **measure_options: Any,
    ) -> "LatencyModel":
        """Load the latency model at ``path`` if it matches, else measure it and save it there.

        Args:
            path: JSON cache file (e.g. next to the study).
            model: The model (on ``device``, eval mode, unpatched).
            device: Target device.
            batch_size: Images per batch.
            **measure_options: Passed to :meth:`measure`.
        """
        p = Path(path)
        if p.exists():
            try:
                lat = cls.load(p)
                if lat.matches(model, device=device, batch_size=batch_size, compile=bool(measure_options.get("compile", False))):
                    return lat
            except LatencyModelError:
                pass
        lat = cls.measure(model, device=device, batch_size=batch_size, **measure_options)
        lat.save(p)
        return lat


def measure_schedule_ms(
    model: nn.Module,
    schedule: Any,
    *,
    device: DeviceLike,
    batch_size: int,
    repeats: int = 10,
    warmup: int = 2,
    compile: bool = False,
) -> Timing:
    """Time the real forward of ``model`` under ``schedule`` (median of ``repeats`` runs).

    Args:
        model: A timm ViT in eval mode on ``device``, with no schedule applied (the schedule is
            applied for the measurement and removed afterwards).
        schedule: Anything :func:`rapid_search.apply` accepts; None times the unreduced model as is.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a ``torch.device``.
        batch_size: Images per batch.
        repeats: Timed runs.
        warmup: Untimed runs first.
        compile: Time the model compiled with ``torch.compile(dynamic=False)`` (see
            :func:`rapid_search.tools.measure.measure_model`); the compilation is not timed.

    Returns:
        The :class:`rapid_search.tools.measure.Timing` per batch (``median_ms``, ``min_ms``, ...).

    Raises:
        LatencyModelError: The model is patched or on another device.
    """
    dev = _as_device(device)
    _check_unpatched(model)
    _model_device_dtype(model, dev)
    size = model_input_size(model)
    opts = dict(device=dev, batch_size=batch_size, input_size=size, warmup=warmup, repeats=repeats, compile=compile)
    if schedule is None:
        return measure_model(model, **opts)
    sched = as_schedule(schedule, model)
    with applied(model, sched):
        return measure_model(model, **opts)
