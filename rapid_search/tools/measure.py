"""Wall-clock timing of models on a device: medians of repeated runs after warm-up.

On CUDA every run is bracketed by ``torch.cuda.synchronize(device)`` so that the time covers the
kernels, not just their launch; on CPU ``time.perf_counter`` around the call is enough.

Example:
    >>> import torch
    >>> from rapid_search.tools.measure import parse_device, time_callable
    >>> t = time_callable(lambda: torch.ones(8).sum(), device=parse_device("cpu"), warmup=1, repeats=5)
    >>> t.repeats, t.median_ms >= 0
    (5, True)
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Hashable, Mapping, Optional, Sequence, TypeVar, Union

import numpy as np
import torch
from torch import nn

from ..argtypes import DTYPES

__all__ = [
    "DTYPES", "Timing", "fixed_batch", "measure_model", "median_ci", "parse_device", "parse_dtype", "set_cpu_threads", "time_callable", "time_rounds",
]  # fmt: skip

DeviceLike = Union[str, torch.device]
K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class Timing:
    """Summary of repeated timed runs (all times in milliseconds per run, i.e. per batch).

    Attributes:
        median_ms: Median run time.
        mean_ms: Mean run time.
        min_ms: Fastest run.
        max_ms: Slowest run.
        iqr_ms: Inter-quartile range (75th - 25th percentile).
        repeats: Number of timed runs.
        batch_size: Images per run (for :attr:`images_per_s`).
        times_ms: Every run's time, in run order.
    """

    median_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    iqr_ms: float
    repeats: int
    batch_size: int
    times_ms: tuple[float, ...] = ()

    @property
    def images_per_s(self) -> float:
        """Throughput at the median: ``batch_size / median seconds`` (inf if the median is 0)."""
        return float("inf") if self.median_ms <= 0 else self.batch_size / (self.median_ms / 1e3)

    @classmethod
    def from_times(cls, times_ms: Sequence[float], *, batch_size: int = 1) -> Timing:
        """Summarise run times (milliseconds) into a :class:`Timing`."""
        t = np.asarray(times_ms, dtype=np.float64)
        if t.ndim != 1 or t.size == 0:
            raise ValueError("Timing.from_times needs at least one run time — time one or more runs")
        q25, q75 = np.percentile(t, [25.0, 75.0])
        return cls(
            median_ms=float(np.median(t)),
            mean_ms=float(t.mean()),
            min_ms=float(t.min()),
            max_ms=float(t.max()),
            iqr_ms=float(q75 - q25),
            repeats=int(t.size),
            batch_size=int(batch_size),
            times_ms=tuple(float(v) for v in t),
        )


def parse_device(spec: DeviceLike) -> torch.device:
    """Parse ``'cpu'``, ``'cuda'`` or ``'cuda:N'`` into a usable :class:`torch.device`.

    Args:
        spec: Device string (case and surrounding blanks ignored) or a ``torch.device``.

    Returns:
        The device (``'cuda'`` is returned as ``cuda:<current device>``).

    Raises:
        ValueError: Unknown string, CUDA requested without a visible CUDA device, or ``N`` out of
            range.
    """
    text = str(spec).strip().lower()
    m = re.fullmatch(r"(cpu|cuda)(?::(\d+))?", text)
    if m is None or (m.group(1) == "cpu" and m.group(2) is not None):
        raise ValueError(f"unknown device {str(spec)!r} — use --device cpu, cuda or cuda:N")
    if m.group(1) == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"CUDA requested (--device {text}) but no CUDA device is visible — use --device cpu")
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if m.group(2) is None else int(m.group(2))
    if index >= count:
        raise ValueError(f"CUDA device {index} requested (--device {text}) but only {count} visible (0..{count - 1}) — use --device cuda:0")
    return torch.device("cuda", index)


def parse_dtype(spec: Union[str, torch.dtype, None]) -> torch.dtype:
    """``'float32'``, ``'bfloat16'`` or ``'float16'`` (or a ``torch.dtype``) -> the ``torch.dtype``; None -> float32.

    Raises:
        ValueError: Any other name.
    """
    if spec is None:
        return torch.float32
    if isinstance(spec, torch.dtype):
        name = str(spec).replace("torch.", "")
    else:
        name = str(spec).strip().lower()
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {str(spec)!r} — use --dtype float32, bfloat16 or float16")
    return getattr(torch, name)


def set_cpu_threads(n: Optional[int]) -> None:
    """Set torch's intra-op CPU threads to ``n`` (``None`` leaves torch's default).

    Raises:
        ValueError: ``n`` below 1.
    """
    if n is None:
        return
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise ValueError(f"CPU threads must be a positive integer, got {n!r} — pass --threads 1 or more")
    torch.set_num_threads(int(n))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_callable(
    fn: Callable[[], Any],
    *,
    device: DeviceLike,
    warmup: int = 3,
    repeats: int = 10,
    batch_size: int = 1,
) -> Timing:
    """Time ``fn()`` under ``torch.inference_mode``: ``warmup`` untimed runs, then ``repeats`` timed.

    On CUDA the device is synchronised before the timed runs and after each one, so each time
    covers the queued kernels.

    Args:
        fn: The work of one run (e.g. ``lambda: model(x)``).
        device: Device the work runs on (decides whether to synchronise).
        warmup: Untimed runs first (>= 0).
        repeats: Timed runs (>= 1).
        batch_size: Images per run, for :attr:`Timing.images_per_s`.

    Returns:
        The :class:`Timing` of the timed runs.

    Raises:
        ValueError: ``warmup`` < 0, ``repeats`` < 1 or ``batch_size`` < 1.
    """
    if warmup < 0:
        raise ValueError(f"warmup={warmup} must be 0 or more")
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be at least 1 — time one or more runs")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    times: list[float] = []
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        _sync(dev)
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            _sync(dev)
            times.append((time.perf_counter() - t0) * 1e3)
    return Timing.from_times(times, batch_size=batch_size)


def _like_params(model: nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x`` on ``device`` in the dtype of ``model``'s floating-point parameters (float32 without any)."""
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.dtype.is_floating_point else torch.float32
    return x.to(device=device, dtype=dtype)


def fixed_batch(model: nn.Module, *, device: DeviceLike, batch_size: int, input_size: Sequence[int] = (3, 224, 224)) -> torch.Tensor:
    """The seeded random batch timings run on: ``(batch_size, *input_size)`` on ``device``, in the model's dtype.

    Raises:
        ValueError: ``batch_size`` < 1.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((batch_size, *(int(v) for v in input_size)), generator=gen)  # (B, C, H, W)
    return _like_params(model, x, device if isinstance(device, torch.device) else parse_device(device))


def measure_model(
    model: nn.Module,
    *,
    device: DeviceLike,
    batch_size: int = 32,
    input_size: Sequence[int] = (3, 224, 224),
    warmup: int = 3,
    repeats: int = 10,
    inputs: Optional[torch.Tensor] = None,
    compile: bool = False,
) -> Timing:
    """Time ``model(x)`` on one fixed batch; the model must already be on ``device`` (and in eval mode).

    With ``compile``, the model as it is now (a schedule applied or not) is compiled with
    ``torch.compile(model, dynamic=False)`` (inductor) and the compiled module is timed; the
    compilation happens in the first warm-up run (at least one is made) and is not timed. Dynamo's
    caches are reset before and after, so that measuring many schedules of one model never hits
    its recompile limit (which would silently time eager code).

    Args:
        model: The model (its mode and device are left as they are).
        device: Its device.
        batch_size: Images per batch when ``inputs`` is None.
        input_size: ``(C, H, W)`` of the random batch when ``inputs`` is None.
        warmup: Untimed runs first.
        repeats: Timed runs.
        inputs: ``(B, C, H, W)`` batch to use instead of a seeded random one (``B`` is then the
            batch size).

    Returns:
        The :class:`Timing` (per batch; ``images_per_s`` uses the batch size).
    """
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    x = fixed_batch(model, device=dev, batch_size=batch_size, input_size=input_size) if inputs is None else _like_params(model, inputs, dev)
    if not compile:
        return time_callable(lambda: model(x), device=dev, warmup=warmup, repeats=repeats, batch_size=int(x.shape[0]))
    import torch._dynamo as dynamo

    dynamo.reset()
    try:
        compiled = torch.compile(model, dynamic=False)
        return time_callable(lambda: compiled(x), device=dev, warmup=max(1, warmup), repeats=repeats, batch_size=int(x.shape[0]))
    finally:
        dynamo.reset()


def median_ci(times: Sequence[float], *, n_boot: int = 300, seed: int = 0) -> float:
    """Half-width of the bootstrap 95 % interval of the median of ``times``, relative to the median
    (inf with fewer than 3 times)."""
    t = np.asarray(times, dtype=np.float64)
    if t.size < 3:
        return math.inf
    med = float(np.median(t))
    boots = np.median(np.random.default_rng(seed).choice(t, size=(n_boot, t.size)), axis=1)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return float(hi - lo) / 2 / med if med > 0 else math.inf


def time_rounds(
    runs: Mapping[K, Callable[[], Any]],
    *,
    device: DeviceLike,
    repeats: Union[int, Mapping[K, int]],
    warmup: Union[int, Mapping[K, int]] = 0,
    batch_size: int = 1,
    time_limit: float = 0.0,
    stable: float = 0.0,
    around: Optional[Mapping[K, Callable[[], ContextManager[Any]]]] = None,
    log: Optional[Callable[[str], None]] = None,
) -> dict[K, Timing]:
    """Time several pieces of work round-robin: each round times one run of every piece.

    Load from other processes drifts over minutes; interleaving spreads it evenly over the pieces,
    so their times stay comparable. The order rotates from round to round (round ``r`` starts with
    the ``r``-th piece): of two identical forwards in a fixed order, the second read 1.5–2% faster
    at batch 1 on this project's CPU (a warm cache), which a fixed order would book as a speed-up.
    The first run of a piece is preceded by its ``warmup`` untimed runs. A piece is timed in its
    first ``repeats`` rounds; after the longest of them, rounds of every piece go on until each
    median is stable (:func:`median_ci` at most ``stable``) or ``time_limit`` seconds have passed
    since the end of the first round (0: no more rounds).

    Args:
        runs: ``key -> fn``; ``fn()`` is one run (e.g. one batch).
        device: Device the work runs on (see :func:`time_callable`).
        repeats: Rounds per piece, for all or per key.
        warmup: Untimed runs before a piece's first timed one, for all or per key.
        batch_size: Images per run (for :attr:`Timing.images_per_s`).
        time_limit: Seconds of extra rounds at most.
        stable: Relative half-width of the medians' 95 % interval that ends the extra rounds.
        around: ``key -> context``, entered (untimed) around each of that piece's runs, e.g. a
            schedule applied to the model.
        log: Told after each round.

    Returns:
        ``key -> Timing`` of its timed runs (``times_ms`` in round order: median, spread).
    """
    reps = {k: repeats[k] if isinstance(repeats, Mapping) else int(repeats) for k in runs}
    warm = {k: warmup[k] if isinstance(warmup, Mapping) else int(warmup) for k in runs}
    if not runs or min(reps.values()) < 1:
        raise ValueError("time_rounds needs work to time and repeats >= 1 for each")
    times: dict[K, list[float]] = {k: [] for k in runs}
    least, rnd, t_end = max(reps.values()), 0, math.inf
    keys = list(runs)
    while True:
        for k in keys[rnd % len(keys) :] + keys[: rnd % len(keys)]:  # the order rotates: no piece always runs after the same one
            if rnd < reps[k] or rnd >= least:
                with (around or {}).get(k, contextlib.nullcontext)():
                    t = time_callable(runs[k], device=device, warmup=warm[k] if not times[k] else 0, repeats=1, batch_size=batch_size)
                times[k].append(t.median_ms)
        rnd += 1
        t_end = time.perf_counter() + time_limit if rnd == 1 else t_end
        if log is not None:
            log(f"timing round {rnd} done")
        if rnd >= least and (time.perf_counter() >= t_end or all(median_ci(v) <= stable for v in times.values())):
            return {k: Timing.from_times(v, batch_size=batch_size) for k, v in times.items()}
