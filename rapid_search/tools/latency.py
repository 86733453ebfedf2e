"""Cheap latency prediction for latency budgets: time a model's parts once, predict any schedule.

A :class:`LatencyModel` is measured once per (model, device, batch size) and predicts a schedule's
latency from its token counts in microseconds of arithmetic (how and why: docs/search-design.md).
All times are milliseconds per batch.

Example:
    >>> import timm, rapid_search
    >>> from rapid_search.tools.latency import LatencyModel
    >>> model = timm.create_model("test_vit").eval()
    >>> lat = LatencyModel.measure(model, device="cpu", batch_size=2, repeats=2, calibrate=False)
    >>> lat.predict_ms(rapid_search.tome_schedule(model, 8)) <= lat.predict_ms(rapid_search.tome_schedule(model, 2))
    True
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from ..errors import RapidSearchError
from ..runtime.flops import ModelInfo, effective_r, token_counts
from ..runtime.patch import applied, is_patched
from ..runtime.presets import DEFAULT_PROTECT, as_schedule, make_schedule
from ..runtime.schedule import OPS, LayerSpec, Schedule
from .measure import Timing, measure_model, parse_device, time_rounds

__all__ = ["LatencyModel", "LatencyModelError", "measure_schedule_ms"]

_REDUCING_OPS = tuple(op for op in OPS if op != "none")
_MERGING_OPS = ("merge", "tome")

DeviceLike = Union[str, torch.device]
ScheduleLike = Union[Schedule, Sequence[LayerSpec], None]


class LatencyModelError(RapidSearchError, ValueError):
    """A latency model that cannot be measured or used; the message names the fix."""


def _fit_nonneg_quadratic(n: Sequence[float], y: Sequence[float]) -> tuple[float, float, float]:
    """Least-squares ``y ~ c0 + c1 n + c2 n^2`` with ``c >= 0`` (absolute error: large counts dominate a total).

    Exact non-negative least squares for three unknowns: every subset of the columns is solved
    unconstrained and the best solution with no negative coefficient wins.
    """
    nn_, yy = np.asarray(n, dtype=np.float64), np.asarray(y, dtype=np.float64)
    basis = np.stack([np.ones_like(nn_), nn_, nn_**2], axis=1)  # (G, 3)
    best: tuple[float, tuple[float, float, float]] = (math.inf, (float(max(yy.mean(), 0.0)), 0.0, 0.0))
    for k in (1, 2, 3):
        for cols in itertools.combinations(range(3), k):
            sol, *_ = np.linalg.lstsq(basis[:, cols], yy, rcond=None)
            if np.any(sol < 0):
                continue
            c = np.zeros(3)
            c[list(cols)] = sol
            err = float(np.sum((basis @ c - yy) ** 2))
            if err < best[0]:
                best = (err, (float(c[0]), float(c[1]), float(c[2])))
    return best[1]


def _poly(c: Sequence[float], n: float) -> float:
    return float(c[0] + c[1] * n + c[2] * n * n)


def _checked(model: nn.Module, device: DeviceLike) -> tuple[torch.device, torch.dtype]:
    """``(device, parameter dtype)`` of an unpatched model that is on ``device``."""
    dev = device if isinstance(device, torch.device) else parse_device(device)
    if is_patched(model):
        raise LatencyModelError("the model has a schedule applied — call rapid_search.remove(model) before measuring latency")
    p = next(model.parameters())
    if p.device.type != dev.type or (dev.index is not None and p.device.index != dev.index):
        raise LatencyModelError(f"the model is on {p.device} but latency was asked for {dev} — move it first: model.to({str(dev)!r})")
    return dev, p.dtype if p.dtype.is_floating_point else torch.float32


def _input_size(model: nn.Module) -> tuple[int, int, int]:
    """``(C, H, W)`` of the images ``model`` expects (from its patch embedding)."""
    h, w = (int(v) for v in model.patch_embed.img_size)
    return int(model.patch_embed.proj.in_channels), h, w


@dataclass
class LatencyModel:
    """Predicts the latency per batch of a schedule on one device at one batch size (build it with :meth:`measure`).

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
        """Time the model's parts on ``device`` (round-robin, median per part) and fit the predictor.

        Cost: about ``(warmup + repeats) * (grid_points + 7)`` block times plus
        ``calibrate_repeats`` full forward passes (seconds for DeiT-Tiny at batch 32 on CPU).

        Args:
            model: A timm ViT in eval mode, already on ``device``, with no schedule applied.
            device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a ``torch.device``.
            batch_size: Images per batch (the latency budget's unit).
            repeats: Timed rounds (the median per part is used).
            warmup: Untimed runs of each part before the first round.
            grid_points: Token counts to time the block halves at.
            calibrate: Also time the unreduced forward and scale predictions to match it.
            calibrate_repeats: Timed full forward passes for the calibration.
            compile: Calibrate against the forward compiled with ``torch.compile(dynamic=False)``
                (the parts stay eager: their reduction overheads bound the compiled ones).

        Raises:
            LatencyModelError: The model is patched, on another device, in training mode, or the
                settings are invalid.
            rapid_search.UnsupportedModelError: The model is not a supported timm ViT.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise LatencyModelError(f"batch_size = {batch_size!r} must be a positive whole number (images per batch)")
        if repeats < 1 or warmup < 0 or grid_points < 2:
            raise LatencyModelError("need repeats >= 1, warmup >= 0 and grid_points >= 2 — e.g. repeats=5, warmup=1, grid_points=8")
        info = ModelInfo.from_model(model)
        dev, dtype = _checked(model, device)
        if model.training:
            raise LatencyModelError("the model is in training mode — call model.eval() before measuring latency")
        lo, N = info.num_prefix_tokens + 1, info.num_tokens
        grid = sorted({int(round(v)) for v in np.linspace(lo, N, grid_points)}) if N > lo else [N]
        r_ref = max(1, round(0.08 * (N - info.num_prefix_tokens)))
        specs = {op: LayerSpec(op, r_ref, None, DEFAULT_PROTECT if op == "merge" else None) for op in _REDUCING_OPS}
        runs, around = _probes(model, info, grid, specs, B=batch_size, device=dev, dtype=dtype, calibrate=calibrate, compile=compile)
        reps = {k: calibrate_repeats if k == "full" else repeats for k in runs}
        # every part is warm when the full forward runs (last in a round); compiled, it compiles in its warm-up
        warm = {k: (1 if compile else 0) if k == "full" else warmup for k in runs}
        try:
            timings = time_rounds(runs, device=dev, repeats=reps, warmup=warm, batch_size=batch_size, around=around)
        finally:
            if compile and calibrate:
                torch._dynamo.reset()
        med = {k: t.median_ms for k, t in timings.items()}
        attn_fit = _fit_nonneg_quadratic(grid, [med[f"attn{n}"] for n in grid])
        mlp_fit = _fit_nonneg_quadratic(grid, [med[f"mlp{n}"] for n in grid])
        halves = _poly(attn_fit, N) + _poly(mlp_fit, N)
        glue = med["block"] / halves if halves > 0 else 1.0  # the plain block at N, anchored to the measured whole block

        def plain(n: int, m: int) -> float:  # a plain block, n tokens in and m out
            return glue * (_poly(attn_fit, n) + _poly(mlp_fit, m))

        out = {op: N - effective_r(spec, N, info.num_prefix_tokens) for op, spec in specs.items()}  # tokens after each op
        overhead = {op: max(0.0, med[f"op_{op}"] - plain(N, out[op])) for op in specs}
        m = out["tome"]  # blocks after a merge: the tome probe's plain second block, per token at N
        sized = max(0.0, (med["sized"] - med["op_tome"] - plain(m, m)) * N / m)
        lat = cls(
            info=info,
            device=str(dev),
            batch_size=batch_size,
            dtype=str(dtype).replace("torch.", ""),
            grid=grid,
            attn_ms=[med[f"attn{n}"] for n in grid],
            mlp_ms=[med[f"mlp{n}"] for n in grid],
            attn_fit=attn_fit,
            mlp_fit=mlp_fit,
            stem_ms=med["entry"] + med["exit"],
            op_overhead_ms=overhead,
            sized_overhead_ms=sized,
            ref_tokens=N,
            block_factor=glue,
            compiled=bool(compile and calibrate),
        )
        if calibrate:
            raw = lat.predict_ms(None, calibrated=False)
            lat.base_ms, lat.scale = med["full"], med["full"] / raw if raw > 0 else 1.0
        return lat

    def predict_ms(self, schedule: ScheduleLike, *, calibrated: bool = True) -> float:
        """Predicted latency per batch of ``schedule`` (None: the unreduced model).

        With token counts ``N_0..N_L`` it is ``scale * (stem + sum_l [f * (attn(N_l) + mlp(N_{l+1}))
        + overhead_op(l) * N_l / N_ref + sized * N_l / N_ref (after a merge)])``, ``f`` being
        :attr:`block_factor`. Threshold layers count at their maximal reduction.

        Args:
            schedule: A :class:`rapid_search.Schedule`, a list of :class:`rapid_search.LayerSpec`
                (one per block), or None.
            calibrated: Apply :attr:`scale` (the calibration to the measured full forward).

        Returns:
            Milliseconds per batch of :attr:`batch_size` images on :attr:`device`.

        Raises:
            LatencyModelError: The schedule's length differs from the model's depth.
        """
        layers = [LayerSpec()] * self.info.depth if schedule is None else list(getattr(schedule, "layers", schedule))
        if len(layers) != self.info.depth:
            raise LatencyModelError(f"the schedule has {len(layers)} layers but the model has depth {self.info.depth} — give one entry per block")
        counts = token_counts(self.info, layers)
        total, sized = self.stem_ms, False
        for layer, n, m in zip(layers, counts, counts[1:]):
            total += self.block_factor * (_poly(self.attn_fit, n) + _poly(self.mlp_fit, m))
            total += (self.op_overhead_ms.get(layer.op, 0.0) if layer.reduces else 0.0) * n / self.ref_tokens
            total += self.sized_overhead_ms * n / self.ref_tokens if sized else 0.0
            sized = sized or (layer.op in _MERGING_OPS and m < n)
        return total * (self.scale if calibrated else 1.0)

    def anchor(self, measured_ms: float) -> None:
        """Rescale predictions so that the unreduced model's is ``measured_ms`` (a timing taken under
        the load the schedules will be timed in; the model's own calibration run may have met other load)."""
        own = self.predict_ms(None)
        if measured_ms > 0 and own > 0:
            self.scale *= measured_ms / own
            self.base_ms = measured_ms


def _probes(
    model: nn.Module,
    info: ModelInfo,
    grid: Sequence[int],
    specs: dict[str, LayerSpec],
    *,
    B: int,
    device: torch.device,
    dtype: torch.dtype,
    calibrate: bool,
    compile: bool,
) -> tuple[dict[str, Callable[[], Any]], dict[str, Callable[[], ContextManager[Any]]]]:
    """The parts :meth:`LatencyModel.measure` times, by name, each a call on seeded random inputs,
    and the schedules applied (untimed) around some of them.

    ``attn{n}``/``mlp{n}``: block 0's attention half ``x + ls1(attn(norm1(x)))`` and MLP half at
    each grid count; ``block``: the whole plain block at the full count (the halves miss its glue);
    ``entry``/``exit``: patch embedding and final norm + head; ``op_{op}``: block 0 to be run with
    each op (``specs``) applied; ``sized``: a tome block, then a plain one running with token sizes
    in flight; ``full`` (with ``calibrate``): the unreduced forward, compiled with ``compile``.
    """
    gen = torch.Generator().manual_seed(0)
    N, C, blk = info.num_tokens, info.embed_dim, model.blocks[0]

    def tokens(n: int) -> torch.Tensor:
        return torch.randn(B, n, C, generator=gen).to(device, dtype)  # (B, n, C)

    img = torch.randn(B, *_input_size(model), generator=gen).to(device, dtype)  # (B, C_in, H, W)
    x_full = tokens(N)
    runs: dict[str, Callable[[], Any]] = {}
    for n in grid:
        x = tokens(n)
        runs[f"attn{n}"] = lambda x=x: x + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(x))))
        runs[f"mlp{n}"] = lambda x=x: x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    runs["block"] = lambda: blk(x_full)
    runs["entry"] = lambda: model.patch_embed(img)
    runs["exit"] = lambda: model.forward_head(model.norm(x_full))

    scheds = {op: make_schedule(info, [spec] + [LayerSpec()] * (info.depth - 1), method="latency-probe") for op, spec in specs.items()}
    around = {f"op_{op}": functools.partial(applied, model, sched) for op, sched in scheds.items()}
    around["sized"] = functools.partial(applied, model, scheds["tome"])
    for op in specs:
        runs[f"op_{op}"] = lambda: model.blocks[0](x_full)
    runs["sized"] = lambda: model.blocks[1](model.blocks[0](x_full))
    if calibrate:
        if compile:
            torch._dynamo.reset()
        full = torch.compile(model, dynamic=False) if compile else model
        runs["full"] = lambda: full(img)
    return runs, around


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
        schedule: Anything :func:`rapid_search.apply` accepts; None times the unreduced model.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a ``torch.device``.
        batch_size: Images per batch.
        repeats: Timed runs.
        warmup: Untimed runs first.
        compile: Time the model compiled with ``torch.compile(dynamic=False)`` (see
            :func:`rapid_search.tools.measure.measure_model`); the compilation is not timed.

    Returns:
        The :class:`rapid_search.tools.measure.Timing` per batch.

    Raises:
        LatencyModelError: The model is patched or on another device.
    """
    dev, _ = _checked(model, device)
    opts = dict(device=dev, batch_size=batch_size, input_size=_input_size(model), warmup=warmup, repeats=repeats, compile=compile)
    if schedule is None:
        return measure_model(model, **opts)
    with applied(model, as_schedule(schedule, model)):
        return measure_model(model, **opts)
