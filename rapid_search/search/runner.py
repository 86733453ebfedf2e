"""``run_search``: every input checked (:func:`_plan`), weights and calibration set loaded once
(:func:`_load`), the study created or joined (:func:`_join_study`), the trials run
(:func:`~rapid_search.search.workers.run_trials`) and the best schedule written (:func:`_export`).
Nothing is written when the search cannot start; a study with another set-up is refused."""

from __future__ import annotations

import re
import secrets
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import optuna
import sqlalchemy.exc  # an Optuna dependency
import torch
from optuna.trial import TrialState

from ..outputs import check_output
from ..redact import safe_reason
from ..tools.data import DataError, folder_fingerprint, load_images
from ..tools.evaluate import fidelity, predict
from ..runtime.flops import ModelInfo
from ..tools import latency  # a module: tests replace its timing functions
from ..tools.loading import load_model
from ..tools.measure import parse_device, parse_dtype, set_cpu_threads
from ..tools.provenance import versions
from ..runtime.presets import make_schedule
from ..runtime.schedule import Schedule
from .budget import BudgetError, BudgetSpec, Target, parse_budget
from .progress import Progress, summarize_search
from .space import SearchSpace, project
from ..storage import GRACE_PERIOD, HEARTBEAT_INTERVAL, JOURNAL_LOCK_GRACE, JournalWriteError, check_journal_path, check_study_name, describe_storage, journal_path, open_storage
from .study import HAND_SET_LEVELS, LATENCY_MARGIN, Calibration, Objective, SearchError, cheapest, corrected_ms, export_best, hand_params, latency_correction, project_hand_set, saving_correction
from .workers import FINISHED, run_trials

__all__ = ["SearchOptions", "SearchResult", "SearchInterrupted", "run_search", "default_study_name", "share_setup", "heartbeat_timing", "canonical_setup_value"]

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
    #: Precision the model is scored and timed in (``float32``, ``bfloat16``, ``float16``).
    dtype: str = "float32"
    #: Latency budgets: time the model compiled with ``torch.compile(dynamic=False)``, as deployed.
    #: Any budget: search fixed counts only (threshold schedules do not compile with ``fullgraph=True``).
    compile: bool = False
    #: Search fixed-count schedules only (the space's thresholds off): the lean reduction path, no
    #: host synchronisation, compiles with ``fullgraph=True``. Latency budgets always do.
    fixed_counts: bool = False
    heartbeat_interval: int = HEARTBEAT_INTERVAL
    #: None: ``GRACE_PERIOD``, raised where a journal file needs more (see :func:`heartbeat_timing`).
    grace_period: Optional[int] = None


class SearchInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) during the trials: the study is kept, the trial in flight queued again and
    the best schedule so far written; the message says what was kept and written."""


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
    runtime = "".join(f"-{v}" if k == "dtype" else "-compiled" for k, v in _runtime_setup(opts).items())  # none for the defaults
    fixed = "-fixed" if opts.fixed_counts else ""
    return f"{opts.model}-{budget}-{device}-n{opts.calib_images}-s{opts.seed}{runtime}{fixed}"


def _runtime_setup(opts: SearchOptions) -> dict[str, Any]:
    """Set-up entries for a non-default precision or compiled timing (none for the defaults: older studies match)."""
    return {k: v for k, v in (("dtype", opts.dtype), ("compile", opts.compile)) if v not in ("float32", False)}


def _setup_attrs(opts: SearchOptions, info: ModelInfo, space: SearchSpace, metric: str, device: torch.device) -> dict[str, Any]:
    return {
        "model": info.name,
        "budget": opts.budget,
        "space": space.fingerprint(),
        "metric": metric,
        # by content, not path: workers keeping the images in different folders share a study
        "calib": f"{folder_fingerprint(opts.data)}|{opts.calib_images}|{opts.seed}" if opts.data else None,
        "device_kind": device.type,
        **_runtime_setup(opts),
    }


def _check_setup(study: optuna.Study, attrs: dict[str, Any], have: Optional[dict[str, Any]] = None) -> None:
    """Refuse a study started with another set-up (``have``: its stored one, None: read it; none passes)."""
    have = study.user_attrs.get("setup") if have is None else have
    if have is None:
        return
    for k, v in attrs.items():
        if canonical_setup_value(k, have.get(k)) != canonical_setup_value(k, v):
            what = " (the search space's fingerprint: --space or --fixed-counts differ)" if k == "space" else ""
            raise SearchError(
                f"study {study.study_name!r} was started with {k} = {have.get(k)!r}, not {v!r}{what} — "
                "use another --study-name or the original settings"
            )


def canonical_setup_value(key: str, value: Any) -> Any:
    """A recorded set-up value in its canonical spelling, for comparisons (a budget as ``50%GFLOPs``,
    whatever case and spaces an older study recorded it with)."""
    if key == "budget" and isinstance(value, str):
        try:
            return parse_budget(value).canonical
        except BudgetError:
            return value
    return value


#: The study attributes only the worker that created the study writes (``setup`` last: a worker
#: that sees it sees the others too).
_SHARED_ATTRS = ("base_gflops", "target", "setup")


def share_setup(
    study: optuna.Study,
    created: bool,
    attrs: dict[str, Any],
    *,
    log: Callable[[str], None] = lambda msg: None,
    wait: float = 10.0,
    poll: float = 0.2,
) -> dict[str, Any]:
    """Record the study's set-up (the creator: ``created``), or check this worker's ``attrs``
    (``setup``, ``base_gflops``, ``target``) against it; returns the study's (the creator's) values.

    A joiner never overwrites the creator's latency ``target`` (``log`` says when its own differs).
    Finding a new study without a set-up it waits ``wait`` s; if there is still none (the creator
    died) it writes its own and re-reads after ``poll`` s: of two racing joiners, the overwritten
    one is refused when the set-ups differ.

    Raises:
        SearchError: The study was started with another set-up.
    """
    if created:
        for k in _SHARED_ATTRS:
            study.set_user_attr(k, attrs[k])
        return {k: attrs[k] for k in _SHARED_ATTRS}
    have = study.user_attrs
    if "setup" not in have and not study.get_trials(deepcopy=False):
        deadline = time.monotonic() + wait
        while "setup" not in have and time.monotonic() < deadline:
            time.sleep(poll)
            have = study.user_attrs
    if "setup" not in have:
        for k in _SHARED_ATTRS:
            if k not in have:
                study.set_user_attr(k, attrs[k])
        time.sleep(poll)
        have = study.user_attrs
    _check_setup(study, attrs["setup"], have["setup"])
    mine, theirs = attrs.get("target"), have.get("target")
    if isinstance(mine, (int, float)) and isinstance(theirs, (int, float)) and abs(mine - theirs) > 0.1 * abs(theirs):
        log(f"budget target here {mine:.4g}, the study's (measured by the worker that created it) {theirs:.4g}: this worker's trials are judged against its own")
    return {k: have.get(k, attrs[k]) for k in _SHARED_ATTRS}


def heartbeat_timing(opts: SearchOptions) -> tuple[int, int, Optional[str]]:
    """``(interval, grace, note)``: heartbeat interval, grace period and a note when the default grace
    was raised. A killed worker's journal lock blocks heartbeats for ``JOURNAL_LOCK_GRACE`` s, so for a
    journal file grace must exceed ``2 * interval + JOURNAL_LOCK_GRACE`` (the default is raised to
    that; a shorter ``--grace-period``, or an interval not below the grace period: SearchError).
    """
    interval = opts.heartbeat_interval
    grace = GRACE_PERIOD if opts.grace_period is None else opts.grace_period
    note = None
    journal = journal_path(opts.storage, "-", STUDIES_DIR) is not None
    least = 2 * interval + JOURNAL_LOCK_GRACE + 1
    if journal and opts.grace_period is None and grace < least:
        grace, note = least, f"grace period {least} s (a journal file needs more than 2 x --heartbeat-interval {interval} + {JOURNAL_LOCK_GRACE} s)"
    if not (1 <= interval < grace):
        raise SearchError(
            f"--heartbeat-interval {interval} must be at least 1 and below --grace-period {grace} "
            f"(defaults {HEARTBEAT_INTERVAL} and {GRACE_PERIOD})"
        )
    if journal and grace < least:
        raise SearchError(
            f"--grace-period {grace} is too short for a journal file: a worker killed while writing to it blocks heartbeats for "
            f"{JOURNAL_LOCK_GRACE} s, and live trials would be given up — use --grace-period {least} or more "
            f"(more than 2 x --heartbeat-interval {interval} + {JOURNAL_LOCK_GRACE}), or PostgreSQL storage"
        )
    return interval, grace, note


def _existing_study(spec: Optional[str], study_name: str) -> tuple[Any, Optional[optuna.Study]]:
    """``(storage, study)`` where they exist already (None: a journal file or study still to be made); creates nothing."""
    path = journal_path(spec, study_name, STUDIES_DIR)
    if path is not None:
        check_journal_path(path)
        if not path.is_file() or path.stat().st_size == 0:
            return None, None
    storage = open_storage(spec, study_name=study_name, studies_dir=STUDIES_DIR)
    try:
        return storage, optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        return storage, None


def _check_out(out: Path, opts: SearchOptions, study_name: str) -> None:
    """Refuse, before hours of search, an output path that cannot or must not be written (not a
    regular file, the study's journal, an input of the search)."""
    check_output(
        out,
        option="--out",
        example="schedule.yaml",
        reads=[
            ("the study's journal file", journal_path(opts.storage, study_name, STUDIES_DIR)),
            ("the --space file", opts.space),
            ("the --checkpoint file", opts.checkpoint),
        ],
        data=[opts.data],
    )


def _open_study(study_name: str, storage: Any, seed: int, pruner: Any) -> tuple[optuna.Study, bool, int]:
    """``(study, created, sampler_seed)``: the creator (the storage allows one) samples with ``seed``
    (reproducible); joiners draw their own seed, or they would sample the creator's schedules again."""

    def sampler(s: int) -> optuna.samplers.BaseSampler:
        return optuna.samplers.TPESampler(seed=s, multivariate=True, n_startup_trials=10)

    try:
        study = optuna.create_study(study_name=study_name, storage=storage, sampler=sampler(seed), pruner=pruner, direction="maximize")
        return study, True, seed
    except optuna.exceptions.DuplicatedStudyError:
        s = (seed * 1_000_003 + secrets.randbits(31)) % 2**32
        return optuna.load_study(study_name=study_name, storage=storage, sampler=sampler(s), pruner=pruner), False, s


def _warm_start(study: optuna.Study, info: ModelInfo, ranged: bool = False) -> None:
    """Enqueue the hand-set RAPID schedule and ToMe (constant, and the paper's decreasing
    ``(r, -1)``) first; for a range budget, the hand-set one at HAND_SET_LEVELS budgets over it, ToMe in its middle."""
    if study.get_trials(deepcopy=False):
        return
    hand = hand_params(info)
    at = lambda frac: {"range_frac": frac} if ranged else {}  # noqa: E731
    for frac in [k / (HAND_SET_LEVELS - 1) for k in range(HAND_SET_LEVELS)] if ranged else (0.5,):
        study.enqueue_trial(hand, user_attrs={"warm_start": "rapid-hand-set", **at(frac)})
    for warm in ("tome", "tome-decreasing"):
        study.enqueue_trial({}, user_attrs={"warm_start": warm, **at(0.5)})


def _refine_start(study: optuna.Study, within: Target, at: float, k: int = 2) -> None:
    """Refining a range study at one budget: the hand-set schedule and the study's ``k`` best
    shapes (by gain over hand-set RAPID) go first, projected onto it (those not run there yet)."""
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    key = lambda t: repr(sorted(t.params.items()))  # noqa: E731
    seen = {key(t) for t in study.get_trials(deepcopy=False) if abs(t.user_attrs.get("target", -1.0) - at) <= 1e-6 * at}
    hand = [t for t in done if t.user_attrs.get("warm_start") == "rapid-hand-set"][:1]
    best = [t for t in sorted(done, key=lambda t: -t.value) if t.params and not t.user_attrs.get("warm_start") and key(t) not in seen]
    frac = (at - within.lo_cost) / (within.cost - within.lo_cost)
    for t in [t for t in hand if key(t) not in seen] + best[:k]:
        warm = {"warm_start": t.user_attrs["warm_start"]} if "warm_start" in t.user_attrs else {}
        study.enqueue_trial(t.params, user_attrs={"range_frac": frac, "refines": t.number, **warm})


def _finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def search_stats(study: optuna.Study, n_images: int) -> dict[str, Any]:
    """Trial-cost ratio and the saving from early stopping, from the trials' records."""
    trials = study.get_trials(deepcopy=False, states=FINISHED)
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


@dataclass
class _Plan:
    """Everything checked before any work (no weights loaded, no image decoded, nothing written)."""

    opts: SearchOptions
    spec: BudgetSpec
    space: SearchSpace
    device: torch.device
    data: Path
    metric: str
    interval: int
    grace: int
    grace_note: Optional[str]
    info: ModelInfo
    target: Optional[Target]  # None for a latency budget until the unreduced model is timed
    study_name: str
    out: Path
    setup: dict[str, Any]
    storage: Any  # None: a journal file still to be made
    within: Optional[Target] = None  # refining a GFLOPs range study at the single budget ``target``: the study's range


@dataclass
class _Loaded:
    """What the trials share: weights, calibration set, the unreduced outputs, the cost target."""

    model: torch.nn.Module
    calib: Calibration
    target: Target
    latency_model: Any = None
    margin: float = 0.0
    correction: float = 1.0  # latency: measured / predicted before any trial is timed (compiled: for every trial)


def _check_options(opts: SearchOptions) -> Path:
    """The numeric options and the data folder; returns the data folder."""
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
        what = "is not a directory" if data.exists() else "does not exist"
        raise DataError(f"data folder {data} {what} — pass --data with an ImageFolder tree or a flat folder of images")
    return data


def _plan(opts: SearchOptions) -> _Plan:
    """Validate every input (budget, space, device, data folder, model name, budget feasibility,
    output path, an existing study's set-up) before any work."""
    # set-up values in their canonical spelling from here on (study name, recorded set-up, the
    # schedule file, comparisons): ' 50% gflops ' and 'CPU ' are the same study as 50%GFLOPs and cpu
    spec = parse_budget(parse_budget(opts.budget).canonical)
    opts = replace(opts, budget=spec.text, device=str(opts.device).strip().lower())
    space = SearchSpace.load(opts.space)
    if spec.kind == "latency" or opts.compile or opts.fixed_counts:
        space = space.without_thresholds()
    device = parse_device(opts.device)
    parse_dtype(opts.dtype)
    data = _check_options(opts)
    metric = DEFAULT_METRIC if opts.metric == "auto" else opts.metric
    interval, grace, grace_note = heartbeat_timing(opts)
    set_cpu_threads(opts.threads)
    with torch.device("meta"):  # shape only, no memory and no weight init: checks the name and the budget cheaply
        arch = load_model(opts.model, pretrained=False, device="meta")
    info = ModelInfo.from_model(arch)
    del arch
    target = None
    if spec.kind == "gflops":
        target = Target.of(spec, base_gflops=info.base_gflops)
        floor, _ = cheapest(info, space)
        if (target.lo_cost or target.cost) < floor * info.base_macs:
            raise SearchError(
                f"budget {opts.budget} ({target.lo or target.value:.3f} GFLOPs) is below the cheapest schedule the search space allows "
                f"({floor * info.base_gflops:.3f} GFLOPs, {floor:.0%}) — raise the budget"
            )
    study_name = check_study_name(default_study_name(opts) if opts.study_name is None else opts.study_name)
    out = Path(opts.out) if opts.out else STUDIES_DIR / f"{study_name}.yaml"
    _check_out(out, opts, study_name)
    setup = _setup_attrs(opts, info, space, metric, device)
    storage, existing = _existing_study(opts.storage, study_name)  # connects to a server now: bad URLs fail fast
    within = None
    if existing is not None:
        have = canonical_setup_value("budget", (existing.user_attrs.get("setup") or {}).get("budget"))
        if target is not None and spec.lo is None and isinstance(have, str) and ".." in have and "GFLOPs" in have:
            within = Target.of(parse_budget(have), base_gflops=info.base_gflops)  # a single budget in a range study: refine there
            if not within.lo * (1 - 1e-9) <= target.value <= within.value * (1 + 1e-9):
                raise SearchError(
                    f"budget {spec.canonical} is outside study {study_name!r}'s range {have} — use a budget inside it, or another --study-name"
                )
            setup = {**setup, "budget": have}
        _check_setup(existing, setup)
    return _Plan(opts, spec, space, device, data, metric, interval, grace, grace_note, info, target, study_name, out, setup, storage, within)


def _load(plan: _Plan, log: Callable[[str], None]) -> _Loaded:
    """Weights, calibration images and unreduced outputs, once; a latency budget's timing and target."""
    opts, device, data = plan.opts, plan.device, plan.data
    log(f"loading {opts.model} on {device} ...")
    model = load_model(opts.model, checkpoint=opts.checkpoint, device=device, dtype=opts.dtype)
    imgs = load_images(data, model=model, limit=opts.calib_images, seed=opts.seed)
    if imgs.skipped:
        log(f"skipped {len(imgs.skipped)} unreadable image(s) in {data} (first: {imgs.skipped[0][0]}: {imgs.skipped[0][1]})")
    if plan.metric == "top1" and imgs.labels is None:
        raise SearchError(f"--metric top1 needs labelled images (WordNet-id folders) but {data} is unlabelled — use --metric kl")
    base = predict(model, imgs.images, None, batch_size=opts.batch_size, device=device, info=plan.info)
    if not bool(torch.isfinite(base.logits).all()):  # every trial would score NaN: the weights, not the budget, are at fault
        bad = int((~torch.isfinite(base.logits).all(dim=-1)).sum())
        raise SearchError(
            f"the unreduced {opts.model} gives non-finite outputs (NaN or inf) for {bad} of {len(imgs)} calibration images — "
            "check its weights (--checkpoint) and the images; nothing can be scored with them"
        )
    base_scores = fidelity(base.logits, base.logits, imgs.labels)
    calib = Calibration(imgs.images, imgs.labels, base.logits, base_scores, base.seconds)
    log(f"{len(imgs)} calibration images from {data}" + (f"; unreduced top-1 {base_scores['top1']:.2%}" if "top1" in base_scores else " (unlabelled)"))
    if plan.target is not None:
        return _Loaded(model, calib, plan.target)
    return _time_latency(plan, model, calib, log)


def _time_latency(plan: _Plan, model: torch.nn.Module, calib: Calibration, log: Callable[[str], None]) -> _Loaded:
    """A latency budget: latency model, unreduced timing, target and noise margin (``LATENCY_MARGIN``)."""
    opts, device, info = plan.opts, plan.device, plan.info
    log(f"measuring per-block latency on {device} at batch {opts.batch_size} ...")
    latency_model = latency.LatencyModel.measure(model, device=device, batch_size=opts.batch_size, compile=opts.compile)
    base_t = latency.measure_schedule_ms(model, None, device=device, batch_size=opts.batch_size, repeats=opts.latency_repeats, compile=opts.compile)
    base_ms = base_t.median_ms
    paired_ms = lambda s: _paired_ms(plan, model, s, base_ms, opts.latency_repeats)  # noqa: E731
    latency_model.anchor(base_ms)  # predictions and the target on one scale
    lo, hi = LATENCY_MARGIN
    margin = min(hi, max(lo, base_t.iqr_ms / base_ms if base_ms > 0 else hi))
    target = Target.of(plan.spec, base_gflops=info.base_gflops, base_latency_ms=base_ms)
    predict = lambda layers: float(latency_model.predict_ms(layers))  # noqa: E731
    floor, fastest = cheapest(info, plan.space, cost=predict)
    correction = 1.0
    if opts.compile:  # trials are not timed compiled: one compiled timing of the hand-set schedule corrects every prediction
        hand, _ = project_hand_set(info, {**hand_params(info), "prune_threshold": None, "merge_threshold": None}, target.value * (1 - margin), cost=predict)
        probe = hand[0] if hand else fastest
        timed, predicted = paired_ms(make_schedule(info, probe, method="probe")), predict(probe)
        correction = saving_correction(base_ms, [(timed, predicted)])
        floor = corrected_ms(floor * base_ms, base_ms, correction) / base_ms
        log(f"compiled: a hand-set schedule predicted at {predicted:.2f} ms ran in {timed:.2f} ms; predicted savings are scaled by {correction:.3f}")
    elif (target.lo or target.value) < floor * base_ms:  # predicted out of reach: time it before refusing
        floor = paired_ms(make_schedule(info, fastest, method="fastest")) / base_ms
    if (target.lo or target.value) < floor * base_ms:
        raise SearchError(
            f"budget {opts.budget} ({target.lo or target.value:.2f} ms) is below the fastest schedule the search space allows "
            f"(about {floor:.0%} of the unreduced {base_ms:.2f} ms) — raise the budget"
        )
    log(
        f"unreduced latency {base_ms:.2f} ms per batch of {opts.batch_size}; target {target.value:.2f} ms; "
        f"schedules drawn up to {target.value * (1 - margin):.2f} ms predicted ({margin:.1%} timing-noise margin)"
    )
    return _Loaded(model, calib, target, latency_model, margin, correction)


def _join_study(plan: _Plan, loaded: _Loaded, log: Callable[[str], None]) -> tuple[optuna.Study, Any]:
    """Create or join the study (only now: loading failed writes nothing), and the heartbeat's storage."""
    opts = plan.opts
    storage = plan.storage or open_storage(opts.storage, study_name=plan.study_name, studies_dir=STUDIES_DIR)
    # a journal storage's writes hold its lock: the heartbeat thread gets its own instance
    rdb = isinstance(storage, optuna.storages.RDBStorage)
    heartbeat_storage = None if rdb else open_storage(opts.storage, study_name=plan.study_name, studies_dir=STUDIES_DIR)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=0)
    study, created, sampler_seed = _open_study(plan.study_name, storage, opts.seed, pruner)
    # only the creator records the set-up and target; the others check theirs against it
    share_setup(study, created, {"setup": plan.setup, "base_gflops": plan.info.base_gflops, "target": (plan.within or loaded.target).value}, log=log)
    if created:
        _warm_start(study, plan.info, plan.spec.lo is not None)
    elif plan.within is not None:
        _refine_start(study, plan.within, loaded.target.cost)
    else:
        log(f"joined study {plan.study_name!r} ({len(study.get_trials(deepcopy=False))} trials so far); sampler seed {sampler_seed}")
    return study, heartbeat_storage


def run_search(opts: SearchOptions, *, progress: Optional[Progress] = None) -> SearchResult:
    """Run (or resume) a search and write the best schedule (``progress``: the display, default from ``opts.progress``).

    Raises:
        SearchInterrupted: Ctrl-C or SIGTERM during the trials (the best so far is written).
    """
    plan = _plan(opts)
    # a range study's trial value is its gain over hand-set RAPID at its own target (Objective._gain)
    ranged = plan.spec.lo is not None or plan.within is not None
    prog = progress or Progress(opts.progress, metric=f"{plan.metric}-gain-vs-hand-set" if ranged else plan.metric)
    with prog:
        if plan.grace_note:
            prog.log(plan.grace_note)
        loaded = _load(plan, prog.log)
        study, heartbeat_storage = _join_study(plan, loaded, prog.log)
        objective = Objective(
            model=loaded.model,
            info=plan.info,
            space=plan.space,
            calib=loaded.calib,
            metric=plan.metric,
            budget=plan.within or loaded.target,
            device=plan.device,
            batch_size=opts.batch_size,
            n_rungs=opts.rungs,
            latency_model=loaded.latency_model,
            measure_ms=_trial_timer(plan, loaded),
            correction=loaded.correction,
            margin=loaded.margin,
            at=loaded.target.cost if plan.within else None,
        )
        done = _finished(study)
        prog.start(opts.trials, done=done, study=plan.study_name, storage=describe_storage(opts.storage, plan.study_name, STUDIES_DIR))
        if done < opts.trials:
            try:
                run_trials(  # Ctrl-C and SIGTERM become KeyboardInterrupt, never inside a storage write
                    study,
                    objective,
                    opts.trials,
                    heartbeat_storage=heartbeat_storage,
                    interval=plan.interval,
                    grace=plan.grace,
                    callbacks=[prog],
                    log=prog.log,
                )
            except (KeyboardInterrupt, *_STORAGE_FAILURES) as e:  # Ctrl-C; disk full under the journal, the database server gone
                raise _cut_short(e, study, plan, loaded, prog.log) from None
        schedule, trial = _export(study, plan=plan, loaded=loaded, log=prog.log)
        stats = search_stats(study, len(loaded.calib.images))
        stats["calib_seconds_unreduced"] = round(loaded.calib.base_seconds, 3)
        prog.finish(summarize_search(study, schedule, plan.out, stats, metric=plan.metric))
        return SearchResult(schedule=schedule, path=plan.out, study_name=plan.study_name, trial_number=trial.number, stats=stats)


#: A failed journal append (disk full, I/O) and any database error (Optuna wraps SQLAlchemy's).
_STORAGE_FAILURES = (JournalWriteError, optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError)


def _cut_short(e: BaseException, study: optuna.Study, plan: _Plan, loaded: _Loaded, log: Callable[[str], None]) -> BaseException:
    """The one-line error ending trials cut short by Ctrl-C (:class:`SearchInterrupted`) or a failing
    storage (:class:`SearchError`), after writing the best schedule so far: failing to write it is
    reported in that line, never raised, as what cut the trials short decides the exit."""
    opts, interrupted = plan.opts, isinstance(e, KeyboardInterrupt)
    if interrupted:
        log("interrupted: the study is kept; the trial in flight is queued again; writing the best schedule so far")
    try:  # a storage failure ends in one line: the export's report is not printed, its warning goes into the line
        final, _ = _export(study, plan=plan, loaded=loaded, log=None if interrupted else (lambda _line: None))
        warning = None if interrupted else fidelity_warning(final.scores, loaded.calib.base_scores)
        wrote = f"best schedule so far written to {plan.out}" + (f" ({warning})" if warning else "")
    except SearchError:
        wrote = "no finished trial meets the budget yet, no schedule written"
    except Exception as failed:  # noqa: BLE001
        reason = safe_reason(failed, opts.storage)
        wrote = f"the best schedule so far could not be written ({reason})"
        if interrupted:
            log(f"could not write the best schedule so far to {plan.out}: {reason}")
    try:
        finished = str(_finished(study))
    except Exception:  # noqa: BLE001 - the storage went away
        finished = "?"
    if interrupted:
        return SearchInterrupted(f"interrupted — study {plan.study_name!r} is kept ({finished}/{opts.trials} trials finished); {wrote}; re-run the same command to resume")
    if isinstance(e, JournalWriteError):
        what = str(e)
    else:
        cause = e.__cause__ or getattr(e, "orig", None) or e
        what = (
            f"storage {describe_storage(opts.storage, plan.study_name, STUDIES_DIR)} failed during the search ({safe_reason(cause, opts.storage)}) — "
            "check that the server runs and re-run the same command to resume"
        )
    return SearchError(f"{what}; study {plan.study_name!r} kept ({finished}/{opts.trials} trials finished); {wrote}")


def _timed_ms(plan: _Plan, loaded: _Loaded, s: Schedule, repeats: int) -> float:
    """``s``'s latency on the device. A relative budget (``60%latency``) times it in pairs with the
    unreduced model (compiled too) and scales the median ratio to the search's unreduced timing: this
    machine switched between a fast and a 1.5x slower state for seconds at a time, and a pair sees one state."""
    opts = plan.opts
    if not plan.spec.relative:  # an absolute budget is judged by the clock
        return latency.measure_schedule_ms(loaded.model, s, device=plan.device, batch_size=opts.batch_size, repeats=repeats, compile=opts.compile).median_ms
    return _paired_ms(plan, loaded.model, s, loaded.latency_model.base_ms, repeats)


def _paired_ms(plan: _Plan, model: torch.nn.Module, s: Schedule, base_ms: float, repeats: int) -> float:
    """``s`` timed in ``repeats`` rounds with the unreduced model, on the scale of the search's unreduced timing ``base_ms``."""
    opts = plan.opts
    pair = latency.measure_against_unreduced(model, s, device=plan.device, batch_size=opts.batch_size, repeats=repeats, compile=opts.compile)
    return base_ms * latency.paired_ratio(*pair)


def _trial_timer(plan: _Plan, loaded: _Loaded) -> Optional[Callable[[Schedule], float]]:
    """Latency budgets: time each trial's schedule on the device (a third of the export's repeats, at
    least 3); None for FLOPs budgets and compiled timings (each new schedule would compile first)."""
    if plan.spec.kind != "latency" or plan.opts.compile:
        return None
    return lambda s: _timed_ms(plan, loaded, s, max(3, plan.opts.latency_repeats // 3))


def _export(
    study: optuna.Study, *, plan: _Plan, loaded: _Loaded, log: Optional[Callable[[str], None]] = None
) -> tuple[Schedule, optuna.trial.FrozenTrial]:
    """Write the best feasible trial's schedule (for a latency budget: re-measured on the device,
    with a report of the candidates re-measured and why the written one was chosen)."""
    opts, target = plan.opts, loaded.target
    say = log or (lambda line: sys.stderr.write(line + "\n"))
    accept = None
    checked: list[dict[str, Any]] = []  # every candidate re-measured, in rank order
    if plan.spec.kind == "latency":

        def accept(s: Schedule) -> Optional[dict[str, Any]]:
            measured = _timed_ms(plan, loaded, s, opts.latency_repeats)
            lat = loaded.latency_model
            predicted = corrected_ms(float(lat.predict_ms(s)), lat.base_ms, latency_correction(study, lat.base_ms, loaded.correction))
            checked.append({"method": s.provenance.get("method", "?"), "predicted_ms": predicted, "measured_ms": measured})
            if measured > target.value:
                return None
            return {"latency_ms": round(measured, 4), "latency_repeats": opts.latency_repeats, "batch_size": opts.batch_size}

    calib = loaded.calib
    extra = {f"unreduced_{k}": round(v, 6) for k, v in calib.base_scores.items() if k == "top1"}
    extra["metric"] = plan.metric
    prov = {
        "data": str(plan.data),
        "calib_images": len(calib.images),
        "seed": opts.seed,
        "device": str(plan.device),
        "batch_size": opts.batch_size,
        **versions("optuna"),
    }
    try:
        final, trial = export_best(
            study, plan.out, budget=target.budget(), extra_scores=extra, provenance=prov, accept=accept, max_gflops=target.value if plan.within else None
        )
    except SearchError as e:
        for line in export_report(checked, target.value, chosen=None):
            say(line)
        timed = [t.user_attrs["measured_ms"] for t in study.get_trials(deepcopy=False) if "measured_ms" in t.user_attrs and "predicted_ms" in t.user_attrs]
        if not checked and timed:  # a latency search whose every trial was timed over the target
            raise SearchError(
                f"every one of the {len(timed)} trials timed on the device missed the target {target.value:.2f} ms "
                f"(fastest {min(timed):.2f} ms) — relax --budget or run more trials"
            ) from e
        raise
    for line in export_report(checked, target.value, chosen=len(checked) - 1 if checked else None):
        say(line)
    warning = fidelity_warning(final.scores, loaded.calib.base_scores)
    if warning:
        say(f"warning: {warning}")
    return final, trial


def export_report(checked: Sequence[dict[str, Any]], target_ms: float, *, chosen: Optional[int]) -> list[str]:
    """Lines saying which candidates a latency export re-measured, against the target, and why it
    wrote the one it did (``chosen``: index into ``checked``; None when none met the target)."""
    if not checked:
        return []
    lines = [f"export: re-measured {len(checked)} candidate(s), best-ranked first, against the target {target_ms:.2f} ms:"]
    for i, c in enumerate(checked):
        miss = c["measured_ms"] / target_ms - 1
        verdict = f"misses by {miss:+.1%}" if miss > 0 else f"meets ({miss:+.1%})"
        lines.append(f"  #{i + 1} {c['method']}: measured {c['measured_ms']:.2f} ms (predicted {c['predicted_ms']:.2f}) — {verdict}")
    if chosen is None:
        lines.append("export: no re-measured candidate meets the target")
    else:
        lines.append(f"export: wrote #{chosen + 1}, the best-ranked candidate whose measured latency meets the target")
    return lines


#: Calibration agreement with the unreduced model below which an export warns (the budget is too tight).
MIN_AGREEMENT = 0.5


def fidelity_warning(scores: dict[str, Any], base_scores: dict[str, float]) -> Optional[str]:
    """What to warn of (one line, without a ``warning:`` prefix) when a written schedule's calibration
    fidelity is far below the unreduced model's (agreement under :data:`MIN_AGREEMENT`, or top-1 under
    half the unreduced top-1); None when it is not."""
    agree, top1, base_top1 = scores.get("calib_agreement"), scores.get("calib_top1"), base_scores.get("top1")
    low_agree = agree is not None and agree < MIN_AGREEMENT
    low_top1 = top1 is not None and base_top1 is not None and top1 < 0.5 * base_top1
    if not (low_agree or low_top1):
        return None
    what = f"top-1 {top1:.1%} vs {base_top1:.1%} unreduced" if low_top1 else f"{agree:.1%} agreement with the unreduced model"
    return f"the written schedule keeps calibration {what} — the budget is too tight for this model on this device; raise it"
