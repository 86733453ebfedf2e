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

import copy
import functools
import itertools
import math
import statistics
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from ..errors import RapidSearchError
from ..runtime.flops import ModelInfo, effective_r, token_counts
from ..runtime.ops import _wide
from ..runtime.patch import applied, is_patched
from ..runtime.presets import DEFAULT_MERGED_NORM, DEFAULT_PROTECT, DEFAULT_SIMILARITY, as_schedule, make_schedule
from ..runtime.schedule import OPS, LayerSpec, Schedule
from .measure import Timing, fixed_batch, measure_model, parse_device, time_rounds

__all__ = ["LatencyModel", "LatencyModelError", "measure_against_unreduced", "measure_schedule_ms", "paired_ratio"]

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


def _fixed_and_per_token(n: tuple[int, int], y: tuple[float, float]) -> tuple[float, float]:
    """``(fixed, per token)``, both ``>= 0``, of the line through the extra times ``y`` measured at
    token counts ``n`` (``n[0] > n[1]``): a negative slope (noise) becomes a fixed cost, a line
    that would need a negative fixed cost goes through the origin and ``y[0]``, a negative time is zero."""
    y1, y2 = max(0.0, y[0]), max(0.0, y[1])
    per = max(0.0, (y1 - y2) / (n[0] - n[1])) if n[0] > n[1] else 0.0
    if y1 - per * n[0] < 0:
        return 0.0, y1 / n[0]
    return y1 - per * n[0], per


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
        op_overhead_ms: Extra time of a block running each reduction op, as ``(fixed, per input
            token)``: the op's own work is a fixed cost (launches, small ops: what dominates at
            batch 1) plus a part that grows with the tokens it looks at.
        sized_overhead_ms: Extra time of a block while merged-token sizes are in flight (proportional
            attention), ``(fixed, per token)``.
        probe_tokens: The two token counts the overheads were measured at.
        block_factor: Whole block / sum of its separately timed halves, at the full token count.
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
    op_overhead_ms: dict[str, tuple[float, float]]
    sized_overhead_ms: tuple[float, float]
    probe_tokens: tuple[int, int]
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
        repeats: int = 15,
        warmup: int = 1,
        seconds: float = 10.0,
        grid_points: int = 8,
        calibrate: bool = True,
        calibrate_repeats: int = 3,
        compile: bool = False,
    ) -> "LatencyModel":
        """Time the model's parts on ``device`` (round-robin, median per part) and fit the predictor.

        Cost: about ``(warmup + repeats) * (grid_points + 13)`` block times plus
        ``calibrate_repeats`` full forward passes, then up to ``seconds`` more (DeiT-Tiny on CPU:
        a few seconds at batch 1, under a minute at batch 32).

        Args:
            model: A timm ViT in eval mode, already on ``device``, with no schedule applied.
            device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a ``torch.device``.
            batch_size: Images per batch (the latency budget's unit).
            repeats: Timed rounds (the median per part is used; with 5 instead of 15, predictions
                on a loaded 2-core machine erred by up to 28% instead of 10%).
            warmup: Untimed runs of each part before the first round.
            seconds: After ``repeats`` rounds, more rounds until every part's median is known to
                ±3% (95% interval) or this many seconds have passed (0: none).
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
        if info.depth < 2:
            raise LatencyModelError(f"the model has {info.depth} block(s); the latency model probes block 1, so it needs at least 2")
        dev, dtype = _checked(model, device)
        if model.training:
            raise LatencyModelError("the model is in training mode — call model.eval() before measuring latency")
        P, N = info.num_prefix_tokens, info.num_tokens
        grid = sorted({int(round(v)) for v in np.linspace(P + 1, N, grid_points)}) if N > P + 1 else [N]
        r_ref = max(1, round(0.08 * (N - P)))
        # prune and merge probed as the hand-set ones run (MLERP, residual-stream similarity): other settings cost a little less
        specs = {
            op: LayerSpec(op, r_ref, None, DEFAULT_PROTECT if op == "merge" else None, DEFAULT_MERGED_NORM if op == "merge" else "mean",
                          DEFAULT_SIMILARITY if op in ("prune", "merge") else "keys")
            for op in _REDUCING_OPS
        }
        probe = (N, P + max(2, (N - P) // 2))  # the overheads' two token counts
        runs, around = _probes(model, info, grid, specs, probe, B=batch_size, device=dev, dtype=dtype, calibrate=calibrate, compile=compile)
        reps = {k: calibrate_repeats if k == "full" else repeats for k in runs}
        # every part is warm when the full forward runs (last in a round); compiled, it compiles in its warm-up
        warm = {k: (1 if compile else 0) if k == "full" else warmup for k in runs}
        try:
            timings = time_rounds(
                runs, device=dev, repeats=reps, warmup=warm, batch_size=batch_size, around=around, time_limit=seconds, stable=0.03
            )
        finally:
            if compile and calibrate:
                torch._dynamo.reset()
        med = {k: t.median_ms for k, t in timings.items()}
        attn_fit, mlp_fit, glue, overhead, sized = _fit_parts(timings, med, grid, specs, probe, N, P)
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
            probe_tokens=probe,
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
        + overhead_op(l)(N_l) + sized(N_l) (after a merge)])``, ``f`` being :attr:`block_factor`
        and each overhead ``fixed + per_token * N_l``. Threshold layers count at their maximal
        reduction.

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
            if layer.reduces:
                fixed, per = self.op_overhead_ms.get(layer.op, (0.0, 0.0))
                total += fixed + per * n
            if sized:
                total += self.sized_overhead_ms[0] + self.sized_overhead_ms[1] * n
            sized = sized or (layer.op in _MERGING_OPS and m < n)
        return total * (self.scale if calibrated else 1.0)

    def anchor(self, measured_ms: float) -> None:
        """Rescale predictions so that the unreduced model's is ``measured_ms`` (a timing taken under
        the load the schedules will be timed in; the model's own calibration run may have met other load)."""
        own = self.predict_ms(None)
        if measured_ms > 0 and own > 0:
            self.scale *= measured_ms / own
            self.base_ms = measured_ms


def _fit_parts(
    timings: dict[str, Any], med: dict[str, float], grid: list[int], specs: dict[str, LayerSpec], probe: tuple[int, int], N: int, P: int
) -> tuple[Any, Any, float, dict[str, tuple[float, float]], tuple[float, float]]:
    """From :func:`_probes`' timings (``med``: their medians): the attention and MLP halves' quadratic
    fits over ``grid``, the glue factor that anchors their sum to the whole plain block at ``N``, each
    op's overhead and the size-aware attention's, as ``(fixed ms, ms per token)`` lines through the
    two ``probe`` counts."""
    attn_fit = _fit_nonneg_quadratic(grid, [med[f"attn{n}"] for n in grid])
    mlp_fit = _fit_nonneg_quadratic(grid, [med[f"mlp{n}"] for n in grid])
    halves = _poly(attn_fit, N) + _poly(mlp_fit, N)
    glue = med["block"] / halves if halves > 0 else 1.0  # the plain block at N, anchored to the measured whole block

    def extra(key: str, n: int) -> float:  # median over rounds of (probe - plain block at n), both timed in each round
        paired = np.subtract(timings[f"{key}@{n}"].times_ms, timings[f"plain@{n}"].times_ms)
        return float(np.median(paired))

    def line(over: Callable[[int], float]) -> tuple[float, float]:
        return _fixed_and_per_token(probe, (over(probe[0]), over(probe[1])))

    def op_line(op: str, spec: LayerSpec) -> tuple[float, float]:  # the op block's MLP sees fewer tokens: add that back
        return line(lambda n: extra(f"op_{op}", n) + glue * (_poly(mlp_fit, n) - _poly(mlp_fit, n - effective_r(spec, n, P))))

    return attn_fit, mlp_fit, glue, {op: op_line(op, spec) for op, spec in specs.items()}, line(lambda n: extra("sized", n))


def _probes(
    model: nn.Module,
    info: ModelInfo,
    grid: Sequence[int],
    specs: dict[str, LayerSpec],
    probe: tuple[int, int],
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
    ``entry``/``exit``: patch embedding and final norm + head; at both ``probe`` counts ``n``:
    ``plain@{n}``: block 1 as timm runs it, ``op_{op}@{n}``: block 1 running each op (``specs``),
    ``sized@{n}``: block 1 not reducing, with token sizes in flight (each overhead is the median of
    its per-round difference to ``plain@{n}``, so load that drifts between rounds cancels);
    ``full`` (with ``calibrate``): the unreduced forward, compiled with ``compile``.

    The ``@n`` probes run block 1 of the model patched with the op there: its run state is reset
    first (block 0 would do that), so the block sees ``n`` tokens as if earlier blocks had reduced.
    """
    gen = torch.Generator().manual_seed(0)
    N, C, blk = info.num_tokens, info.embed_dim, model.blocks[0]

    def tokens(n: int) -> torch.Tensor:
        return torch.randn(B, n, C, generator=gen).to(device, dtype)  # (B, n, C)

    img = torch.randn(B, *_input_size(model), generator=gen).to(device, dtype)  # (B, C_in, H, W)
    x_full = tokens(N)
    runs: dict[str, Callable[[], Any]] = {}
    around: dict[str, Callable[[], ContextManager[Any]]] = {}
    for n in grid:
        x = tokens(n)
        runs[f"attn{n}"] = lambda x=x: x + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(x))))
        runs[f"mlp{n}"] = lambda x=x: x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    runs["block"] = lambda: blk(x_full)
    runs["entry"] = lambda: model.patch_embed(img)
    runs["exit"] = lambda: model.forward_head(model.norm(x_full))

    rest = [LayerSpec()] * (info.depth - 2)
    scheds = {op: make_schedule(info, [LayerSpec(), spec] + rest, method="latency-probe") for op, spec in specs.items()}
    patched = make_schedule(info, [specs["prune"], LayerSpec()] + rest, method="latency-probe")  # block 1 patched, not reducing
    blk1 = model.blocks[1]

    def at(x: torch.Tensor, sized: bool) -> Callable[[], Any]:
        ones = torch.ones(B, x.shape[1], 1, device=device, dtype=_wide(dtype))  # (B, n, 1)

        def run() -> Any:
            st = blk1._rapid_rt.state  # the patched block's run state (block 0 resets it in a forward)
            st.reset()
            if sized:
                st.size, st.merged = ones, True
            return blk1(x)

        return run

    for n in probe:
        x = tokens(n)  # (B, n, C) every probe at n runs on the same tokens
        runs[f"plain@{n}"] = lambda x=x: blk1(x)  # timm's block, unpatched: what each probe at n is paired with
        for op, sched in scheds.items():
            runs[f"op_{op}@{n}"], around[f"op_{op}@{n}"] = at(x, False), functools.partial(applied, model, sched)
        runs[f"sized@{n}"], around[f"sized@{n}"] = at(x, True), functools.partial(applied, model, patched)
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


def measure_against_unreduced(
    model: nn.Module,
    schedule: Any,
    *,
    device: DeviceLike,
    batch_size: int,
    repeats: int = 10,
    warmup: int = 2,
    compile: bool = False,
) -> tuple[Timing, Timing]:
    """Time ``model`` under ``schedule`` and unreduced, round-robin in one process (one run of each per round).

    A machine whose speed changes over seconds (shared cores, clock states) shifts both timings of
    a round alike, so :func:`paired_ratio` of the two stays comparable across calls where the
    milliseconds do not. Compiled, the schedule runs on a copy of the model, so both compiled
    modules exist at once; each compiles in its first warm-up run (not timed), Dynamo's caches are
    reset before and after.

    Args:
        model: A timm ViT in eval mode on ``device``, with no schedule applied (left so).
        schedule: Anything :func:`rapid_search.apply` accepts.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a ``torch.device``.
        batch_size: Images per batch.
        repeats: Rounds timed.
        warmup: Untimed runs of each first (at least one when compiled).
        compile: Time both compiled with ``torch.compile(dynamic=False)``.

    Returns:
        ``(reduced, unreduced)`` :class:`rapid_search.tools.measure.Timing` per batch, ``times_ms`` in round order.

    Raises:
        LatencyModelError: The model is patched or on another device.
    """
    dev, _ = _checked(model, device)
    sched = as_schedule(schedule, model)
    x = fixed_batch(model, device=dev, batch_size=batch_size, input_size=_input_size(model))  # (B, C, H, W)
    if not compile:
        runs = {"reduced": lambda: model(x), "unreduced": lambda: model(x)}
        t = time_rounds(runs, device=dev, repeats=repeats, warmup=warmup, batch_size=batch_size, around={"reduced": functools.partial(applied, model, sched)})
        return t["reduced"], t["unreduced"]
    import torch._dynamo as dynamo

    reduced = copy.deepcopy(model)
    dynamo.reset()
    try:
        with applied(reduced, sched):
            fns = {k: torch.compile(m, dynamic=False) for k, m in (("reduced", reduced), ("unreduced", model))}
            t = time_rounds({k: functools.partial(f, x) for k, f in fns.items()}, device=dev, repeats=repeats, warmup=max(1, warmup), batch_size=batch_size)
        return t["reduced"], t["unreduced"]
    finally:
        dynamo.reset()


def paired_ratio(reduced: Timing, unreduced: Timing) -> float:
    """Median over rounds of reduced / unreduced time (the timings of :func:`measure_against_unreduced`)."""
    return statistics.median(a / b for a, b in zip(reduced.times_ms, unreduced.times_ms))
