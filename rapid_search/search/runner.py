"""``run_search``: everything between the command line and the Optuna study.

Order of work: every input is validated (budget, search space, device, data folder, model name,
budget feasibility) before weights are loaded or images decoded; then the calibration images are
decoded once, the unreduced outputs computed once, and the study is created or resumed.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import optuna
import torch
from optuna.trial import TrialState

from ..evaluate import fidelity, predict
from ..flops import ModelInfo
from ..presets import DEFAULT_PROTECT, DEFAULT_SWITCH_FRACTION
from ..schedule import Budget, LayerSpec, Schedule
from .space import SearchSpace
from .storage import open_storage, describe_storage
from .study import Calibration, Objective, SearchError, cheapest_ratio, environment, export_best

__all__ = ["SearchOptions", "SearchResult", "run_search", "default_study_name", "DEFAULT_METRIC"]

#: Default score for ranking trials, chosen by measurement (README "Which calibration score?").
DEFAULT_METRIC = "kl"

STUDIES_DIR = Path("studies")


@dataclass
class SearchOptions:
    """Options of ``rapid-search search`` (see ``rapid-search search --help``)."""

    model: str = "deit_small_patch16_224"
    data: Optional[Path] = None
    budget: str = "50%GFLOPs"
    device: str = "cpu"
    trials: int = 40
    calib_images: int = 256
    batch_size: int = 64
    seed: int = 0
    out: Optional[Path] = None
    checkpoint: Optional[Path] = None
    space: Optional[Path] = None
    metric: str = "auto"
    storage: Optional[str] = None
    study_name: Optional[str] = None
    progress: str = "auto"
    rungs: int = 3
    threads: Optional[int] = None
    latency_repeats: int = 10


@dataclass
class SearchResult:
    """What a search produced."""

    schedule: Schedule
    path: Path
    study_name: str
    trial_number: int
    stats: dict[str, Any] = field(default_factory=dict)


def default_study_name(opts: SearchOptions) -> str:
    """A study name that identifies the set-up, so re-running the same command resumes it."""
    budget = re.sub(r"[^A-Za-z0-9.]+", "", opts.budget.replace("%", "pct"))
    device = opts.device.replace(":", "")
    return f"{opts.model}-{budget}-{device}-n{opts.calib_images}-s{opts.seed}"


def _setup_attrs(opts: SearchOptions, info: ModelInfo, space: SearchSpace, metric: str, device: torch.device) -> dict[str, Any]:
    return {
        "model": info.name,
        "budget": opts.budget,
        "space": space.fingerprint(),
        "metric": metric,
        "calib": f"{Path(opts.data).resolve() if opts.data else None}|{opts.calib_images}|{opts.seed}",
        "device_kind": device.type,
    }


def _check_setup(study: optuna.Study, attrs: dict[str, Any]) -> None:
    have = study.user_attrs.get("setup")
    if have is None:
        study.set_user_attr("setup", attrs)
        return
    for k, v in attrs.items():
        if have.get(k) != v:
            raise SearchError(
                f"study {study.study_name!r} was started with {k} = {have.get(k)!r}, not {v!r} — "
                "use another --study-name or the original settings"
            )


def _warm_start(study: optuna.Study, info: ModelInfo, space: SearchSpace) -> None:
    """Enqueue the hand-set RAPID schedule and ToMe (constant and decreasing) first."""
    if study.get_trials(deepcopy=False):
        return
    hand = {
        "switch": round(info.depth * DEFAULT_SWITCH_FRACTION),
        "prune_weight": 1.0,
        "decay": 0.0,
        "protect": DEFAULT_PROTECT,
        "prune_threshold_mode": "off",
        "merge_threshold_mode": "off",
    }
    with optuna.logging_disabled() if hasattr(optuna, "logging_disabled") else _nullcontext():
        study.enqueue_trial(hand, user_attrs={"warm_start": "rapid-hand-set"})
        study.enqueue_trial({}, user_attrs={"warm_start": "tome"})
        study.enqueue_trial({}, user_attrs={"warm_start": "tome-decreasing"})


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: Any) -> None:
        return None


def _finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def search_stats(study: optuna.Study, n_images: int) -> dict[str, Any]:
    """Trial-cost ratio and the saving from early stopping, from the trials' records."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    complete = [t for t in trials if t.state == TrialState.COMPLETE and "trial_s" in t.user_attrs]
    ratios = [t.user_attrs["trial_s"] / t.user_attrs["forward_s"] for t in complete if t.user_attrs.get("forward_s")]
    forwarded = sum(int(t.user_attrs.get("images_forwarded", 0)) for t in trials if "schedule" in t.user_attrs)
    scored = sum(1 for t in trials if "schedule" in t.user_attrs)
    return {
        "trials_complete": len(complete),
        "trials_pruned": sum(1 for t in trials if t.state == TrialState.PRUNED),
        "trial_cost_vs_forward": round(statistics.median(ratios), 3) if ratios else None,
        "images_forwarded": forwarded,
        "images_without_pruning": scored * n_images,
        "pruning_saving": round(1 - forwarded / (scored * n_images), 3) if scored else None,
    }


def run_search(opts: SearchOptions, *, progress: Any = None) -> SearchResult:
    """Run (or resume) a search and write the best schedule.

    Args:
        opts: Options (see :class:`SearchOptions`).
        progress: A ``rapid_search.search.progress.Progress`` (created from ``opts.progress`` if None).

    Returns:
        The exported schedule, its path and search statistics.
    """
    import timm  # noqa: F401  (imported early so that errors below are ours)

    from ..data import DataError, load_images
    from ..loading import load_model
    from ..measure import parse_device, set_cpu_threads
    from .budget import parse_budget
    from .progress import Progress

    # ---- validate everything before any work --------------------------------------------------
    spec = parse_budget(opts.budget)
    space = SearchSpace.load(opts.space)
    if spec.kind == "latency":
        space = space.without_thresholds()
    device = parse_device(opts.device)
    if opts.trials < 1:
        raise SearchError(f"--trials {opts.trials} must be at least 1")
    if opts.calib_images < 8:
        raise SearchError(f"--calib-images {opts.calib_images} is too few to score schedules — use 64 or more")
    if opts.batch_size < 1:
        raise SearchError(f"--batch-size {opts.batch_size} must be at least 1")
    if opts.data is None:
        raise SearchError("no calibration images: pass --data DIR (an ImageFolder tree of WordNet-id folders or a flat folder of images)")
    data = Path(opts.data)
    if not data.is_dir():
        raise DataError(f"data folder {data} does not exist — pass --data with an ImageFolder tree or a flat folder of images")
    metric = DEFAULT_METRIC if opts.metric == "auto" else opts.metric
    set_cpu_threads(opts.threads)
    arch = load_model(opts.model, pretrained=False)  # shape only: checks the name and the budget cheaply
    info = ModelInfo.from_model(arch)
    del arch
    if spec.kind == "gflops":
        from .budget import resolve

        target = resolve(spec, base_gflops=info.base_gflops) * 1e9  # MACs
        floor = cheapest_ratio(info, space)
        if target < floor * info.base_macs:
            raise SearchError(
                f"budget {opts.budget} ({target / 1e9:.3f} GFLOPs) is below the cheapest schedule the search space allows "
                f"({floor * info.base_gflops:.3f} GFLOPs, {floor:.0%}) — raise the budget"
            )
    study_name = opts.study_name or default_study_name(opts)
    storage = open_storage(opts.storage, study_name=study_name, studies_dir=STUDIES_DIR)
    out = Path(opts.out) if opts.out else STUDIES_DIR / f"{study_name}.yaml"

    prog = progress or Progress.create(opts.progress)
    with prog:
        # ---- load once: weights, images, unreduced outputs ----------------------------------------
        prog.log(f"loading {opts.model} on {device} ...")
        model = load_model(opts.model, checkpoint=opts.checkpoint, device=device)
        imgs = load_images(data, model=model, limit=opts.calib_images, seed=opts.seed)
        if imgs.skipped:
            prog.log(f"skipped {len(imgs.skipped)} unreadable image(s) in {data} (first: {imgs.skipped[0][0]}: {imgs.skipped[0][1]})")
        if metric == "top1" and imgs.labels is None:
            raise SearchError(f"--metric top1 needs labelled images (WordNet-id folders) but {data} is unlabelled — use --metric kl")
        base = predict(model, imgs.images, None, batch_size=opts.batch_size, device=device, info=info)
        base_scores = fidelity(base.logits, base.logits, imgs.labels)
        calib = Calibration(imgs.images, imgs.labels, base.logits, base_scores, base.seconds)
        prog.log(
            f"{len(imgs)} calibration images from {data}"
            + (f"; unreduced top-1 {base_scores['top1']:.2%}" if "top1" in base_scores else " (unlabelled)")
        )

        latency_model = None
        if spec.kind == "latency":
            from .budget import resolve
            from .latency import LatencyModel, measure_schedule_ms

            prog.log(f"measuring per-block latency on {device} at batch {opts.batch_size} ...")
            latency_model = LatencyModel.measure(model, device=device, batch_size=opts.batch_size)
            base_ms = measure_schedule_ms(model, None, device=device, batch_size=opts.batch_size, repeats=opts.latency_repeats).median_ms
            target = resolve(spec, base_gflops=info.base_gflops, base_latency_ms=base_ms)
            floor = cheapest_ratio(info, space, cost=lambda layers: float(latency_model.predict_ms(layers)))
            if target < floor * latency_model.predict_ms([LayerSpec()] * info.depth):
                raise SearchError(
                    f"budget {opts.budget} ({target:.2f} ms) is below the fastest schedule the search space allows "
                    f"(about {floor:.0%} of the unreduced {base_ms:.2f} ms) — raise the budget"
                )
            prog.log(f"unreduced latency {base_ms:.2f} ms per batch of {opts.batch_size}; target {target:.2f} ms")

        # ---- the study --------------------------------------------------------------------------
        sampler = optuna.samplers.TPESampler(seed=opts.seed, multivariate=True, n_startup_trials=10)
        pruner = optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=0)
        study = optuna.create_study(
            study_name=study_name, storage=storage, sampler=sampler, pruner=pruner, direction="maximize", load_if_exists=True
        )
        _check_setup(study, _setup_attrs(opts, info, space, metric, device))
        study.set_user_attr("base_gflops", info.base_gflops)
        study.set_user_attr("target", target / 1e9 if spec.kind == "gflops" else target)
        _warm_start(study, info, space)
        objective = Objective(
            model=model,
            info=info,
            space=space,
            calib=calib,
            metric=metric,
            target=target,
            cost_kind=spec.kind,
            device=device,
            batch_size=opts.batch_size,
            n_rungs=opts.rungs,
            latency_model=latency_model,
        )
        done = _finished(study)
        prog.start(opts.trials, done=done, study=study_name, storage=describe_storage(opts.storage, study_name, STUDIES_DIR))

        def on_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            prog.trial(study, trial, metric=metric)

        if done < opts.trials:
            cb = optuna.study.MaxTrialsCallback(opts.trials, states=(TrialState.COMPLETE, TrialState.PRUNED))
            try:
                study.optimize(objective, callbacks=[cb, on_trial], catch=(), gc_after_trial=False)
            except KeyboardInterrupt:
                prog.log("interrupted: the study is kept; writing the best schedule so far")
                try:
                    _export(study, opts, out, spec, info, calib, metric, model, device, latency_model, target)
                except SearchError:
                    pass
                raise

        schedule, trial = _export(study, opts, out, spec, info, calib, metric, model, device, latency_model, target)
        stats = search_stats(study, len(calib.images))
        stats["calib_seconds_unreduced"] = round(calib.base_seconds, 3)
        prog.finish(study, schedule, out, stats, metric=metric)
        return SearchResult(schedule=schedule, path=out, study_name=study_name, trial_number=trial.number, stats=stats)


def _export(
    study: optuna.Study,
    opts: SearchOptions,
    out: Path,
    spec: Any,
    info: ModelInfo,
    calib: Calibration,
    metric: str,
    model: torch.nn.Module,
    device: torch.device,
    latency_model: Any,
    target: float,
) -> tuple[Schedule, optuna.trial.FrozenTrial]:
    accept = None
    if spec.kind == "latency":
        from .latency import measure_schedule_ms

        def accept(s: Schedule) -> Optional[dict[str, Any]]:
            t = measure_schedule_ms(model, s, device=device, batch_size=opts.batch_size, repeats=opts.latency_repeats)
            if t.median_ms > target:
                return None
            return {"latency_ms": round(t.median_ms, 4), "latency_repeats": opts.latency_repeats, "batch_size": opts.batch_size}

    budget = Budget(spec=opts.budget, kind=spec.kind, target=round(target / 1e9 if spec.kind == "gflops" else target, 6))
    extra = {f"unreduced_{k}": round(v, 6) for k, v in calib.base_scores.items() if k == "top1"}
    extra["metric"] = metric
    prov = {
        "data": str(Path(opts.data)),
        "calib_images": len(calib.images),
        "seed": opts.seed,
        "device": str(device),
        "batch_size": opts.batch_size,
        **environment(),
    }
    return export_best(study, out, budget=budget, extra_scores=extra, provenance=prov, accept=accept)
