"""The Optuna study: search a RAPID schedule under a FLOPs or measured-latency budget.

Cost of a trial: the calibration images are decoded once per process and the unreduced
model's logits computed once, so a completed trial costs about one reduced forward pass over
the calibration images. Hopeless trials are stopped early: each trial reports its score on
growing prefixes of the calibration set (rungs) and Optuna's ``MedianPruner`` stops it when it
is below the median of earlier trials at the same rung.

The budget is a constraint, not a penalty: each sampled shape is projected onto the budget (its
scale solved so its cost meets the target), and the cost that is only known after running
(threshold schedules' measured mean per-image MACs) is recorded with ``trial.set_constraint``,
so infeasible trials are never chosen.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import optuna
import torch
from optuna.trial import TrialState

from ..tools.evaluate import fidelity, metric_value, predict
from ..runtime.flops import ModelInfo, schedule_macs
from ..runtime.presets import DEFAULT_MERGED_NORM, DEFAULT_PROTECT, DEFAULT_PRUNE_BLOCKS, DEFAULT_SIMILARITY, DEFAULT_SWITCH_FRACTION, TOME_DECREASING, make_schedule, tome_fitting
from ..runtime.schedule import Budget, LayerSpec, Schedule
from .budget import Target
from .space import SearchSpace, layers_for, project
from ..errors import RapidSearchError

__all__ = ["SearchError", "Objective", "Calibration", "cheapest", "LATENCY_MARGIN", "export_best", "feasible_trials", "latency_correction", "saving_correction", "corrected_ms", "trial_schedule"]


class SearchError(RapidSearchError, ValueError):
    """A search could not start or finish; the message says what to do."""


@dataclass
class Calibration:
    """Calibration images and the unreduced model's outputs on them (computed once).

    Attributes:
        images: ``(N, 3, H, W)`` preprocessed images.
        labels: ``(N,)`` ImageNet indices or None.
        base_logits: ``(N, K)`` unreduced logits.
        base_scores: Scores of the unreduced model (top-1 when labelled).
        base_seconds: Wall time of one unreduced forward pass over the images.
    """

    images: torch.Tensor
    labels: Optional[torch.Tensor]
    base_logits: torch.Tensor
    base_scores: dict[str, float]
    base_seconds: float

    def rungs(self, n_rungs: int) -> list[tuple[int, int]]:
        """Growing prefixes of the calibration set: ``[(0, n/4), (n/4, n/2), (n/2, n)]`` for 3."""
        n = len(self.images)
        cuts = [0] + [max(1, round(n / 2 ** (n_rungs - 1 - k))) for k in range(n_rungs)]
        cuts[-1] = n
        return [(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


def cheapest(info: ModelInfo, space: SearchSpace, cost: Optional[Callable[[list[LayerSpec]], float]] = None) -> tuple[float, list[LayerSpec]]:
    """``(ratio, layers)``: the lowest cost, relative to the unreduced model, that the space's extreme
    shapes reach, and the layers reaching it."""
    cost = cost or (lambda layers: float(schedule_macs(info, layers)))
    extremes = itertools.product(
        {space.switch.low, space.switch.high}, {space.prune_weight.low, space.prune_weight.high, 1.0}, {space.decay.low, space.decay.high, 0.0},
        {space.prune_span.low, space.prune_span.high},
    )
    shapes = [{"switch": round(sw * info.depth), "prune_weight": pw, "decay": dc, "prune_span": ps, "protect": space.protect.low} for sw, pw, dc, ps in extremes]
    best = min((layers_for(info, shape, 1e6) for shape in shapes), key=cost)  # every count at its cap
    return cost(best) / cost([LayerSpec()] * info.depth), best


def trial_schedule(trial: optuna.trial.FrozenTrial) -> Schedule:
    """The schedule a trial evaluated (stored in its user attributes)."""
    data = trial.user_attrs.get("schedule")
    if data is None:
        raise SearchError(f"trial {trial.number} has no stored schedule — it did not get past sampling")
    return Schedule.from_dict(data)


#: A threshold schedule whose mean cost on the first rung (a quarter of the calibration images)
#: still exceeds the budget by more than this fraction after fitting is not scored further: the
#: whole set's mean would not meet it either (the per-rung mean differs by well under 1%).
FIRST_RUNG_SLACK = 0.02

#: Latency budgets: schedules are drawn up to ``target * (1 - margin)`` of *predicted* latency,
#: where ``margin`` is the run-to-run spread of the unreduced model's timing (IQR / median),
#: clamped to this range. Drawn right up to the target, a schedule's final re-measurement (the
#: median of repeated runs) lands above it about half the time; the margin keeps it below.
LATENCY_MARGIN = (0.02, 0.10)

#: Latency budgets: the learned correction (measured / predicted saving) is kept within this range.
LATENCY_CORRECTION = (0.5, 2.0)


def latency_correction(study: optuna.Study, base_ms: float, default: float = 1.0) -> float:
    """:func:`saving_correction` over the study's trials timed on the device so far: later projections
    predict ``base_ms - c * (base_ms - predicted)`` and so learn the latency model's error, which is in
    what a reduction saves and mostly systematic (why: docs/search-design.md, latency model)."""
    timed = [
        (t.user_attrs["measured_ms"], t.user_attrs["model_ms"])
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        if "measured_ms" in t.user_attrs and "model_ms" in t.user_attrs
    ]
    return saving_correction(base_ms, timed, default)


def saving_correction(base_ms: float, timed: Sequence[tuple[float, float]], default: float = 1.0) -> float:
    """The median of measured / predicted saving against ``base_ms`` over ``(measured_ms, model_ms)``
    pairs, leaving out those predicted to save under 2% (nothing to compare), clamped to
    :data:`LATENCY_CORRECTION`; ``default`` when none is left."""
    ratios = [(base_ms - measured) / (base_ms - model) for measured, model in timed if base_ms - model > 0.02 * base_ms]
    lo, hi = LATENCY_CORRECTION
    return min(hi, max(lo, float(np.median(ratios)))) if ratios else default


def corrected_ms(predicted_ms: float, base_ms: float, correction: float) -> float:
    """A prediction with its saving against ``base_ms`` scaled by ``correction`` (see :func:`latency_correction`)."""
    return base_ms - correction * (base_ms - predicted_ms)


#: Range budgets: the hand-set schedule is a warm start at this many budgets spread over the
#: range (what a trial's gain is measured against; and for any budget a hand-set schedule close below it).
HAND_SET_LEVELS = 9

#: Warm-start ToMe schedules: constant ``r`` and the paper's decreasing ``(r, -1)``.
TOME_INFLECT = {"tome": 0.0, "tome-decreasing": TOME_DECREASING}


def hand_params(info: ModelInfo) -> dict[str, Any]:
    """The hand-set RAPID schedule as trial parameters (a warm start, and the range baseline); its
    ``prune_span`` applies where the space searches it (else the space's own is used)."""
    switch = round(info.depth * DEFAULT_SWITCH_FRACTION)
    return {"switch": switch, "prune_weight": 1.0, "prune_span": min(DEFAULT_PRUNE_BLOCKS, switch) / switch if switch else 1.0,
            "decay": 0.0, "protect": DEFAULT_PROTECT,
            "prune_threshold_mode": "off", "merge_threshold_mode": "off", "merged_norm": DEFAULT_MERGED_NORM,
            "similarity": DEFAULT_SIMILARITY}


def project_hand_set(
    info: ModelInfo, shape: dict[str, Any], target: float, *, cost: Optional[Callable[[list[LayerSpec]], float]] = None
) -> tuple[Optional[tuple[list[LayerSpec], float]], dict[str, Any]]:
    """:func:`project` of the hand-set shape (:func:`hand_params`) with, as ``rapid_schedule`` does,
    as many more prune blocks (``prune_span`` widened, up to the switch) as a budget below its reach
    needs; returns the projection (None where even pruning every block before the switch misses
    ``target``) and the shape projected."""
    switch = int(shape["switch"])
    first = round(float(shape.get("prune_span", 1.0)) * switch)
    for stop in range(first, max(first, switch) + 1):
        wider = shape if stop == first else {**shape, "prune_span": stop / switch}
        res = project(info, wider, target, cost=cost)
        if res is not None:
            return res, wider
    return None, shape


class Objective:
    """The Optuna objective: sample, project onto ``budget`` (a range: each trial's target drawn in it,
    or ``at`` for every trial when refining a range study), score on calibration rungs."""

    def __init__(
        self,
        *,
        model: torch.nn.Module,
        info: ModelInfo,
        space: SearchSpace,
        calib: Calibration,
        metric: str,
        budget: Target,
        device: torch.device,
        batch_size: int,
        n_rungs: int = 3,
        latency_model: Any = None,
        measure_ms: Optional[Callable[[Schedule], float]] = None,
        correction: float = 1.0,
        margin: float = 0.0,
        at: Optional[float] = None,
    ) -> None:
        self.model, self.info, self.space, self.calib, self.metric = model, info, space, calib, metric
        self.target, self.lo, self.cost_kind, self.at = budget.cost, budget.lo_cost, budget.spec.kind, at  # in cost-model units
        # schedules are drawn up to ``target * (1 - margin)``; the constraint stays ``target`` (see LATENCY_MARGIN)
        self.margin = margin
        self.device, self.batch_size = device, batch_size
        # latency budgets: ``measure_ms`` times a trial's schedule on the device (None: predictions
        # only, e.g. compiled); predictions are rescaled by the study's ``latency_correction`` (``correction`` before any)
        self.latency_model, self.measure_ms, self.correction, self.first_correction = latency_model, measure_ms, correction, correction
        self.rungs = calib.rungs(n_rungs)

    # cost of a layer list in the budget's units (analytic MACs or predicted ms)
    def cost(self, layers: list[LayerSpec]) -> float:
        if self.cost_kind == "latency":
            return corrected_ms(float(self.latency_model.predict_ms(layers)), self.latency_model.base_ms, self.correction)
        return float(schedule_macs(self.info, layers))

    def _trial_target(self, trial: optuna.trial.Trial) -> float:
        """The trial's target: the budget, or for a range a point in it, evenly spread over trial
        numbers (golden-ratio sequence; warm starts carry theirs as ``range_frac``)."""
        if self.lo is None:
            return self.target
        u = trial.user_attrs.get("range_frac", (0.5 + trial.number * 0.6180339887498949) % 1.0)
        t = self.lo + float(u) * (self.target - self.lo) if self.at is None or "range_frac" in trial.user_attrs else self.at
        trial.set_user_attr("target", t)
        return t

    def _gain(self, trial: optuna.trial.Trial, step: int, t: float, raw: float) -> float:
        """What the sampler and the pruner see: the score, or for a range budget its gain over the
        hand-set RAPID schedule at the trial's own target (interpolated between the hand-set warm
        starts, read from the study), so that shapes are compared by what they add at their
        budget, not by the budget."""
        if self.lo is None:
            return raw
        if trial.user_attrs.get("warm_start") == "rapid-hand-set":
            return 0.0
        ref = sorted(
            (h.user_attrs["target"], h.user_attrs["rung_scores"][step])
            for h in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if h.user_attrs.get("warm_start") == "rapid-hand-set" and len(h.user_attrs.get("rung_scores", ())) > step
        )
        return raw - (float(np.interp(t, [r[0] for r in ref], [r[1] for r in ref])) if ref else 0.0)

    def _schedule(self, trial: optuna.trial.Trial, aim: float) -> tuple[Optional[Schedule], Optional[dict[str, Any]]]:
        """Sample (or take the warm-start) schedule and project it onto the budget."""
        warm = trial.user_attrs.get("warm_start")
        if warm in TOME_INFLECT:
            return tome_fitting(self.info, lambda layers: self.cost(list(layers)) <= aim, inflect=TOME_INFLECT[warm]), None
        shape = self.space.suggest(trial, self.info.depth)
        if warm == "rapid-hand-set":
            res, shape = project_hand_set(self.info, shape, aim, cost=self.cost)
            return (None if res is None else make_schedule(self.info, res[0], method=warm, **shape)), shape
        return self._project(shape, aim, method=warm or "rapid-search"), shape

    def _project(self, shape: dict[str, Any], target: float, *, method: str) -> Optional[Schedule]:
        res = project(self.info, shape, target, cost=self.cost)
        if res is None:
            return None
        return make_schedule(self.info, res[0], method=method, **shape)

    def _predict(self, schedule: Schedule, a: int, b: int) -> Any:
        return predict(self.model, self.calib.images[a:b], schedule, batch_size=self.batch_size, device=self.device, info=self.info)

    def _fit_thresholds(self, schedule: Schedule, shape: dict[str, Any], first: tuple[int, int], target: float) -> tuple[Schedule, Any]:
        """Threshold schedules remove fewer tokens than their counts allow, so their measured cost
        exceeds the projection. Measure the first rung, then re-project with the planned reduction
        scaled by the fraction actually achieved (at most twice)."""
        base = float(self.info.base_macs)
        a, b = first
        for _ in range(3):
            p = self._predict(schedule, a, b)
            measured, planned = float(p.macs.mean()), float(schedule_macs(self.info, schedule))
            achieved = (base - measured) / max(base - planned, 1.0)  # fraction of the planned reduction
            if measured <= target or achieved < 0.05:
                break
            fitted = self._project(shape, base - (base - target) / achieved, method=schedule.provenance.get("method", "rapid-search"))
            if fitted is None:
                break
            schedule = fitted
        return schedule, p

    def _run(self, trial: optuna.trial.Trial, schedule: Schedule, first: Any, t: float) -> tuple[dict[str, float], float, float]:
        """Score ``schedule`` rung by rung; returns final scores, mean cost and forward seconds."""
        logits, macs, seconds, raws = [], [], 0.0, []
        c = self.calib
        reference = self.lo is not None and trial.user_attrs.get("warm_start") == "rapid-hand-set"  # a range's yardstick runs whole
        for step, (a, b) in enumerate(self.rungs):
            p = first if step == 0 and first is not None else self._predict(schedule, a, b)
            trial.set_user_attr("images_forwarded", b)
            logits.append(p.logits)
            macs.append(p.macs)
            seconds += p.seconds
            scores = fidelity(torch.cat(logits), c.base_logits[:b], None if c.labels is None else c.labels[:b])
            raws.append(metric_value(scores, self.metric))
            if step < len(self.rungs) - 1:
                trial.report(self._gain(trial, step, t, raws[-1]), step)
                if trial.should_prune() and not reference:
                    trial.set_user_attr("forward_s", seconds)
                    raise optuna.TrialPruned()
        trial.set_user_attr("rung_scores", raws)
        return scores, float(torch.cat(macs).mean()), seconds

    def _time_on_device(self, trial: optuna.trial.Trial, schedule: Schedule, target: float) -> Optional[float]:
        """Latency budgets: time the trial's schedule on the device; a trial over the target is pruned."""
        model_ms = float(self.latency_model.predict_ms(schedule))
        trial.set_user_attr("predicted_ms", corrected_ms(model_ms, self.latency_model.base_ms, self.correction))
        if self.measure_ms is None:
            return None
        measured = float(self.measure_ms(schedule))
        _record(trial, model_ms=model_ms, measured_ms=measured)
        if measured > target:
            trial.set_constraint("budget", (measured - target) / target)
            raise optuna.TrialPruned(f"over budget when timed ({measured:.2f} ms)")
        return measured

    def __call__(self, trial: optuna.trial.Trial) -> float:
        t0 = time.perf_counter()
        target = self._trial_target(trial)
        if self.cost_kind == "latency":
            self.correction = latency_correction(trial.study, self.latency_model.base_ms, self.first_correction)
        schedule, shape = self._schedule(trial, target * (1.0 - self.margin))
        if schedule is None:
            if self.measure_ms is not None and shape is not None:  # predicted out of reach: time its fastest, to learn from
                fastest = make_schedule(self.info, layers_for(self.info, shape, 1e6), method="fastest")
                _record(trial, model_ms=float(self.latency_model.predict_ms(fastest)), measured_ms=float(self.measure_ms(fastest)))
            trial.set_constraint("budget", 1.0)
            raise optuna.TrialPruned("no schedule of this shape meets the budget")
        first = None
        if schedule.has_threshold and self.cost_kind == "gflops" and shape is not None:
            schedule, first = self._fit_thresholds(schedule, shape, self.rungs[0], target)
            measured = float(first.macs.mean())
            if measured > target * (1 + FIRST_RUNG_SLACK):  # thresholds block the reduction: hopeless
                _record(trial, schedule=schedule.to_dict(), gflops=measured / 1e9, images_forwarded=self.rungs[0][1])
                trial.set_constraint("budget", (measured - target) / target)
                raise optuna.TrialPruned(f"over budget on the first rung ({measured / 1e9:.3f} GFLOPs) after fitting thresholds")
        _record(trial, schedule=schedule.to_dict(), analytic_gflops=schedule_macs(self.info, schedule) / 1e9)
        measured = self._time_on_device(trial, schedule, target) if self.cost_kind == "latency" else None
        scores, mean_macs, fwd = self._run(trial, schedule, first, target)
        score = metric_value(scores, self.metric)  # a range study's value is its gain (see _gain)
        _record(trial, gflops=mean_macs / 1e9, **scores, forward_s=fwd, trial_s=time.perf_counter() - t0, score=score)
        cost = mean_macs if self.cost_kind == "gflops" else (measured if measured is not None else trial.user_attrs["predicted_ms"])
        trial.set_constraint("budget", (cost - target) / target)
        return self._gain(trial, len(self.rungs) - 1, target, score)


def _record(trial: optuna.trial.Trial, **attrs: Any) -> None:
    for k, v in attrs.items():
        trial.set_user_attr(k, v)


def feasible_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Completed trials that meet the budget, best first."""
    done = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.value is not None and all(v <= 0 for v in t.constraints.values()) and "schedule" in t.user_attrs
    ]
    return sorted(done, key=lambda t: (-t.user_attrs.get("score", t.value), t.number))


def export_best(
    study: optuna.Study,
    out: Path,
    *,
    budget: Budget,
    extra_scores: Optional[dict[str, Any]] = None,
    provenance: Optional[dict[str, Any]] = None,
    accept: Optional[Callable[[Schedule], Optional[dict[str, Any]]]] = None,
    max_candidates: int = 5,
    max_gflops: Optional[float] = None,
    max_target: Optional[float] = None,
) -> tuple[Schedule, optuna.trial.FrozenTrial]:
    """Write the best feasible trial's schedule to ``out`` (atomically).

    Args:
        study: The study.
        out: Output YAML path.
        budget: Budget to record (``achieved`` is filled in from the trial).
        extra_scores: Scores to add (e.g. the unreduced model's calibration score).
        provenance: Provenance to add.
        accept: A final check of a candidate (e.g. re-measured latency): extra ``achieved`` fields,
            or None to try the next-best trial (at most ``max_candidates``).
        max_gflops: Only trials whose measured GFLOPs are at most this (export for another budget).
        max_target: Only trials whose own target (a range study's ``target`` attribute) is at most this.
    """
    cands = feasible_trials(study)
    if max_gflops is not None:
        cands = [t for t in cands if t.user_attrs.get("gflops", math.inf) <= max_gflops + 1e-12]
    if max_target is not None:
        cands = [t for t in cands if t.user_attrs.get("target", math.inf) <= max_target * (1 + 1e-9)]
    if not cands:
        raise SearchError(
            f"study {study.study_name!r} has no finished trial that meets the budget — run more trials or relax --budget"
        )
    for t in cands[:max_candidates]:
        sched = trial_schedule(t)
        achieved: dict[str, Any] = {"gflops": round(t.user_attrs["gflops"], 6), "analytic_gflops": round(t.user_attrs["analytic_gflops"], 6)}
        if "predicted_ms" in t.user_attrs:
            achieved["predicted_ms"] = round(t.user_attrs["predicted_ms"], 4)
        if accept is not None:
            more = accept(sched)
            if more is None:
                continue
            achieved.update(more)
        scores = {f"calib_{k}": round(float(t.user_attrs[k]), 6) for k in ("top1", "agreement", "kl") if k in t.user_attrs}
        created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        final = sched.with_meta(
            budget=replace(budget, achieved=achieved),
            scores={**scores, **(extra_scores or {})},
            provenance={**sched.provenance, **(provenance or {}), "study": study.study_name, "trial": t.number, "created": created},
        )
        final.save(out)
        return final, t
    raise SearchError("no candidate schedule met the budget when re-measured on the device — relax --budget or run more trials")
