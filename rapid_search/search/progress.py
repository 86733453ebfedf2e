"""Progress of a search: a rich live bar, timestamped plain lines, or errors only.

:class:`Progress` is a context manager and an Optuna callback (``callbacks=[progress]``). Its
messages are records of the ``rapid_search.search`` logger; while it is open its handler also
writes Optuna's records (Optuna's default handler is detached, and re-attached on exit), without
Optuna's per-trial lines: the callback reports every trial.

Example:
    >>> import io, optuna
    >>> buf = io.StringIO()
    >>> study = optuna.create_study(direction="maximize")
    >>> with Progress("plain", stream=buf) as prog:
    ...     prog.start(2)
    ...     study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2, callbacks=[prog])
    >>> "[2/2] COMPLETE" in buf.getvalue()
    True
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import re
import sys
import time
from typing import Any, Mapping, Optional, TextIO

import optuna
from optuna.trial import TrialState

__all__ = ["Progress", "MODES", "summarize_search"]

#: Accepted values of ``Progress(mode)``.
MODES = ("auto", "rich", "plain", "quiet")

_OPTUNA_TRIAL_LINE = re.compile(r"^Trial \d+ (finished|pruned|failed)")


def _duration(seconds: Optional[float]) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-:--"
    h, rem = divmod(int(round(seconds)), 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60}:{rem % 60:02d}"


def _is_terminal(stream: Any) -> bool:
    try:
        return os.environ.get("TERM") != "dumb" and bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class Progress:
    """The display of one search.

    Args:
        mode: ``rich`` (a live bar: finished/total, elapsed, ETA, best so far; messages above it),
            ``plain`` (one timestamped, flushed line per trial and message: CI logs, ``nohup``),
            ``quiet`` (errors only) or ``auto`` (rich on a terminal with rich installed, else plain).
        stream: Where to write (default ``sys.stderr``).
        metric: The metric optimised (labels the value; ``kl`` is maximised as ``-kl``).

    Raises:
        ValueError: Unknown ``mode``.
        ImportError: ``mode="rich"`` without rich installed.
    """

    def __init__(self, mode: str = "auto", *, stream: Optional[TextIO] = None, metric: Optional[str] = None) -> None:
        if mode not in MODES:
            raise ValueError(f"progress mode {mode!r} is unknown — use one of: {', '.join(MODES)}")
        has_rich = importlib.util.find_spec("rich") is not None  # without importing it
        self.stream = stream if stream is not None else sys.stderr
        if mode == "auto":
            mode = "rich" if has_rich and _is_terminal(self.stream) else "plain"
        if mode == "rich" and not has_rich:
            raise ImportError("the rich progress view needs rich — pip install 'rapid-search[search]' or use --progress plain")
        self.mode = mode
        self.value_name = "value" if metric is None else f"-{metric}" if metric == "kl" else metric
        self.total = self.done = self._done_before = 0
        self.best: Any = None  # the best feasible COMPLETE trial (an optuna FrozenTrial)
        self._t0 = time.monotonic()
        self._bar: Any = None
        self._task: Any = None
        self._handlers: list[tuple[logging.Logger, logging.Handler]] = []
        self._optuna_default = False
        self.logger = logging.getLogger("rapid_search.search")
        self.logger.propagate = False
        self.logger.setLevel(logging.INFO)

    def _handler(self, prefix: str) -> logging.Handler:
        if self.mode == "rich":
            from rich.logging import RichHandler

            h: logging.Handler = RichHandler(console=self._bar.console, show_path=False, show_level=False, markup=False, log_time_format="%H:%M:%S")
            h.setFormatter(logging.Formatter(prefix + "%(message)s"))
        else:
            h = logging.StreamHandler(self.stream)
            h.setFormatter(logging.Formatter("[%(asctime)s] " + prefix + "%(message)s", "%Y-%m-%d %H:%M:%S"))
        h.setLevel(logging.ERROR if self.mode == "quiet" else logging.NOTSET)
        return h

    def __enter__(self) -> "Progress":
        if self.mode == "rich":
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            columns = (TextColumn("[bold]trials"), BarColumn(), MofNCompleteColumn(), TextColumn("elapsed"), TimeElapsedColumn())
            columns += (TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[best]}"))
            self._bar = Bar(*columns, console=Console(file=self.stream, highlight=False))
            self._bar.start()
        theirs = self._handler("optuna: ")
        theirs.addFilter(lambda r: r.levelno >= logging.WARNING or not _OPTUNA_TRIAL_LINE.match(r.getMessage()))
        optuna_root = logging.getLogger("optuna")
        optuna.logging.get_verbosity()  # makes Optuna attach its default handler if it has not yet
        before = list(optuna_root.handlers)
        optuna.logging.disable_default_handler()
        self._optuna_default = any(h not in optuna_root.handlers for h in before)
        self._handlers = [(self.logger, self._handler("")), (optuna_root, theirs)]
        for logger, h in self._handlers:
            logger.addHandler(h)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        for logger, h in self._handlers:
            logger.removeHandler(h)
        self._handlers = []
        if self._optuna_default:
            optuna.logging.enable_default_handler()
            self._optuna_default = False

    def log(self, msg: str, *, level: int = logging.INFO) -> None:
        """Show a message, one record per line (quiet mode shows only ``level >= ERROR``)."""
        for line in str(msg).splitlines() or [""]:
            self.logger.log(level, line)

    def start(self, total_trials: int, *, done: int = 0, study: Optional[str] = None, storage: Optional[str] = None) -> None:
        """Begin counting: ``total_trials`` finished at the end, ``done`` already (a resumed study)."""
        self.total, self.done = int(total_trials), int(done)
        self._done_before, self._t0 = self.done, time.monotonic()
        parts = [f"search: {self.total} trials", f"{done} already done (resuming)" if done else ""]
        parts += [f"study {study}" if study else "", f"storage {storage}" if storage else ""]
        self.log(", ".join(p for p in parts if p))
        if self._bar is not None:
            self._task = self._bar.add_task("trials", total=self.total, completed=self.done, best="")

    def __call__(self, study: Any, trial: Any) -> None:
        """The Optuna callback: report a finished trial (``[k/N]`` counts the whole study's, other workers' too)."""
        finished = (TrialState.COMPLETE, TrialState.PRUNED)
        self.done = max(self.done + (trial.state in finished), len(study.get_trials(deepcopy=False, states=finished)))
        feasible = all(v <= 0 for v in (trial.constraints or {}).values())
        if trial.state == TrialState.COMPLETE and feasible and trial.value is not None:  # the search maximises
            if self.best is None or trial.value > self.best.value:
                self.best = trial
        value = "-" if trial.value is None else f"{trial.value:.5g}"
        line = f"trial {trial.number:>4d} [{self.done}/{self.total}] {trial.state.name:<8s} {self.value_name} {value}{_cost(trial)}"
        line += "" if feasible else " (over budget)"
        line += f" | {self._best_text()}" if self.best is not None else ""
        new = self.done - self._done_before
        eta = max(0, self.total - self.done) * self.elapsed / new if new > 0 else None
        line += f" | elapsed {_duration(self.elapsed)} ETA {_duration(eta)}" + _params(trial)
        self.log(line, level=logging.WARNING if trial.state == TrialState.FAIL else logging.INFO)
        if self._task is not None:
            self._bar.update(self._task, completed=self.done, best=self._best_text())

    def finish(self, text: str = "") -> None:
        """Show the closing summary (after the last trial)."""
        head = f"finished {self.done}/{self.total} trials in {_duration(self.elapsed)}"
        head += f"; {self._best_text()}" if self.best is not None else ""
        if self._task is not None:
            self._bar.update(self._task, completed=self.done)
        self.log(head + ("\n" + text if text else ""))

    def _best_text(self) -> str:
        if self.best is None:
            return ""
        return f"best #{self.best.number} {self.value_name} {self.best.value:.5g}{_cost(self.best)}"

    @property
    def elapsed(self) -> float:
        """Seconds since :meth:`start`."""
        return time.monotonic() - self._t0


def _cost(trial: Any) -> str:
    """`` @ <cost>`` of a trial (timed or predicted ms, or GFLOPs), or ``""``."""
    attrs = trial.user_attrs
    if "measured_ms" in attrs and "predicted_ms" in attrs:  # (a trial pruned before projection timed another schedule)
        return f" @ {attrs['measured_ms']:.2f} ms (predicted {attrs['predicted_ms']:.2f})"
    if "predicted_ms" in attrs:
        return f" @ {attrs['predicted_ms']:.2f} ms"
    gflops = attrs.get("gflops", attrs.get("analytic_gflops"))
    return "" if gflops is None else f" @ {gflops:.4g} GFLOPs"


def _params(trial: Any, *, width: int = 100) -> str:
    """`` | <parameters>`` of a trial (``[warm-start name]`` first for enqueued baselines), or ``""``."""
    text = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
    warm = trial.user_attrs.get("warm_start")
    text = f"[{warm}] {text}".strip() if warm else text
    return "" if not text else " | " + (text if len(text) <= width else text[: width - 1] + "…")


def summarize_search(study: Any, schedule: Any = None, out: Any = None, stats: Optional[Mapping[str, Any]] = None, *, metric: Optional[str] = None) -> str:
    """A few lines describing a finished search (for :meth:`Progress.finish`)."""
    lines = [f"study {study.study_name}" + (f" (metric {metric})" if metric else "")]
    if schedule is not None and schedule.budget is not None:
        b = schedule.budget
        ach = ", ".join(f"{k} {v}" for k, v in b.achieved.items())
        lines.append(f"best: trial {schedule.provenance.get('trial', '?')} — budget {b.spec} (target {b.target}); achieved {ach}")
    if schedule is not None and schedule.scores:
        lines.append("scores: " + ", ".join(f"{k} {v}" for k, v in schedule.scores.items()))
    if out is not None:
        lines.append(f"schedule written to {out}")
    if stats:
        lines.append("stats: " + ", ".join(f"{k} {v}" for k, v in stats.items() if v is not None))
    return "\n".join(lines)
