"""The ``rapid-search`` command line.

Sub-commands (``search`` is the default, so ``rapid-search --budget 50%GFLOPs --device cuda``
works as typed):

``search``     run or resume a study and write the best schedule (YAML)
``export``     write a study's best schedule for its budget (or a looser one, or any in its range)
``front``      print and draw a study's calibration front (score against cost)
``evaluate``   evaluate a schedule on an image folder against the unreduced model
``show``       print a schedule
``bench``      accuracy/GFLOPs/speed Pareto benchmark against the baselines
``visualize``  draw which patches are kept, pruned or merged

Bad input gets a one-line ``rapid-search: error: ...`` on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .argtypes import DTYPES, int_in
from .errors import RapidSearchError

__all__ = ["main", "build_parser", "MissingExtraError", "require_extras"]

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141
_COMMANDS = ("search", "export", "front", "evaluate", "show", "bench", "visualize")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        # one line, always starting "rapid-search: error:" (sub-commands too), no usage dump
        message = " ".join(str(message).split())
        if message.endswith("expected one argument"):  # e.g. --budget -50%GFLOPs: argparse takes it for an option
            message += " — give a value, and write values that start with '-' as --option=VALUE"
        from .termsafe import printable

        sys.stderr.write(printable(f"rapid-search: error: {message} (see {self.prog} --help)") + "\n")
        raise SystemExit(EXIT_USAGE)


_positive_int = int_in(1, 10**9)
_trials_int = int_in(1, 1_000_000)
_images_int = int_in(1, 10_000_000)
_batch_int = int_in(1, 65_536)
_threads_int = int_in(1, 1024)
_rungs_int = int_in(1, 16)
_seed_int = int_in(0, 2**32 - 1)
_seconds_int = int_in(1, 86_400)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--batch-size", type=_batch_int, default=64, help="batch size for scoring and timing (default: 64)")
    p.add_argument("--checkpoint", type=Path, default=None, help="local weights (state dict or .safetensors) instead of timm's pretrained weights")
    p.add_argument("--threads", type=_threads_int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="precision the model runs (and is timed) in (default: float32)")
    p.add_argument("--compile", action="store_true", help="time the model compiled with torch.compile (as deployed): latency budgets and timings; search: fixed-count schedules only (they compile with fullgraph=True)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``rapid-search``."""
    from . import __version__

    parser = _Parser(prog="rapid-search", description="Find and apply the best RAPID token-reduction schedule for a timm ViT.")
    parser.add_argument("--version", action="version", version=f"rapid-search {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")

    s = sub.add_parser("search", help="search a schedule under a budget (default command)")
    s.add_argument("--model", default="deit_small_patch16_224", help="timm model name (default: deit_small_patch16_224)")
    s.add_argument("--data", type=Path, default=None, help="calibration images: ImageFolder tree of WordNet-id folders, or a flat folder")
    s.add_argument("--budget", default="50%GFLOPs", help="50%%GFLOPs | 0.6GFLOPs | 60%%latency | 12ms, or a range such as 35%%..70%%GFLOPs: one study for every budget in it (default: 50%%GFLOPs)")
    s.add_argument("--trials", type=_trials_int, default=40, help="finished trials in the study, all workers together (default: 40)")
    s.add_argument("--calib-images", type=_images_int, default=256, help="calibration images used (default: 256)")
    s.add_argument("--seed", type=_seed_int, default=0, help="sampler and calibration-subset seed (default: 0)")
    s.add_argument("--out", type=Path, default=None, help="schedule YAML to write (default: studies/<study>.yaml)")
    s.add_argument("--space", type=Path, default=None, help="search space YAML (default: the one shipped in the package, rapid_search/search/spaces/default.yaml)")
    s.add_argument("--metric", choices=("auto", "kl", "agreement", "top1"), default="auto", help="calibration score (default: auto = kl)")
    s.add_argument("--storage", default=None, help="journal:PATH (one machine) or postgresql+psycopg2://user@host/db (several machines; password from ~/.pgpass or PGPASSWORD) (default: studies/<study>.journal)")
    s.add_argument("--study-name", default=None, help="study name (default: derived from model, budget, device, images and seed)")
    s.add_argument("--progress", choices=("auto", "rich", "plain", "quiet"), default="auto", help="progress display (default: rich on a terminal, plain lines otherwise)")
    s.add_argument("--quiet", action="store_true", help="print only the result line and errors")
    s.add_argument(
        "--fixed-counts", action="store_true",
        help="search fixed-count schedules only (thresholds off: the fast path, compiles with fullgraph=True); latency budgets and --compile always do",
    )
    s.add_argument("--rungs", type=_rungs_int, default=3, help="early-stopping rungs over the calibration set (default: 3)")
    s.add_argument("--heartbeat-interval", type=_seconds_int, default=None, metavar="S", help="seconds between a running trial's heartbeats (default: 10)")
    s.add_argument(
        "--grace-period", type=_seconds_int, default=None, metavar="S",
        help="seconds without a heartbeat before another worker redoes a trial (default: 60; with a journal file more than 2 x interval + 30)",
    )
    _add_common(s)

    e = sub.add_parser("export", help="write the best schedule of an existing study")
    e.add_argument("--study-name", required=True, help="the study to export from")
    e.add_argument("--storage", default=None, help="the study's storage (default: studies/<study>.journal)")
    e.add_argument("--budget", default=None, help="export for this budget instead of the study's (GFLOPs budgets: the best trial that meets it; a range study: any budget in its range)")
    e.add_argument("--out", type=Path, default=None, help="schedule YAML to write (default: studies/<study>.yaml)")

    v = sub.add_parser("evaluate", help="evaluate a schedule on an image folder")
    v.add_argument("--schedule", required=True, type=Path, help="schedule YAML")
    v.add_argument("--data", required=True, type=Path, help="images: ImageFolder tree of WordNet-id folders (top-1) or a flat folder")
    v.add_argument("--model", default=None, help="timm model (default: the schedule's model)")
    v.add_argument("--limit", type=_images_int, default=None, help="evaluate at most N images")
    v.add_argument("--repeats", type=int_in(1, 10_000), default=5, help="timing repeats (median) (default: 5)")
    v.add_argument("--json", type=Path, default=None, help="also write the numbers as JSON")
    _add_common(v)

    f = sub.add_parser("front", help="print and draw a study's calibration front (score against cost)")
    f.add_argument("--study-name", required=True, help="the study")
    f.add_argument("--storage", default=None, help="the study's storage (default: studies/<study>.journal)")
    f.add_argument("--out", required=True, type=Path, help="figure to write, format from its ending: .png, .pdf, .svg, ... (score against cost, the front and the exported schedules)")

    sh = sub.add_parser("show", help="print a schedule")
    sh.add_argument("schedule", type=Path, help="schedule YAML")

    from .tools import bench, visualize  # both import with the runtime alone (matplotlib is checked per command)

    for name, mod, help_ in (("bench", bench, "Pareto benchmark against the baselines"), ("visualize", visualize, "draw kept/pruned/merged patches")):
        p = sub.add_parser(name, help=help_)
        p.set_defaults(_main=mod.main)
        mod.add_arguments(p)
    return parser


# ---- optional dependencies ---------------------------------------------------------------------
#: Top-level module -> the pip extra that installs it.
EXTRAS = {"optuna": "search", "rich": "search", "matplotlib": "search", "sqlalchemy": "search", "psycopg2": "postgres"}
#: Sub-command -> the optional modules it needs; checked before any work is done.
NEEDS = {"search": ("optuna", "rich"), "export": ("optuna",), "front": ("optuna", "matplotlib"), "bench": ("matplotlib",), "visualize": ("matplotlib",)}


class MissingExtraError(RapidSearchError, ImportError):
    """An optional dependency of a sub-command is not installed; the message names the pip extra."""

    def __init__(self, command: str, module: str) -> None:
        extra = EXTRAS.get(module, "search")
        super().__init__(f"'rapid-search {command}' needs {module}, which is not installed — pip install 'rapid-search[{extra}]'")


def _missing_extra(exc: BaseException) -> Optional[str]:
    """The optional top-level module whose absence raised ``exc`` (a ModuleNotFoundError), if any."""
    name = getattr(exc, "name", None) if isinstance(exc, ModuleNotFoundError) else None
    root = (name or "").split(".")[0]
    return root if root in EXTRAS else None


def require_extras(command: str) -> None:
    """Import the optional modules ``command`` needs; raise :class:`MissingExtraError` naming the extra."""
    for module in NEEDS.get(command, ()):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            missing = _missing_extra(e)
            if missing is None:  # something else is broken: its own message, not a wrong hint
                raise
            raise MissingExtraError(command, missing) from None


# ---- command implementations -------------------------------------------------------------------
def _cmd_search(args: argparse.Namespace) -> int:
    from .search.runner import SearchOptions, run_search

    opts = SearchOptions(
        model=args.model,
        data=args.data,
        budget=args.budget,
        device=args.device,
        trials=args.trials,
        calib_images=args.calib_images,
        batch_size=args.batch_size,
        seed=args.seed,
        out=args.out,
        checkpoint=args.checkpoint,
        space=args.space,
        metric=args.metric,
        storage=args.storage,
        study_name=args.study_name,
        progress="quiet" if args.quiet else args.progress,
        rungs=args.rungs,
        threads=args.threads,
        dtype=args.dtype,
        compile=args.compile,
        fixed_counts=args.fixed_counts,
    )
    if args.heartbeat_interval is not None:
        opts.heartbeat_interval = args.heartbeat_interval
    if args.grace_period is not None:
        opts.grace_period = args.grace_period
    if opts.data is None:
        shared = os.environ.get("RAPID_SHARED")
        if shared and (Path(shared) / "data" / "imagenet-calib").is_dir():
            opts.data = Path(shared) / "data" / "imagenet-calib"
    try:
        res = run_search(opts)
    except KeyboardInterrupt as e:
        from .search.runner import SearchInterrupted, default_study_name

        if isinstance(e, SearchInterrupted):
            _say(f"rapid-search: {e}", args)
        else:  # before the trials started (nothing written yet), or a second Ctrl-C while cleaning up
            name = opts.study_name or default_study_name(opts)
            _say(f"rapid-search: interrupted (study {name!r}); re-run the same command to start or resume it", args)
        return EXIT_INTERRUPTED
    ach = res.schedule.budget.achieved if res.schedule.budget else {}
    cost = f"{ach.get('gflops', 0):.3f} GFLOPs" + (f", {ach['latency_ms']:.2f} ms" if "latency_ms" in ach else "")
    print(f"schedule written to {res.path} (trial {res.trial_number}, {cost})")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    import optuna

    old = optuna.logging.get_verbosity()  # quiet for this command only (main() may run in a longer-lived process)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return _export_study(args)
    finally:
        optuna.logging.set_verbosity(old)


def _load_study(args: argparse.Namespace) -> "optuna.Study":  # noqa: F821
    """The existing study ``--study-name`` in ``--storage``, opened for reading (creates nothing)."""
    import optuna

    from .search.runner import STUDIES_DIR
    from .storage import check_study_name, open_storage
    from .search.study import SearchError

    check_study_name(args.study_name)
    if args.storage is None and not (STUDIES_DIR / f"{args.study_name}.journal").exists():
        raise SearchError(f"no study {args.study_name!r} in {STUDIES_DIR}/ — pass --storage where it lives, or run rapid-search search first")
    # read-only: never creates a journal file; reading while workers write is safe (appends only)
    storage = open_storage(args.storage, study_name=args.study_name, studies_dir=STUDIES_DIR, create=False, allow_sqlite=True)
    try:
        study = optuna.load_study(study_name=args.study_name, storage=storage)
    except KeyError:
        raise SearchError(f"no study named {args.study_name!r} in that storage — check --study-name") from None
    return study


def _export_study(args: argparse.Namespace) -> int:
    from .outputs import check_output
    from .runtime.schedule import Budget
    from .search.budget import Target, parse_budget, resolve
    from .search.runner import STUDIES_DIR, canonical_setup_value
    from .search.study import SearchError, export_best

    study = _load_study(args)
    setup = study.user_attrs.get("setup") or {}
    text = args.budget or setup.get("budget")
    if text is None:
        raise SearchError(f"study {args.study_name!r} records no budget — pass --budget")
    spec = own = parse_budget(text)
    if setup.get("budget"):
        own = parse_budget(setup["budget"])
    if spec.lo is not None:  # a range study exported without --budget: its high end
        if args.budget is not None:
            raise SearchError(f"export writes one schedule — give --budget one budget inside the study's range {own.canonical}, e.g. {own.ends()[1].canonical}")
        spec = spec.ends()[1]
    base = {"base_gflops": float(study.user_attrs["base_gflops"])}
    if own.kind == "latency" and own.relative:  # the study records the creator's target, a fraction of its measured unreduced latency
        base["base_latency_ms"] = float(study.user_attrs["target"]) / own.value
    if own.lo is not None:  # any budget inside the range
        lo, hi = Target.of(own, **base).lo, Target.of(own, **base).value
        target = resolve(spec, **base) if spec.kind == own.kind else math.nan
        if not lo * (1 - 1e-9) <= target <= hi * (1 + 1e-9):
            raise SearchError(f"budget {spec.canonical} is outside the study's range {own.canonical} — export a budget inside it, or search a wider range")
    elif spec.kind == "gflops":
        target = resolve(spec, **base)
    elif args.budget is None or spec.canonical == canonical_setup_value("budget", setup.get("budget")):
        target = float(study.user_attrs["target"])
    else:
        raise SearchError("a latency budget is measured on the device: export with the study's own budget, or run a search for it")
    out = args.out or STUDIES_DIR / f"{args.study_name}.yaml"
    check_output(out, option="--out", example="schedule.yaml", reads=_storage_files(args.storage, args.study_name, STUDIES_DIR))
    budget = Budget(spec=spec.canonical, kind=spec.kind, target=round(target, 6))
    gflops = spec.kind == "gflops"  # latency: the trials drawn for this target or a tighter one (their timing margin kept)
    final, trial = export_best(
        study, out, budget=budget, provenance={"exported_from": args.study_name},
        max_gflops=target if gflops else None, max_target=None if gflops or own.lo is None else target,
    )
    print(f"schedule written to {out} (trial {trial.number}, {final.budget.achieved.get('gflops', 0):.3f} GFLOPs)")
    _record_export(study, spec.canonical, final, trial, out)
    return 0


def _record_export(study: Any, budget: str, final: Any, trial: Any, out: Path) -> None:
    """Note the export in the study (``rapid-search front`` marks it); the schedule is written
    already, so a storage that refuses the write costs a line on stderr, not the export."""
    entry = {"budget": budget, "trial": trial.number, "out": str(out), "gflops": final.budget.achieved.get("gflops"),
             "score": trial.user_attrs.get("score", trial.value), **{k: v for k, v in final.budget.achieved.items() if k == "predicted_ms"}}
    kept = [e for e in study.user_attrs.get("exports", []) if isinstance(e, dict) and (e.get("budget"), e.get("out")) != (budget, str(out))]
    try:
        study.set_user_attr("exports", (kept + [entry])[-100:])
    except Exception as e:  # noqa: BLE001 - a read-only storage
        _say(f"rapid-search: note: the export is not recorded in the study ({e.__class__.__name__}); front will not mark it")


def _cmd_front(args: argparse.Namespace) -> int:
    import optuna

    from .outputs import FIGURE_FORMATS, check_output
    from .search.runner import STUDIES_DIR
    from .search.study import SearchError
    from .tools.front import front_table, pareto_front, plot_front, study_points

    check_output(args.out, option="--out", example="front.png", reads=_storage_files(args.storage, args.study_name, STUDIES_DIR), formats=FIGURE_FORMATS)
    old = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = _load_study(args)
    finally:
        optuna.logging.set_verbosity(old)
    points, unit, metric = study_points(study)
    if not points:
        raise SearchError(f"study {args.study_name!r} has no finished trial that meets its budget — run rapid-search search first")
    front = pareto_front(points)
    setup = study.user_attrs.get("setup") or {}
    for line in front_table(front, unit=unit, metric=metric, n_points=len(points)):
        print(line)
    title = f"{setup.get('model', '?')} {setup.get('budget', '')}: study {args.study_name} ({len(points)} trials)"
    plot_front(points, front, study.user_attrs.get("exports", []), args.out, unit=unit, metric=metric, title=title)
    print(f"front written to {args.out}")
    return 0


def _storage_files(spec: Optional[str], study_name: str, studies_dir: Path) -> list[tuple[str, Optional[Path]]]:
    """``(what, path)`` of the file a study lives in: its journal file or SQLite database."""
    from .storage import journal_path

    files: list[tuple[str, Optional[Path]]] = [("the study's journal file", journal_path(spec, study_name, studies_dir))]
    if spec and spec.lower().startswith("sqlite:///"):
        files.append(("the study's SQLite database", Path(spec[len("sqlite:///") :].split("?", 1)[0])))
    return files


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .tools.data import load_images
    from .tools.evaluate import fidelity, predict
    from .runtime.flops import ModelInfo
    from .tools.loading import load_model
    from .tools.measure import measure_model, parse_device, set_cpu_threads
    from .runtime.patch import applied
    from .runtime.schedule import Schedule

    schedule = Schedule.load(args.schedule)
    device = parse_device(args.device)
    set_cpu_threads(args.threads)
    if not args.data.is_dir():
        from .tools.data import DataError

        what = "is not a directory" if args.data.exists() else "does not exist"
        raise DataError(f"data folder {args.data} {what} — pass --data with an ImageFolder tree or a flat folder of images")
    if args.json is not None:  # refuse an unwritable --json, or one that is an input, before the work
        from .outputs import check_output

        check_output(
            args.json, option="--json", example="result.json",
            reads=[("the --schedule file", args.schedule), ("the --checkpoint file", args.checkpoint)], data=[args.data],
        )
    model = load_model(args.model or schedule.model.name, checkpoint=args.checkpoint, device=device, dtype=args.dtype)
    info = ModelInfo.from_model(model)
    schedule.model.check(info.fingerprint())
    imgs = load_images(args.data, model=model, limit=args.limit)
    base = predict(model, imgs.images, None, batch_size=args.batch_size, device=device, info=info)
    red = predict(model, imgs.images, schedule, batch_size=args.batch_size, device=device, info=info)
    scores = fidelity(red.logits, base.logits, imgs.labels)
    base_scores = fidelity(base.logits, base.logits, imgs.labels)
    size = tuple(imgs.images.shape[1:])
    timing = dict(device=device, batch_size=args.batch_size, input_size=size, repeats=args.repeats, compile=args.compile)
    t_base = measure_model(model, **timing)
    with applied(model, schedule):
        t_red = measure_model(model, **timing)
    g_base, g_red = info.base_gflops, float(red.macs.mean()) / 1e9
    result = {
        "schedule": str(args.schedule),
        "model": info.name,
        "images": len(imgs),
        "skipped": len(imgs.skipped),
        "device": str(device),
        "dtype": args.dtype,
        "compiled": args.compile,
        "batch_size": args.batch_size,
        "unreduced": {**base_scores, "gflops": g_base, "images_per_s": t_base.images_per_s},
        "schedule_scores": {**scores, "gflops": g_red, "images_per_s": t_red.images_per_s},
        "speedup": t_red.images_per_s / t_base.images_per_s,
        "ideal_speedup": g_base / g_red,
    }
    result["speedup_of_ideal"] = result["speedup"] / result["ideal_speedup"]
    top = lambda d: f"{d['top1']:.2%}" if "top1" in d else "n/a"  # noqa: E731
    print(f"{info.name} on {len(imgs)} images from {args.data} ({device}, {args.dtype}, batch {args.batch_size}); skipped {len(imgs.skipped)}")
    print(f"{'':12s}{'top-1':>8s}{'agree':>8s}{'KL':>8s}{'GFLOPs':>8s}{'img/s':>9s}")
    print(f"{'unreduced':12s}{top(base_scores):>8s}{'100.0%':>8s}{0.0:8.4f}{g_base:8.3f}{t_base.images_per_s:9.1f}")
    print(f"{'schedule':12s}{top(scores):>8s}{scores['agreement']:8.1%}{scores['kl']:8.4f}{g_red:8.3f}{t_red.images_per_s:9.1f}")
    print(f"speedup {result['speedup']:.2f}x (ideal {result['ideal_speedup']:.2f}x, {result['speedup_of_ideal']:.0%} of ideal)")
    if args.json:
        from .runtime.schedule import atomic_write_text

        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from .runtime.schedule import Schedule

    from .termsafe import printable

    s = Schedule.load(args.schedule)
    m = s.model
    lines = [f"{args.schedule}: {m.name} (depth {m.depth}, {m.num_tokens} tokens, {m.num_prefix_tokens} prefix)"]
    if s.budget:
        lines.append(f"budget {s.budget.spec} (target {s.budget.target}); achieved {s.budget.achieved}")
    if s.scores:
        lines.append("scores " + ", ".join(f"{k}={v}" for k, v in s.scores.items()))
    if s.provenance:
        lines.append("provenance " + ", ".join(f"{k}={v}" for k, v in s.provenance.items()))
    lines.append(s.describe())
    print(printable("\n".join(lines)))  # the schedule is untrusted: no control characters reach the terminal
    sys.stdout.flush()  # a closed pipe (show s.yaml | head) is reported here, inside main
    return 0


def _say(line: str, args: Optional[argparse.Namespace] = None) -> None:
    """Write one line to stderr: any part of the storage's password removed (whatever raised
    the message, and however the URL was shaped) and control characters made visible."""
    from .termsafe import printable

    storage = getattr(args, "storage", None)
    if storage:
        try:
            from .redact import scrub

            line = scrub(line, storage, pieces=False)  # driver texts in it were scrubbed piece by piece already
        except ImportError:  # runtime-only install: no storage URLs either
            pass
    sys.stderr.write(printable(line) + "\n")


def _quiet_stdout() -> None:
    """After a broken pipe (``rapid-search show s.yaml | head``): send what is still buffered to
    /dev/null so that the interpreter's final flush does not complain."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout is no real file (captured, closed)
        pass


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``rapid-search``; returns the exit code.

    Errors end in one line on stderr and exit code 2; Ctrl-C (at any point, start-up included)
    in one line and exit code 130; a closed pipe on stdout (``... | head``) quietly, with exit
    code 141 (as a process ended by SIGPIPE).
    """
    args: Optional[argparse.Namespace] = None
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
            argv = ["search", *argv]
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help, --version, or a usage error already reported on one line
            return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_USAGE)
        return _run(args)
    except KeyboardInterrupt:
        _say("rapid-search: interrupted", args)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_BROKEN_PIPE


def _run(args: argparse.Namespace) -> int:
    commands: dict[str, Callable[[argparse.Namespace], int]] = {
        "search": _cmd_search,
        "export": _cmd_export,
        "front": _cmd_front,
        "evaluate": _cmd_evaluate,
        "show": _cmd_show,
    }
    try:
        require_extras(args.command)
        if args.command in ("bench", "visualize"):
            return int(args._main(args) or 0)
        return commands[args.command](args)
    except BrokenPipeError:
        raise
    except RapidSearchError as e:
        _say(f"rapid-search: error: {_first_line(e)}", args)
        return EXIT_USAGE
    except (ValueError, ImportError, OSError) as e:
        missing = _missing_extra(e)  # an optional module imported later than the up-front check
        if missing is not None:
            e = MissingExtraError(args.command, missing)
        _say(f"rapid-search: error: {_first_line(e)}", args)
        return EXIT_USAGE
    except MemoryError:
        _say("rapid-search: error: out of memory — lower --batch-size (or --calib-images)", args)
        return EXIT_USAGE
    except RecursionError:
        _say("rapid-search: error: an input is nested too deeply to read — simplify it", args)
        return EXIT_USAGE
    except RuntimeError as e:  # torch's allocator failures; anything else is a bug worth a traceback
        text = str(e)
        if "out of memory" not in text and "can't allocate memory" not in text:
            raise
        _say("rapid-search: error: out of memory — lower --batch-size (or --calib-images)", args)
        return EXIT_USAGE


def _first_line(e: BaseException) -> str:
    text = str(e)
    return " ".join(text.splitlines()[0].split()) if text.strip() else e.__class__.__name__


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
