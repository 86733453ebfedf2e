"""Pareto benchmark: accuracy kept at a given cost, RAPID against the alternatives.

``rapid-search bench --model deit_tiny_patch16_224 --calib CALIB --data EVAL`` evaluates, on the
same images and the same device:

* the unreduced model (the reference);
* for every GFLOPs ratio (default 90, 70, 50, 40, 35, 30 %): ToMe with the smallest ``r`` that
  meets it, constant, the paper's decreasing schedule ``(r, -1)`` and ``(r, -0.5)``; the ToFu-style and EViT-style baselines at
  the hand-set RAPID counts; hand-set RAPID; and a searched RAPID schedule when one is given
  (``--searched``, calibrated on ``--calib``, never on the evaluation images).

Every schedule reaches its ratio through the same analytic cost model
(:func:`rapid_search.schedule_macs`; threshold schedules by their executed per-image MACs) and
the table states the achieved GFLOPs; a method that cannot reach a ratio is marked unreachable.
Top-1, agreement with the unreduced model, measured images/s at the batch size, speedup and
speedup as a fraction of the ideal (``1 / GFLOPs ratio``) are reported, and RAPID is compared
with the best ToMe at each ratio by paired statistics over the same images (exact McNemar p and
a paired bootstrap 95 % CI of the top-1 difference, :mod:`rapid_search.tools.stats`).

Outputs (:func:`write_outputs`): ``table.md``, ``results.json`` (every number, per-image
predictions and each schedule) and ``pareto.png`` (top-1 against GFLOPs).

Work is not repeated: images are decoded once, the unreduced predictions are computed once and
reused for agreement, and identical schedules are evaluated once.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import math
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from ..argtypes import DTYPES, int_in
from ..runtime.flops import ModelInfo, schedule_macs
from .provenance import versions
from ..runtime.presets import TOME_DECREASING, UnreachableBudget, as_schedule, rapid_schedule, tome_for_ratio, variant_schedule
from ..runtime.schedule import Schedule, atomic_write_text
from .evaluate import fidelity, predict
from .measure import median_ci
from .stats import compare_paired
from ..errors import RapidSearchError

__all__ = [
    "DEFAULT_RATIOS",
    "METHODS",
    "TOME_VARIANTS",
    "COMPARED",
    "PAIRS",
    "METHOD_LABELS",
    "BenchError",
    "parse_ratios",
    "method_schedule",
    "schedule_for_spec",
    "match_searched",
    "check_disjoint",
    "run_bench",
    "markdown_table",
    "write_markdown",
    "write_json",
    "plot_pareto",
    "write_outputs",
    "add_arguments",
    "main",
]

FORMAT = "rapid-bench/v1"

#: GFLOPs ratios benchmarked by default (fractions of the unreduced model).
DEFAULT_RATIOS: tuple[float, ...] = (0.9, 0.7, 0.5, 0.4, 0.35, 0.3)

#: Methods at each ratio, in table order.
METHODS: tuple[str, ...] = ("tome", "tome-decreasing", "tome-inflect-0.5", "tofu", "evit", "rapid", "searched")

#: The ToMe variants by method name: ``(r, inflect)`` of ToMe's ``parse_r``.
TOME_VARIANTS: dict[str, float] = {"tome": 0.0, "tome-decreasing": TOME_DECREASING, "tome-inflect-0.5": -0.5}

#: Display names.
METHOD_LABELS: dict[str, str] = {
    "unreduced": "unreduced",
    "tome": "ToMe (constant r)",
    "tome-decreasing": "ToMe (decreasing r: (r, -1))",
    "tome-inflect-0.5": "ToMe (inflect -0.5: (r, -0.5))",
    "tofu": "ToFu-style (no protection)",
    "evit": "EViT-style (importance pruning)",
    "rapid": "RAPID (hand-set)",
    "searched": "RAPID (searched)",
}

#: Methods compared against the best ToMe at each ratio.
COMPARED: tuple[str, ...] = ("rapid", "searched")

#: Further paired comparisons at each ratio (method, reference); ``unreduced``: what the reduction costs.
PAIRS: tuple[tuple[str, str], ...] = (
    ("rapid", "tofu"),
    ("rapid", "evit"),
    ("searched", "rapid"),
    ("rapid", "unreduced"),
    ("searched", "unreduced"),
)

#: Tolerance when matching a searched schedule's achieved ratio to a benchmark ratio.
SEARCHED_TOLERANCE = 0.01

#: Relative half-width of a median's bootstrap 95 % interval at which timing rounds stop.
STABLE_CI = 0.02

#: IQR above this fraction of the median: the timing is too noisy to compare.
WIDE_SPREAD = 0.15

Log = Callable[[str], None]


class BenchError(RapidSearchError, ValueError):
    """The benchmark cannot run as asked; the message says what to change."""


# ---- schedules ---------------------------------------------------------------------------------
def parse_ratios(text: str) -> tuple[float, ...]:
    """Parse ``"90,70,50"`` (percent) or ``"0.9,0.7"`` (fractions) into fractions in (0, 1].

    Raises:
        argparse.ArgumentTypeError: A value is not a number in (0, 100].
    """
    out = []
    for part in text.split(","):
        p = part.strip().rstrip("%")
        if not p:
            continue
        try:
            v = float(p)
        except ValueError:
            raise argparse.ArgumentTypeError(f"ratio {part!r} is not a number — use percentages such as 90,70,50") from None
        v = v / 100.0 if v > 1.0 else v
        if not 0.0 < v <= 1.0:
            raise argparse.ArgumentTypeError(f"ratio {part!r} must be in (0, 100] percent of the unreduced GFLOPs")
        out.append(round(v, 6))
    if not out:
        raise argparse.ArgumentTypeError("no ratios given — use e.g. --ratios 90,70,50")
    return tuple(out)


def method_schedule(method: str, model: Union[nn.Module, ModelInfo], ratio: float) -> Schedule:
    """The schedule of a baseline or hand-set method at a GFLOPs ratio.

    Args:
        method: ``tome``, ``tome-decreasing``, ``tome-inflect-0.5``, ``tofu``, ``evit`` or ``rapid``.
        model: The model or its :class:`ModelInfo`.
        ratio: Fraction of the unreduced GFLOPs.

    Raises:
        UnreachableBudget: The method cannot reach ``ratio``.
        ValueError: Unknown method.
    """
    if method in TOME_VARIANTS:
        return tome_for_ratio(model, ratio, inflect=TOME_VARIANTS[method])
    if method == "rapid":
        return rapid_schedule(model, ratio)
    if method in ("tofu", "evit"):
        info = model if isinstance(model, ModelInfo) else ModelInfo.from_model(model)
        sched = variant_schedule(rapid_schedule(info, ratio), info, kind=method)
        if schedule_macs(info, sched) > ratio * info.base_macs:
            # Unprotected merging compares more source rows than RAPID's protected merge, so
            # RAPID's counts can cost slightly more than the ratio: add tokens until it fits.
            sched = _fit_counts(info, sched, ratio)
        return sched
    raise ValueError(f"unknown method {method!r} — use one of: {', '.join(METHODS[:-1])}")


def _fit_counts(info: ModelInfo, schedule: Schedule, ratio: float) -> Schedule:
    """The cheapest-change refit of a fixed-count schedule that exceeds ``ratio``.

    Adds ``extra`` tokens to the first ``k`` reducing blocks, with the smallest ``extra`` and then
    the smallest ``k`` that meet the ratio, so the counts stay as close to the original as possible.

    Raises:
        UnreachableBudget: No such refit meets the ratio.
    """
    from ..runtime.presets import make_schedule

    target = ratio * info.base_macs
    idx = [i for i, layer in enumerate(schedule.layers) if layer.reduces]
    for extra in range(1, info.num_tokens):
        for k in range(1, len(idx) + 1):
            layers = list(schedule.layers)
            for i in idx[:k]:
                layer = layers[i]
                layers[i] = replace(layer, r=layer.r + extra)
            if schedule_macs(info, layers) <= target:
                prov = dict(schedule.provenance)
                method = prov.pop("method", "custom")
                prov.pop("tool", None)
                prov["refit"] = f"+{extra} token(s) in the first {k} reducing block(s) to meet the ratio"
                return make_schedule(info, layers, method=method, ratio=ratio, **prov)
    raise UnreachableBudget(f"{ratio:.0%} GFLOPs is out of reach of the {schedule.provenance.get('method')} counts")


def schedule_for_spec(spec: str, model: Union[nn.Module, ModelInfo]) -> Schedule:
    """A schedule from ``METHOD@PERCENT`` (e.g. ``rapid@50``, ``tome@0.7``) or a YAML path."""
    if "@" in spec and not Path(spec).exists():
        method, _, ratio = spec.partition("@")
        try:
            (r,) = parse_ratios(ratio)
        except argparse.ArgumentTypeError as e:
            raise BenchError(f"schedule {spec!r}: {e}") from None
        return method_schedule(method.strip(), model, r)
    return as_schedule(Path(spec), model)


def _achieved_ratio(schedule: Schedule) -> Optional[float]:
    ach = schedule.budget.achieved if schedule.budget is not None else {}
    v = ach.get("ratio")
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def match_searched(
    paths: Sequence[Union[str, Path]], info: ModelInfo, ratios: Sequence[float], *, tolerance: float = SEARCHED_TOLERANCE
) -> tuple[dict[float, tuple[Path, Schedule]], list[str]]:
    """Assign searched schedules to benchmark ratios.

    A file goes to the ratio its ``budget.achieved.ratio`` is within ``tolerance`` of (the closest
    file wins when several match). Files made for another model raise.

    Returns:
        ``({ratio: (path, schedule)}, notes)`` where notes name files matched to no ratio.

    Raises:
        ScheduleError: A file is invalid or made for another model.
    """
    chosen: dict[float, tuple[Path, Schedule, float]] = {}
    notes: list[str] = []
    for p in paths:
        path = Path(p)
        s = Schedule.load(path)
        s.model.check(info.fingerprint())
        ach = _achieved_ratio(s)
        if ach is None:
            ach = schedule_macs(info, s) / info.base_macs
        best = min(ratios, key=lambda r: abs(r - ach))
        gap = abs(best - ach)
        if gap > tolerance + 1e-12:
            notes.append(f"{path}: achieved {ach:.1%} GFLOPs matches no benchmark ratio within {tolerance:.0%}; not used")
            continue
        if best in chosen and chosen[best][2] <= gap:
            notes.append(f"{path}: another file is closer to {best:.0%}; not used")
            continue
        if best in chosen:
            notes.append(f"{chosen[best][0]}: another file is closer to {best:.0%}; not used")
        chosen[best] = (path, s, gap)
    return {r: (p, s) for r, (p, s, _) in chosen.items()}, notes


# ---- images ------------------------------------------------------------------------------------
def _file_digests(paths: Sequence[Union[str, Path]]) -> dict[str, str]:
    out = {}
    for p in paths:
        h = hashlib.sha1()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        out[h.hexdigest()] = str(p)
    return out


def check_disjoint(calib_root: Union[str, Path], eval_paths: Sequence[Union[str, Path]]) -> int:
    """Raise :class:`BenchError` if a calibration image is also an evaluation image (same bytes).

    Returns:
        Number of calibration image files found.
    """
    calib_root = Path(calib_root)
    if not calib_root.is_dir():
        raise BenchError(f"calibration folder {calib_root} does not exist — pass --calib with the folder the search calibrated on")
    from .data import list_images

    calib_files, _ = list_images(calib_root)
    shared = set(_file_digests(calib_files)) & set(_file_digests(eval_paths))
    if shared:
        raise BenchError(
            f"{len(shared)} evaluation image(s) are also in the calibration folder {calib_root} — evaluate on images the search never saw"
        )
    return len(calib_files)


def _check_provenance(schedule: Schedule, path: Path, eval_root: Optional[Path]) -> None:
    """Refuse a searched schedule whose provenance says it was calibrated on the evaluation folder."""
    if eval_root is None:
        return
    data = schedule.provenance.get("data")
    if isinstance(data, str) and data:
        try:
            same = Path(data).resolve() == eval_root.resolve()
        except OSError:
            same = False
        if same:
            raise BenchError(f"{path} was calibrated on the evaluation folder {data} — search on a separate calibration folder")


# ---- the benchmark -----------------------------------------------------------------------------
def _schedule_key(s: Schedule) -> tuple[Any, ...]:
    return tuple((layer.op, layer.r, layer.threshold, layer.protect) for layer in s.layers)


def _round(v: Optional[float], nd: int = 6) -> Optional[float]:
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else round(float(v), nd)


def run_bench(
    model: nn.Module,
    images: torch.Tensor,
    labels: Optional[torch.Tensor],
    *,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    searched: Optional[dict[float, tuple[Path, Schedule]]] = None,
    device: Union[str, torch.device] = "cpu",
    batch_size: int = 32,
    warmup: int = 2,
    repeats: int = 5,
    n_boot: int = 10_000,
    seed: int = 0,
    methods: Sequence[str] = METHODS,
    setup: Optional[dict[str, Any]] = None,
    log: Optional[Log] = None,
    compile: bool = False,
    time_limit: float = 0.0,
    stable: float = STABLE_CI,
) -> dict[str, Any]:
    """Evaluate every method at every ratio on the same images; return all numbers.

    Args:
        model: A timm ViT with its weights, on ``device``, unpatched.
        images: ``(N, 3, H, W)`` preprocessed evaluation images (decoded once by the caller).
        labels: ``(N,)`` int64 ImageNet indices, or None (then agreement replaces top-1 in the
            paired statistics).
        ratios: GFLOPs ratios (fractions of the unreduced model).
        searched: ``{ratio: (path, schedule)}`` from :func:`match_searched`; ratios without an
            entry report the searched method as "not run".
        device: Where to run and time.
        batch_size: Batch size for evaluation and timing.
        warmup: Untimed batches before timing.
        repeats: Timing rounds at least (median reported); 0 skips timing. More rounds follow
            until every median is stable (bootstrap 95 % interval within ``stable`` of it) or
            ``time_limit`` seconds of timing have passed.
        n_boot: Bootstrap resamples for the CI.
        seed: Bootstrap seed.
        methods: Methods per ratio (subset of :data:`METHODS`, in table order).
        setup: Extra facts to record (paths, command line).
        log: Progress callback (one line per evaluated schedule).
        compile: Time every schedule compiled with ``torch.compile(dynamic=False)`` (each on its
            own copy of the model, compiled once before the rounds); evaluation stays eager.
        time_limit: Seconds of timing rounds after which no more are added (0: exactly ``repeats``).
        stable: Relative half-width of the median's 95 % interval that ends the rounds early.

    Returns:
        A JSON-serialisable dict: ``setup``, ``base`` (unreduced row), ``rows`` (one per
        ``(ratio, method)``, with ``status`` ``ok``/``over-budget``/``unreachable``/``not run``),
        ``comparisons`` (paired statistics) and ``labels``.
    """
    log = log or (lambda _m: None)
    device = torch.device(device)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise BenchError(f"unknown method(s) {', '.join(unknown)} — choose from {', '.join(METHODS)}")
    if images.ndim != 4 or len(images) == 0:
        raise BenchError(f"no evaluation images (got shape {tuple(images.shape)}) — pass --data with an image folder")
    t_start, load_start = time.perf_counter(), _loadavg()
    ev = _Evaluation(model, images, labels, device=device, batch_size=batch_size, log=log)
    rows = [ev.row(method, float(ratio), (searched or {}).get(ratio)) for ratio in ratios for method in methods]
    timings = _time_schedules(
        model, ev.to_time, tuple(images.shape[1:]), device=device, batch_size=batch_size, warmup=warmup, repeats=repeats,
        compile=compile, time_limit=time_limit, stable=stable, log=log,
    ) if repeats > 0 else {}  # fmt: skip
    _add_timings(ev.base, rows, timings)
    metric = "top1" if labels is not None else "agreement"
    info = ev.info
    return {
        "format": FORMAT,
        "model": info.name,
        "info": {
            "depth": info.depth,
            "num_tokens": info.num_tokens,
            "num_prefix_tokens": info.num_prefix_tokens,
            "base_gflops": _round(info.base_macs / 1e9),
            "cost_model": "analytic MACs (rapid_search.runtime.flops), reported as GFLOPs = MACs x 1e-9",
        },
        "setup": {
            "images": int(len(images)),
            "input_size": [int(v) for v in images.shape[1:]],
            "device": str(device),
            "batch_size": batch_size,
            "warmup": warmup,
            "repeats": repeats,
            "compiled": compile,
            "time_limit": time_limit,
            "torch_threads": torch.get_num_threads(),
            "load_average_start": load_start,
            "cpu_count": _cpu_count(),
            "ratios": [float(r) for r in ratios],
            "methods": list(methods),
            "stats": {"metric": metric, "n_boot": n_boot, "seed": seed, "confidence": 0.95, "reference": "best ToMe at each ratio"},
            "versions": {**versions("numpy"), "git": _git_revision()},
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(time.perf_counter() - t_start, 1),
            "load_average_end": _loadavg(),
            **(setup or {}),
        },
        "base": ev.base,
        "rows": rows,
        "comparisons": _compare(rows, labels, ev.base, n_boot=n_boot, seed=seed),
        "labels": None if labels is None else [int(v) for v in labels.tolist()],
    }


_UNREDUCED = ("unreduced",)  # the unreduced model's key among the timed schedules


class _Evaluation:
    """The accuracy half of :func:`run_bench`: the unreduced reference (predictions once, reused for
    agreement), then one row per ``(method, ratio)``, each distinct schedule evaluated once.

    Attributes:
        base: The unreduced model's row.
        to_time: Every evaluated schedule by its key (``("unreduced",)``: None), for the timing rounds.
    """

    def __init__(
        self, model: nn.Module, images: torch.Tensor, labels: Optional[torch.Tensor], *, device: torch.device, batch_size: int, log: Log
    ) -> None:
        self.model, self.images, self.labels, self.device, self.batch_size, self.log = model, images, labels, device, batch_size, log
        self.info = ModelInfo.from_model(model)
        t0 = time.perf_counter()
        pred = predict(model, images, None, batch_size=batch_size, device=device, info=self.info)
        self.base_logits = pred.logits  # (N, K)
        scores = fidelity(pred.logits, pred.logits, labels)
        self.base: dict[str, Any] = {
            "method": "unreduced",
            "label": METHOD_LABELS["unreduced"],
            "ratio": 1.0,
            "status": "ok",
            "gflops": _round(self.info.base_macs / 1e9),
            "achieved_ratio": 1.0,
            "top1": _round(scores.get("top1")),
            "agreement": 1.0,
            "kl": 0.0,
            "ideal_speedup": 1.0,
            "pred": pred.logits.argmax(-1).tolist(),
            "_key": _UNREDUCED,
        }
        self.to_time: dict[tuple[Any, ...], Optional[Schedule]] = {_UNREDUCED: None}
        self._cache: dict[tuple[Any, ...], dict[str, Any]] = {}
        log(f"unreduced: top-1 {_pct(self.base['top1'])} ({time.perf_counter() - t0:.1f} s)")

    def row(self, method: str, ratio: float, searched: Optional[tuple[Path, Schedule]]) -> dict[str, Any]:
        """``method``'s row at ``ratio`` (``searched``: the ``--searched`` file matched to it, if any)."""
        row: dict[str, Any] = {"method": method, "label": METHOD_LABELS[method], "ratio": ratio}
        if method == "searched":
            if searched is None:
                return {**row, "status": "not run", "reason": "no --searched file for this ratio"}
            path, sched = searched
            row["file"] = str(path)
        else:
            try:
                sched = method_schedule(method, self.info, ratio)
            except UnreachableBudget as e:
                return {**row, "status": "unreachable", "reason": str(e).split(" — ")[0]}
        if sched.provenance.get("refit"):
            row["note"] = f"{METHOD_LABELS[method]} at {ratio:.0%}: the hand-set RAPID counts exceed the ratio for this method; {sched.provenance['refit']}"
        key = _schedule_key(sched)
        if key not in self._cache:
            self._cache[key] = self._measure(sched)
            self.to_time[key] = sched
        row.update(self._cache[key])
        ach = row["achieved_ratio"]
        row["status"] = "ok" if ach <= ratio + 1e-9 else "over-budget"
        if row["status"] == "over-budget":
            row["reason"] = f"achieves {ach:.1%} GFLOPs, above {ratio:.0%}"
        row["ideal_speedup"] = _round(1.0 / ach, 4)
        row["_key"] = key
        row["schedule"] = sched.to_dict()
        self.log(
            f"{ratio:.0%} {METHOD_LABELS[method]}: top-1 {_pct(row['top1'])}, {row['gflops']:.3f} GFLOPs "
            f"({ach:.1%}) ({row['seconds']:.1f} s)"
        )
        return row

    def _measure(self, sched: Schedule) -> dict[str, Any]:
        """Accuracy and cost of one schedule on the images."""
        t0 = time.perf_counter()
        pred = predict(self.model, self.images, sched, batch_size=self.batch_size, device=self.device, info=self.info)
        scores = fidelity(pred.logits, self.base_logits, self.labels)
        macs = float(pred.macs.mean())  # executed; equals the analytic cost for fixed counts
        return {
            "gflops": _round(macs / 1e9),
            "analytic_gflops": _round(schedule_macs(self.info, sched) / 1e9),
            "achieved_ratio": _round(macs / self.info.base_macs),
            "top1": _round(scores.get("top1")),
            "agreement": _round(scores["agreement"]),
            "kl": _round(scores["kl"]),
            "tokens": [round(float(v), 2) for v in pred.counts.double().mean(0)],
            "pred": pred.logits.argmax(-1).tolist(),
            "seconds": round(time.perf_counter() - t0, 2),
        }


def _time_schedules(
    model: nn.Module,
    schedules: dict[tuple[Any, ...], Optional[Schedule]],
    input_size: tuple[int, ...],
    *,
    device: torch.device,
    batch_size: int,
    warmup: int,
    repeats: int,
    compile: bool,
    time_limit: float,
    stable: float,
    log: Log,
) -> dict[tuple[Any, ...], Any]:
    """Every schedule's batch timed round-robin (:func:`~rapid_search.tools.measure.time_rounds`);
    compiled: each on its own copy of the model, compiled once before the rounds."""
    import copy

    from .measure import time_rounds
    from ..runtime.patch import apply

    x = torch.randn((batch_size, *input_size), generator=torch.Generator().manual_seed(0))
    x = x.to(device=device, dtype=next(model.parameters()).dtype)  # (B, C, H, W)
    runs: dict[tuple[Any, ...], Callable[[], Any]] = {}
    for k, sched in schedules.items():
        if compile:
            m = copy.deepcopy(model)
            if sched is not None and sched.reduces:
                apply(m, sched)
            runs[k] = (lambda c=torch.compile(m, dynamic=False): c(x))
        else:
            runs[k] = _eager_run(model, sched, x)
    try:
        return time_rounds(
            runs, device=device, repeats=repeats, warmup=max(1, warmup) if compile else warmup, batch_size=batch_size,
            time_limit=time_limit, stable=stable, log=log,
        )  # fmt: skip
    finally:
        if compile:
            torch._dynamo.reset()


def _add_timings(base: dict[str, Any], rows: Sequence[dict[str, Any]], timings: dict[tuple[Any, ...], Any]) -> None:
    """Write each row's timing, speed-up over the unreduced model, fraction of the ideal and flag
    (:func:`timing_flag`) into it, taking out its schedule key."""
    t_base = timings.get(_UNREDUCED)
    for row in [base, *rows]:
        key = row.pop("_key", None)
        t = timings.get(key) if key is not None else None
        if t is None or t_base is None or "achieved_ratio" not in row:
            continue
        row["median_ms"] = _round(t.median_ms, 3)
        row["iqr_ms"] = _round(t.iqr_ms, 3)
        row["images_per_s"] = _round(t.images_per_s, 2)
        row["speedup"] = _round(t_base.median_ms / t.median_ms, 4)
        row["speedup_of_ideal"] = _round(row["speedup"] * row["achieved_ratio"], 4)
        row["rounds"] = t.repeats
        flag = timing_flag(t, t_base, None if row is base else 1.0 / row["achieved_ratio"])
        if flag:
            row["timing_flag"] = flag


def timing_flag(t: Any, base: Any, ideal: Optional[float]) -> Optional[str]:
    """Why a timed row cannot be taken at face value, or None.

    ``"above ideal"``: its speed-up over ``base`` exceeds ``ideal`` by more than the two medians'
    uncertainty (timing noise, not the schedule); ``"spread too wide"``: the IQR of either
    timing is above :data:`WIDE_SPREAD` of its median.
    """
    if t.iqr_ms > WIDE_SPREAD * t.median_ms or base.iqr_ms > WIDE_SPREAD * base.median_ms:
        return "spread too wide"
    if ideal is not None:
        speed = base.median_ms / t.median_ms
        noise = speed * (median_ci(t.times_ms) + median_ci(base.times_ms))
        if speed - noise > ideal:
            return "above ideal"
    return None


def _eager_run(model: nn.Module, sched: Optional[Schedule], x: torch.Tensor) -> Callable[[], Any]:
    """One eager forward of ``model`` under ``sched`` (applied for the call, then removed)."""
    from ..runtime.patch import applied

    if sched is None or not sched.reduces:
        return lambda: model(x)

    def run() -> Any:
        with applied(model, sched):
            return model(x)

    return run


def _best_tome(rows: Sequence[dict[str, Any]], ratio: float, metric: str) -> Optional[dict[str, Any]]:
    """The ToMe row with the higher score at ``ratio`` (the lower cost on a tie)."""
    cands = [r for r in rows if r["ratio"] == ratio and r["method"] in TOME_VARIANTS and r["status"] == "ok"]
    if not cands:
        return None
    return max(cands, key=lambda r: (r[metric], -r["achieved_ratio"]))


def _compare(
    rows: Sequence[dict[str, Any]], labels: Optional[torch.Tensor], base: dict[str, Any], *, n_boot: int, seed: int
) -> list[dict[str, Any]]:
    """Paired statistics over the same images at each ratio.

    ``kind = "vs-best-tome"``: each :data:`COMPARED` method against the better ToMe variant.
    ``kind = "pair"``: each pair in :data:`PAIRS` (what importance protection, merging and the
    search add, and what is lost against the unreduced model; that pair only with labels, since
    without them the unreduced predictions are the truth).
    """
    truth = np.asarray(labels.numpy() if labels is not None else base["pred"])
    metric = "top1" if labels is not None else "agreement"
    out: list[dict[str, Any]] = []

    def add(kind: str, a: dict[str, Any], b: dict[str, Any]) -> None:
        cmp = compare_paired(np.asarray(a["pred"]) == truth, np.asarray(b["pred"]) == truth, n_boot=n_boot, seed=seed)
        out.append({"kind": kind, "ratio": a["ratio"], "method": a["method"], "reference": b["method"], "metric": metric, **cmp.to_dict()})

    for ratio in sorted({r["ratio"] for r in rows}, reverse=True):
        at = {r["method"]: r for r in rows if r["ratio"] == ratio and "pred" in r}
        if labels is not None:
            at["unreduced"] = base
        ref = _best_tome(rows, ratio, metric)
        if ref is not None:
            for m in COMPARED:
                if m in at:
                    add("vs-best-tome", at[m], ref)
        for m, other in PAIRS:
            if m in at and other in at:
                add("pair", at[m], at[other])
    return out


def _cpu_count() -> Optional[int]:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _loadavg() -> Optional[list[float]]:
    """1/5/15-minute load averages (other processes competing for the CPU), where the OS has them."""
    try:
        import os

        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _git_revision() -> str:
    """Commit of the package's checkout, ``+dirty`` when rapid_search/ has local changes (read-only git)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--", "rapid_search"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ---- writers -----------------------------------------------------------------------------------
def _pct(v: Optional[float], nd: int = 1) -> str:
    return "—" if v is None else f"{100 * v:.{nd}f}%"


def _num(v: Optional[float], fmt: str) -> str:
    return "—" if v is None else format(v, fmt)


def _ips(row: dict[str, Any]) -> str:
    """Images/s with the spread of the timed batches (IQR as a percentage of the median time)."""
    if row.get("images_per_s") is None:
        return "—"
    if row.get("iqr_ms") is None or not row.get("median_ms"):
        return f"{row['images_per_s']:.1f}"
    return f"{row['images_per_s']:.1f} ({100 * row['iqr_ms'] / row['median_ms']:.0f}%)"


def write_json(result: dict[str, Any], path: Union[str, Path]) -> Path:
    """Write the full result (every number, per-image predictions, schedules) as JSON, atomically."""
    return atomic_write_text(path, json.dumps(result, indent=1) + "\n")


def _cmp_cell(result: dict[str, Any], row: dict[str, Any]) -> tuple[str, str]:
    for c in result["comparisons"]:
        if c.get("kind", "vs-best-tome") == "vs-best-tome" and c["ratio"] == row["ratio"] and c["method"] == row["method"]:
            label = METHOD_LABELS[c["reference"]]
            ref = label[len("ToMe (") : -1] if label.startswith("ToMe (") else label
            diff = f"{100 * c['diff']:+.1f} [{100 * c['ci_low']:+.1f}, {100 * c['ci_high']:+.1f}] vs {ref}"
            p = f"{c['p_value']:.3f}" if c["p_value"] >= 0.001 else f"{c['p_value']:.1e}"
            return diff, p + (" *" if c["significant"] else "")
    return "", ""


def markdown_table(result: dict[str, Any]) -> str:
    """The benchmark as a markdown document (setup, table, reading notes)."""
    s, base = result["setup"], result["base"]
    metric = s["stats"]["metric"]
    lines = [
        f"# {result['model']}: accuracy vs cost",
        "",
        f"{s['images']} evaluation images ({s.get('data', 'given tensors')}), calibration folder "
        f"{s.get('calib') or '—'}; device {s['device']}, {s.get('dtype', 'float32')}, batch {s['batch_size']}, "
        f"torch threads: {s['torch_threads']}. Timing{' (torch.compile)' if s.get('compiled') else ''}: at least {s['repeats']} interleaved rounds "
        f"(one batch of every schedule per round; more until every median's 95% interval is within {100 * STABLE_CI:g}% or "
        f"{s.get('time_limit', 60):g} s passed; ⚠ marks a speed-up above the ideal beyond noise or an IQR above {100 * WIDE_SPREAD:g}%), "
        f"after {s['warmup']} warm-up batches each), median per schedule, IQR of the batch times in % of the median"
        + (
            f"; CPU load average (1 min) {s['load_average_start'][0]:.1f} at the start, {s['load_average_end'][0]:.1f} at the end "
            f"on {s.get('cpu_count', '?')} cores."
            if s.get("load_average_start") and s.get("load_average_end")
            else "."
        ),
        "",
        f"GFLOPs = analytic MACs x 1e-9 (same cost model for every method); unreduced {result['info']['base_gflops']:.3f} GFLOPs. "
        "Speedup = unreduced median batch time / this schedule's; '% of ideal' = speedup / (unreduced GFLOPs / GFLOPs).",
        f"Δ vs best ToMe: top-1 difference in points with its paired-bootstrap 95% CI ({s['stats']['n_boot']} resamples, seed "
        f"{s['stats']['seed']}); p: exact McNemar, * = p < 0.05.",
        "",
        "| target | method | GFLOPs (of unreduced) | top-1 | agree | img/s (IQR) | speedup | % of ideal | Δ top-1 vs best ToMe [95% CI] | p |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| 100% | **unreduced** | {base['gflops']:.3f} (100%) | {_pct(base['top1'])} | 100% | {_ips(base)} | {'1.00x' if base.get('median_ms') else '—'} | — | | |",
    ]
    for row in result["rows"]:
        target = f"{100 * row['ratio']:g}%"
        name = row["label"]
        if row["status"] in ("unreachable", "not run"):
            lines.append(f"| {target} | {name} | *{row['status']}* ({row['reason']}) | — | — | — | — | — | | |")
            continue
        flag = " ⚠ over budget" if row["status"] == "over-budget" else ""
        if row.get("note"):
            name += " †"
        diff, p = _cmp_cell(result, row)
        if row["method"] in ("rapid", "searched"):
            name = f"**{name}**"
        lines.append(
            f"| {target} | {name} | {row['gflops']:.3f} ({_pct(row['achieved_ratio'])}){flag} | {_pct(row['top1'])} | "
            f"{_pct(row['agreement'])} | {_ips(row)} | {_num(row.get('speedup'), '.2f')}x | "
            f"{_pct(row.get('speedup_of_ideal'), 0)}{' ⚠ ' + row['timing_flag'] if row.get('timing_flag') else ''} | {diff} | {p} |"
        )
    pairs = [c for c in result["comparisons"] if c.get("kind") == "pair"]
    if pairs:
        lines += [
            "",
            "Other paired comparisons (same images; Δ = first minus second, points, paired-bootstrap 95% CI; exact McNemar p; "
            "b/c = images only the first/second gets right):",
            "",
            "| target | comparison | Δ top-1 [95% CI] | b / c | p |",
            "|---|---|---|---|---|",
        ]
        for c in pairs:
            p = f"{c['p_value']:.3f}" if c["p_value"] >= 0.001 else f"{c['p_value']:.1e}"
            lines.append(
                f"| {100 * c['ratio']:g}% | {METHOD_LABELS[c['method']]} vs {METHOD_LABELS[c['reference']]} | "
                f"{100 * c['diff']:+.1f} [{100 * c['ci_low']:+.1f}, {100 * c['ci_high']:+.1f}] | {c['b']} / {c['c']} | "
                f"{p}{' *' if c['significant'] else ''} |"
            )
    notes = list(s.get("notes") or [])
    notes += [f"† {row['note']}" for row in result["rows"] if row.get("note")]
    if notes:
        lines += ["", "Notes:"] + [f"- {n}" for n in notes]
    if metric != "top1":
        lines += ["", "The images are unlabelled: 'top-1' statistics use agreement with the unreduced model instead."]
    v = s.get("versions", {})
    lines += [
        "",
        f"Reproduce: `{s.get('command', '(python API)')}`",
        "",
        f"Code: rapid-search {v.get('rapid_search', '?')} (git {v.get('git', '?')}), torch {v.get('torch', '?')}, timm {v.get('timm', '?')}; "
        f"run took {s.get('seconds', 0):.0f} s on {s.get('date', '?')}.",
        "",
    ]
    return "\n".join(lines)


def write_markdown(result: dict[str, Any], path: Union[str, Path]) -> Path:
    """Write :func:`markdown_table` atomically."""
    return atomic_write_text(path, markdown_table(result))


_STYLE: dict[str, tuple[str, str, str]] = {  # colour, marker, line style
    "tome": ("#1f77b4", "o", "-"),
    "tome-decreasing": ("#17becf", "v", "--"),
    "tome-inflect-0.5": ("#aec7e8", "<", "--"),
    "tofu": ("#9467bd", "s", "-."),
    "evit": ("#8c564b", "D", ":"),
    "rapid": ("#d62728", "^", "-"),
    "searched": ("#ff7f0e", "*", "-"),
}


def plot_pareto(result: dict[str, Any], path: Union[str, Path], *, dpi: int = 150) -> Path:
    """Plot top-1 (or agreement) against achieved GFLOPs, one line per method, to ``path`` (atomically, in the format of its ending).

    The unreduced model is a horizontal reference line (and a point at its GFLOPs); methods
    that do not reach a ratio simply have no point there.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..outputs import save_figure

    metric = result["setup"]["stats"]["metric"]
    base = result["base"]
    fig, ax = plt.subplots(figsize=(7.5, 5.0))
    ref = base[metric] if base.get(metric) is not None else 1.0
    ax.axhline(100 * ref, color="0.35", ls="--", lw=1.2, label=f"unreduced ({100 * ref:.1f}%, {base['gflops']:.2f} GFLOPs)", zorder=1)
    ax.plot([base["gflops"]], [100 * ref], marker="o", color="0.2", ms=7, zorder=3)
    for method in result["setup"]["methods"]:
        pts = sorted(
            (r["gflops"], 100 * r[metric]) for r in result["rows"] if r["method"] == method and r["status"] in ("ok", "over-budget")
        )
        if not pts:
            continue
        colour, marker, ls = _STYLE.get(method, ("k", "o", "-"))
        xs, ys = zip(*pts)
        lw = 2.2 if method in ("rapid", "searched") else 1.4
        ax.plot(xs, ys, marker=marker, ls=ls, color=colour, lw=lw, ms=6, label=METHOD_LABELS[method], zorder=4 if lw > 2 else 2)
    ax.set_xlabel("GFLOPs per image (analytic MACs x 1e-9)")
    ax.set_ylabel("top-1 accuracy (%)" if metric == "top1" else "agreement with unreduced (%)")
    s = result["setup"]
    ax.set_title(f"{result['model']}: {metric.replace('top1', 'top-1')} vs cost ({s['images']} eval images)", fontsize=11)
    ax.grid(True, alpha=0.3)
    secax = ax.secondary_xaxis("top", functions=(lambda g: 100 * g / base["gflops"], lambda p: p * base["gflops"] / 100))
    secax.set_xlabel("% of unreduced GFLOPs", fontsize=9)
    ax.legend(loc="lower right", fontsize=8.5, framealpha=0.9)
    missing = [f"{METHOD_LABELS[r['method']]} at {100 * r['ratio']:g}%" for r in result["rows"] if r["status"] == "unreachable"]
    caption = []
    if missing:
        caption.append("unreachable (no point): " + "; ".join(missing[:4]) + (f"; +{len(missing) - 4} more" if len(missing) > 4 else ""))
    never = [m for m in result["setup"]["methods"] if all(r["status"] == "not run" for r in result["rows"] if r["method"] == m)]
    if never:
        caption.append("not run: " + ", ".join(METHOD_LABELS[m] for m in never))
    if caption:
        fig.text(0.01, 0.01, "   |   ".join(caption), fontsize=7.5, color="0.3")
    fig.tight_layout(rect=(0, 0.03 if caption else 0, 1, 1))
    try:
        return save_figure(fig, path, dpi=dpi)
    finally:
        plt.close(fig)


def write_outputs(result: dict[str, Any], out_dir: Union[str, Path]) -> dict[str, Path]:
    """Write ``table.md``, ``results.json`` and ``pareto.png`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return {
        "table": write_markdown(result, out / "table.md"),
        "json": write_json(result, out / "results.json"),
        "plot": plot_pareto(result, out / "pareto.png"),
    }


# ---- command line ------------------------------------------------------------------------------
_positive_int = int_in(1, 10**9)
_nonneg_int = int_in(0, 10**9)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``rapid-search bench``."""
    parser.add_argument("--model", default="deit_tiny_patch16_224", help="timm model name (default: deit_tiny_patch16_224)")
    parser.add_argument("--data", type=Path, required=True, help="evaluation images (ImageFolder of WordNet-id folders); never the calibration images")
    parser.add_argument("--calib", type=Path, default=None, help="calibration folder the searched schedules used; checked to share no image with --data")
    parser.add_argument("--ratios", type=parse_ratios, default=DEFAULT_RATIOS, help="GFLOPs ratios in percent (default: 90,70,50,40,35,30)")
    parser.add_argument("--searched", type=Path, nargs="*", default=[], metavar="PATH", help="searched schedule YAMLs; each is used for the ratio its budget.achieved.ratio is within 1 point of")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--batch-size", type=_positive_int, default=32, help="batch size for evaluation and timing (default: 32)")
    parser.add_argument("--limit", type=_positive_int, default=None, help="evaluate on at most N images (a seeded subset)")
    parser.add_argument("--out-dir", type=Path, default=None, help="output folder (default: benchmarks/<model>)")
    parser.add_argument("--warmup", type=_nonneg_int, default=2, help="untimed warm-up batches per schedule (default: 2)")
    parser.add_argument("--repeats", type=_nonneg_int, default=5, help="timing rounds at least, each timing one batch of every schedule (interleaved; more until stable, see --time-limit); median reported; 0 skips timing (default: 5)")
    parser.add_argument("--n-boot", type=_positive_int, default=10_000, help="bootstrap resamples (default: 10000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the image subset and the bootstrap (default: 0)")
    parser.add_argument("--threads", type=_positive_int, default=None, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="precision the models run and are timed in (default: float32)")
    parser.add_argument("--time-limit", type=_nonneg_int, default=60, metavar="S", help="seconds of timing rounds after --repeats, while medians are not yet stable (default: 60)")
    parser.add_argument("--compile", action="store_true", help="time every schedule compiled with torch.compile (dynamic=False); evaluation stays eager")
    parser.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True, help="load timm's pretrained weights (default: on)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="local weights file instead of timm's pretrained weights")
    parser.add_argument("--quiet", action="store_true", help="print only the output paths")


def main(args: argparse.Namespace) -> int:
    """Run ``rapid-search bench``; returns the exit status."""
    from .data import load_images
    from .loading import load_model
    from .measure import parse_device, set_cpu_threads

    log: Log = (lambda _m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    device = parse_device(args.device)
    set_cpu_threads(args.threads)
    if not Path(args.data).is_dir():
        what = "is not a directory" if Path(args.data).exists() else "does not exist"
        raise BenchError(f"evaluation folder {args.data} {what} — pass --data with an ImageFolder tree")
    if args.calib is not None and Path(args.calib).resolve() == Path(args.data).resolve():
        raise BenchError("--calib and --data are the same folder — evaluate on images the search never saw")
    model = load_model(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint, device=device, dtype=args.dtype)
    info = ModelInfo.from_model(model)
    _check_outputs(args.out_dir or Path("benchmarks") / info.name, args)
    notes: list[str] = []
    searched, more = match_searched(args.searched, info, args.ratios)
    notes += more
    for path, sched in searched.values():
        _check_provenance(sched, path, Path(args.data))
    t0 = time.perf_counter()
    imgs = load_images(args.data, model=model, limit=args.limit, seed=args.seed)
    log(f"decoded {len(imgs.images)} images from {args.data} in {time.perf_counter() - t0:.1f} s ({len(imgs.skipped)} skipped)")
    n_calib = None
    if args.calib is not None:
        n_calib = check_disjoint(args.calib, imgs.paths)
    if imgs.labels is None:
        notes.append("evaluation images carry no labels: statistics use agreement with the unreduced model")
    setup = {
        "data": str(args.data),
        "calib": None if args.calib is None else str(args.calib),
        "calib_images": n_calib,
        "skipped": len(imgs.skipped),
        "limit": args.limit,
        "searched": {f"{r:g}": str(p) for r, (p, _) in searched.items()},
        "notes": notes,
        "dtype": args.dtype,
        "command": _command(args),
    }
    result = run_bench(
        model,
        imgs.images,
        imgs.labels,
        ratios=args.ratios,
        searched=searched,
        device=device,
        batch_size=args.batch_size,
        warmup=args.warmup,
        repeats=args.repeats,
        compile=args.compile,
        time_limit=args.time_limit,
        n_boot=args.n_boot,
        seed=args.seed,
        setup=setup,
        log=log,
    )
    out_dir = args.out_dir or Path("benchmarks") / info.name
    paths = write_outputs(result, out_dir)
    if not args.quiet:
        print(markdown_table(result))
    for p in paths.values():
        print(f"wrote {p}")
    return 0


def _check_outputs(out_dir: Path, args: argparse.Namespace) -> None:
    """Refuse, before the benchmark, output files (:func:`write_outputs`) that are inputs of
    this command or not regular files."""
    from ..outputs import check_output

    reads = [("the --checkpoint file", args.checkpoint)] + [("a --searched schedule", p) for p in args.searched]
    for name in ("table.md", "results.json", "pareto.png"):
        check_output(Path(out_dir) / name, option="--out-dir", reads=reads, data=[args.data, args.calib])


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run."""
    parts = ["rapid-search", "bench", "--model", args.model, "--data", str(args.data)]
    if args.calib is not None:
        parts += ["--calib", str(args.calib)]
    parts += ["--ratios", ",".join(f"{100 * r:g}" for r in args.ratios)]
    if args.searched:
        parts += ["--searched", *map(str, args.searched)]
    parts += ["--device", args.device, "--batch-size", str(args.batch_size), "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
    parts += ["--n-boot", str(args.n_boot), "--seed", str(args.seed)]
    if args.limit is not None:
        parts += ["--limit", str(args.limit)]
    if args.threads is not None:
        parts += ["--threads", str(args.threads)]
    if getattr(args, "dtype", "float32") != "float32":
        parts += ["--dtype", args.dtype]
    if getattr(args, "compile", False):
        parts.append("--compile")
    if getattr(args, "time_limit", 60) != 60:
        parts += ["--time-limit", str(args.time_limit)]
    if not args.pretrained:
        parts.append("--no-pretrained")
    if args.checkpoint is not None:
        parts += ["--checkpoint", str(args.checkpoint)]
    if args.out_dir is not None:
        parts += ["--out-dir", str(args.out_dir)]
    return shlex.join(parts)
