"""Progress reporting for a search: a live terminal view, plain log lines, or silence.

:meth:`Progress.create` picks the display:

* ``rich``  — a live view (overall progress bar, elapsed time and ETA, the current best value and
  its cost, a table of the top-5 trials); the default when the stream is a terminal.
* ``plain`` — one timestamped, flushed line per finished trial (and per message); the default
  when the stream is not a terminal (CI logs, ``nohup``, pipes).
* ``quiet`` — nothing but errors.

While the context manager is open, Optuna's own log records are routed through the display
(its default stderr handler is detached and re-attached on exit), so they neither tear the live
view nor interleave unformatted with the plain lines. Optuna's per-trial "Trial N finished ..."
lines are dropped by default because the display reports every trial itself.

rich is imported only here, and only when the ``rich`` display is used.

Example:
    >>> import io
    >>> from rapid_search.search.progress import Progress
    >>> buf = io.StringIO()
    >>> with Progress.create("plain", stream=buf) as prog:
    ...     prog.start(2)
    ...     prog.update(0, "COMPLETE", 0.81, "switch=3", 0.62)
    >>> "COMPLETE value 0.81 @ 0.62" in buf.getvalue()
    True
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import os
import re
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Mapping, Optional, TextIO, Union

__all__ = ["Progress", "TrialRecord", "MODES", "summarize_search"]

#: Accepted values of ``Progress.create(mode=...)``.
MODES = ("auto", "rich", "plain", "quiet")

_FINISHED = ("COMPLETE", "PRUNED", "FAIL")
_OPTUNA_TRIAL_LINE = re.compile(r"^Trial \d+ (finished|pruned|failed)")

Cost = Union[float, int, str, None]


@dataclass
class TrialRecord:
    """One finished trial, as the display shows it.

    Attributes:
        number: Optuna trial number.
        state: ``COMPLETE``, ``PRUNED``, ``FAIL`` (or another state name).
        value: Objective value (None when pruned or failed).
        params: Short text of the trial's parameters.
        cost: Cost (a number in ``cost_unit``, or preformatted text).
        feasible: Whether the trial met the budget.
    """

    number: int
    state: str
    value: Optional[float]
    params: str = ""
    cost: Cost = None
    feasible: bool = True


def _now() -> str:
    return _dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")


def _fmt_duration(seconds: Optional[float]) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-:--"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _fmt_value(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.5g}"


def _state_name(state: Any) -> str:
    name = getattr(state, "name", state)
    return str(name).upper()


class _OptunaHandler(logging.Handler):
    """Forwards Optuna's log records to :meth:`Progress.log`."""

    def __init__(self, progress: "Progress", *, level: int, forward_trial_lines: bool) -> None:
        super().__init__(level)
        self.progress = progress
        self.forward_trial_lines = forward_trial_lines

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
            if not self.forward_trial_lines and record.levelno < logging.WARNING and _OPTUNA_TRIAL_LINE.match(msg):
                return  # the display reports every trial itself
            self.progress.log(f"optuna: {msg}", level=record.levelno)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


class Progress:
    """Progress of a search; use :meth:`create` and the context manager.

    The base class is the ``plain`` display; ``rich`` and ``quiet`` are subclasses.

    Example:
        >>> with Progress.create("quiet") as prog:
        ...     prog.start(10)
        ...     prog.update(0, "COMPLETE", 0.5, "r=8", 0.6)
    """

    mode = "plain"

    def __init__(self, *, stream: Optional[TextIO] = None, forward_trial_lines: bool = False) -> None:
        """Create a display; prefer :meth:`create`.

        Args:
            stream: Where to write (default ``sys.stderr`` at the time of each write).
            forward_trial_lines: Also forward Optuna's own "Trial N finished ..." lines.
        """
        self._stream = stream
        self.forward_trial_lines = forward_trial_lines
        self._lock = threading.RLock()
        self.total = 0
        self.done = 0
        self.initial_done = 0
        self.direction = "maximize"
        self.value_name = "value"
        self.cost_unit = ""
        self.title = ""
        self.trials: list[TrialRecord] = []
        self.best: Optional[TrialRecord] = None
        self._t0 = time.monotonic()
        self._depth = 0
        self._handler: Optional[_OptunaHandler] = None
        self._restore_default_handler = False

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def create(cls, mode: str = "auto", *, stream: Optional[TextIO] = None, forward_trial_lines: bool = False) -> "Progress":
        """The display for ``mode``.

        Args:
            mode: ``auto`` (rich on a terminal, plain otherwise), ``rich``, ``plain`` or ``quiet``.
            stream: Where to write (default ``sys.stderr``).
            forward_trial_lines: Also forward Optuna's own per-trial log lines.

        Raises:
            ValueError: Unknown ``mode``.
            ImportError: ``mode="rich"`` without rich installed.
        """
        if mode not in MODES:
            raise ValueError(f"progress mode {mode!r} is unknown — use one of: {', '.join(MODES)}")
        out = stream if stream is not None else sys.stderr
        if mode == "auto":
            mode = "rich" if _is_terminal(out) and _has_rich() else "plain"
        if mode == "rich" and not _has_rich():
            raise ImportError("the rich progress view needs rich — pip install 'rapid-search[search]' or use --progress plain")
        klass: type[Progress] = {"rich": _RichProgress, "plain": Progress, "quiet": _QuietProgress}[mode]
        return klass(stream=stream, forward_trial_lines=forward_trial_lines)

    @property
    def stream(self) -> TextIO:
        """The stream written to."""
        return self._stream if self._stream is not None else sys.stderr

    # ---- context manager: route Optuna's logging ----------------------------------------------
    def __enter__(self) -> "Progress":
        with self._lock:
            self._depth += 1
            if self._depth == 1:
                self._route_optuna()
                self._open()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                try:
                    self._close()
                finally:
                    self._unroute_optuna()

    def _optuna_level(self) -> int:
        return logging.NOTSET

    def _route_optuna(self) -> None:
        try:
            import optuna
        except ImportError:  # pragma: no cover - the search always has optuna
            return
        root = logging.getLogger("optuna")
        optuna.logging.get_verbosity()  # makes Optuna attach its default handler if it has not yet
        before = list(root.handlers)
        optuna.logging.disable_default_handler()
        self._restore_default_handler = any(h not in root.handlers for h in before)
        self._handler = _OptunaHandler(self, level=self._optuna_level(), forward_trial_lines=self.forward_trial_lines)
        root.addHandler(self._handler)

    def _unroute_optuna(self) -> None:
        if self._handler is None:
            return
        import optuna

        logging.getLogger("optuna").removeHandler(self._handler)
        self._handler = None
        if self._restore_default_handler:
            optuna.logging.enable_default_handler()
            self._restore_default_handler = False

    # ---- hooks for subclasses ----------------------------------------------------------------
    def _open(self) -> None:
        """Start the display (rich: the live view)."""

    def _close(self) -> None:
        """Stop the display."""

    def _emit(self, line: str, *, level: int = logging.INFO) -> None:
        """Write one line."""
        s = self.stream
        s.write(f"[{_now()}] {line}\n")
        s.flush()

    def _refresh(self) -> None:
        """Redraw after a change (rich only)."""

    # ---- the API -----------------------------------------------------------------------------
    def start(
        self,
        total_trials: int,
        *,
        done: int = 0,
        study: Optional[str] = None,
        storage: Optional[str] = None,
        direction: Optional[str] = None,
        value_name: Optional[str] = None,
        cost_unit: Optional[str] = None,
    ) -> None:
        """Begin counting trials.

        Args:
            total_trials: Trials the search will have finished at the end (resumed ones included).
            done: Trials already finished (a resumed study).
            study: Study name, shown in the header.
            storage: Where the study lives, shown in the header.
            direction: ``maximize`` (default) or ``minimize``: which value is best.
            value_name: Label of the objective value (e.g. the metric).
            cost_unit: Unit appended to numeric costs (e.g. ``GFLOPs``, ``ms``).
        """
        with self._lock:
            self.total = int(total_trials)
            self.done = self.initial_done = int(done)
            self._t0 = time.monotonic()
            if direction is not None:
                if direction not in ("maximize", "minimize"):
                    raise ValueError(f"direction {direction!r} must be 'maximize' or 'minimize'")
                self.direction = direction
            if value_name is not None:
                self.value_name = value_name
            if cost_unit is not None:
                self.cost_unit = cost_unit
            parts = [f"search: {self.total} trials"]
            if done:
                parts.append(f"{done} already done (resuming)")
            if study:
                parts.append(f"study {study}")
            if storage:
                parts.append(f"storage {storage}")
            self.title = ", ".join(parts)
            self._started()

    def _started(self) -> None:
        self._emit(self.title)

    def update(
        self,
        trial_number: int,
        state: Any,
        value: Optional[float] = None,
        params_summary: str = "",
        cost: Cost = None,
        *,
        feasible: bool = True,
    ) -> None:
        """Report a finished trial (the best is tracked automatically).

        Args:
            trial_number: Optuna trial number.
            state: ``COMPLETE``, ``PRUNED`` or ``FAIL`` (a string or ``optuna.trial.TrialState``).
            value: Objective value (None when pruned or failed).
            params_summary: Short text of the trial's parameters.
            cost: Cost as a number (in ``cost_unit``) or preformatted text.
            feasible: Whether the trial met the budget (infeasible trials never become best).
        """
        rec = TrialRecord(int(trial_number), _state_name(state), None if value is None else float(value), params_summary, cost, feasible)
        with self._lock:
            self.trials.append(rec)
            if rec.state in _FINISHED:
                self.done += 1
            if rec.state == "COMPLETE" and rec.feasible and rec.value is not None and self._better(rec.value, self.best):
                self.best = rec
            self._trial_done(rec)

    def _trial_done(self, rec: TrialRecord) -> None:
        line = f"trial {rec.number:>4d} [{self.done}/{self.total}] {rec.state:<8s} {self.value_name} {_fmt_value(rec.value)}"
        if rec.cost is not None:
            line += f" @ {self.format_cost(rec.cost)}"
        if not rec.feasible:
            line += " (over budget)"
        if self.best is not None:
            line += f" | best #{self.best.number} {_fmt_value(self.best.value)}"
        line += f" | elapsed {_fmt_duration(self.elapsed)} ETA {_fmt_duration(self.eta)}"
        if rec.params:
            line += f" | {rec.params}"
        self._emit(line)

    def set_best(self, trial_number: int, value: float, cost: Cost = None, params_summary: str = "") -> None:
        """Declare the current best trial explicitly (overrides the automatic tracking).

        Args:
            trial_number: Optuna trial number.
            value: Its objective value.
            cost: Its cost (a number in ``cost_unit`` or text).
            params_summary: Short text of its parameters.
        """
        with self._lock:
            self.best = TrialRecord(int(trial_number), "COMPLETE", float(value), params_summary, cost, True)
            self._refresh()

    def log(self, msg: str, *, level: int = logging.INFO) -> None:
        """Show a message (quiet mode shows only ``level >= ERROR``).

        Args:
            msg: The message (one line or several).
            level: A ``logging`` level.
        """
        with self._lock:
            for line in str(msg).splitlines() or [""]:
                self._emit(line, level=level)

    def error(self, msg: str) -> None:
        """Show an error (shown in every mode)."""
        self.log(msg, level=logging.ERROR)

    def finish(
        self,
        summary: Any = None,
        schedule: Any = None,
        out: Any = None,
        stats: Optional[Mapping[str, Any]] = None,
        *,
        metric: Optional[str] = None,
    ) -> None:
        """Stop the display and show a summary.

        Args:
            summary: Text, a mapping (shown as ``key: value`` lines), None, or an ``optuna.Study``
                (then ``schedule``, ``out`` and ``stats`` describe the result; see
                :func:`summarize_search`).
            schedule: The exported schedule (with a study).
            out: Where it was written (with a study).
            stats: Search statistics (with a study).
            metric: The metric optimised (with a study).
        """
        with self._lock:
            if summary is not None and not isinstance(summary, (str, Mapping)):
                text = summarize_search(summary, schedule, out, stats, metric=metric)
            elif isinstance(summary, Mapping):
                text = "\n".join(f"{k}: {v}" for k, v in summary.items())
            else:
                text = summary or ""
            self._finished(text)

    def _finished(self, text: str) -> None:
        head = f"finished {self.done}/{self.total} trials in {_fmt_duration(self.elapsed)}"
        if self.best is not None:
            head += f"; best #{self.best.number} {self.value_name} {_fmt_value(self.best.value)}"
            if self.best.cost is not None:
                head += f" @ {self.format_cost(self.best.cost)}"
        self._emit(head)
        for line in text.splitlines():
            self._emit(line)

    # ---- the Optuna callback ------------------------------------------------------------------
    def trial(self, study: Any, trial: Any, *, metric: Optional[str] = None) -> None:
        """Report a finished ``optuna.trial.FrozenTrial`` (use as, or inside, an Optuna callback).

        Args:
            study: The ``optuna.Study`` (its direction decides which value is best).
            trial: The finished trial.
            metric: The metric optimised (the label of the value; ``kl`` is shown as ``-kl``).
        """
        direction = getattr(getattr(study, "direction", None), "name", None)
        if direction in ("MAXIMIZE", "MINIMIZE"):
            self.direction = direction.lower()
        if metric is not None:
            self.value_name = f"-{metric}" if metric == "kl" else metric
        attrs = getattr(trial, "user_attrs", {}) or {}
        if "predicted_ms" in attrs:
            cost: Cost = f"{attrs['predicted_ms']:.2f} ms"
        elif "gflops" in attrs:
            cost = f"{attrs['gflops']:.4g} GFLOPs"
        elif "analytic_gflops" in attrs:
            cost = f"{attrs['analytic_gflops']:.4g} GFLOPs"
        else:
            cost = None
        constraints = getattr(trial, "constraints", None) or {}
        feasible = all(v <= 0 for v in constraints.values())
        value = trial.value if _state_name(trial.state) == "COMPLETE" else None
        self.update(trial.number, trial.state, value, trial_params_summary(trial), cost, feasible=feasible)

    __call__ = trial  # ``study.optimize(..., callbacks=[progress])`` works too

    # ---- derived -----------------------------------------------------------------------------
    def _better(self, value: float, than: Optional[TrialRecord]) -> bool:
        if than is None or than.value is None:
            return True
        return value > than.value if self.direction == "maximize" else value < than.value

    def top(self, k: int = 5) -> list[TrialRecord]:
        """The ``k`` best feasible completed trials, best first."""
        # no lock: the rich refresh thread calls this while holding rich's own lock
        done = [t for t in list(self.trials) if t.state == "COMPLETE" and t.feasible and t.value is not None]
        sign = -1.0 if self.direction == "maximize" else 1.0
        return sorted(done, key=lambda t: (sign * float(t.value), t.number))[:k]  # type: ignore[arg-type]

    @property
    def elapsed(self) -> float:
        """Seconds since :meth:`start`."""
        return time.monotonic() - self._t0

    @property
    def eta(self) -> Optional[float]:
        """Estimated seconds left (None before the first trial of this run finishes)."""
        new = self.done - self.initial_done
        if new <= 0:
            return None
        return max(0, self.total - self.done) * self.elapsed / new

    def format_cost(self, cost: Cost) -> str:
        """A cost as text (numbers get ``cost_unit``)."""
        if cost is None:
            return "-"
        if isinstance(cost, str):
            return cost
        return f"{cost:.4g} {self.cost_unit}".rstrip()


class _QuietProgress(Progress):
    """Nothing but errors."""

    mode = "quiet"

    def _optuna_level(self) -> int:
        return logging.ERROR

    def _emit(self, line: str, *, level: int = logging.INFO) -> None:
        if level >= logging.ERROR:
            super()._emit(line, level=level)

    def _started(self) -> None:
        pass

    def _trial_done(self, rec: TrialRecord) -> None:
        pass

    def _finished(self, text: str) -> None:
        pass


class _RichProgress(Progress):
    """A rich live view: progress bar, elapsed/ETA, best trial and the top-5 table."""

    mode = "rich"

    def __init__(self, *, stream: Optional[TextIO] = None, forward_trial_lines: bool = False) -> None:
        super().__init__(stream=stream, forward_trial_lines=forward_trial_lines)
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from rich.progress import Progress as _Bar

        self.console = Console(file=self.stream, highlight=False)
        self._bar = _Bar(
            TextColumn("[bold]trials"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("elapsed"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            auto_refresh=False,
        )
        self._task: Optional[int] = None
        self._live: Any = None

    def __rich__(self) -> Any:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        parts: list[Any] = []
        if self.title:
            parts.append(Text(self.title, style="dim"))
        if self._task is not None:
            parts.append(self._bar)
        if self.best is not None:
            best = Text.assemble(
                ("best ", "bold"),
                (f"#{self.best.number}  {self.value_name} {_fmt_value(self.best.value)}", "bold green"),
                (f"  @ {self.format_cost(self.best.cost)}" if self.best.cost is not None else ""),
            )
            parts.append(best)
        top = self.top(5)
        if top:
            table = Table(title=None, box=None, pad_edge=False, header_style="bold")
            table.add_column("#", justify="right")
            table.add_column(self.value_name, justify="right")
            table.add_column("cost", justify="right")
            table.add_column("params", overflow="ellipsis", no_wrap=True, max_width=max(20, self.console.width - 40))
            for t in top:
                table.add_row(str(t.number), _fmt_value(t.value), self.format_cost(t.cost), t.params)
            parts.append(table)
        if not parts:
            parts.append(Text("preparing ...", style="dim"))
        return Group(*parts)

    def _open(self) -> None:
        from rich.live import Live

        self._live = Live(self, console=self.console, refresh_per_second=4, transient=False)
        self._live.start()

    def _close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
            if not self.console.is_terminal:
                self.console.line()  # a non-terminal gets the final frame without its line end

    def _refresh(self) -> None:
        if self._live is not None:
            self._live.refresh()

    def _emit(self, line: str, *, level: int = logging.INFO) -> None:
        from rich.text import Text

        style = "bold red" if level >= logging.ERROR else "yellow" if level >= logging.WARNING else None
        self.console.print(Text.assemble((f"{_now()[11:]} ", "dim"), (line, style or "")))

    def _started(self) -> None:
        if self._task is None:
            self._task = self._bar.add_task("trials", total=self.total, completed=self.done)
        else:
            self._bar.update(self._task, total=self.total, completed=self.done)
        self._refresh()

    def _trial_done(self, rec: TrialRecord) -> None:
        if self._task is not None:
            self._bar.update(self._task, completed=self.done)
        if rec.state == "FAIL":
            self._emit(f"trial {rec.number} failed", level=logging.WARNING)
        self._refresh()

    def _finished(self, text: str) -> None:
        if self._task is not None:
            self._bar.update(self._task, completed=self.done)
        self._refresh()
        self._close()
        super()._finished(text)


def trial_params_summary(trial: Any, *, width: int = 100) -> str:
    """Short text of a trial's parameters (``warm start`` name for enqueued baselines)."""
    attrs = getattr(trial, "user_attrs", {}) or {}
    warm = attrs.get("warm_start")
    items = []
    for k, v in (getattr(trial, "params", {}) or {}).items():
        items.append(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}")
    text = " ".join(items)
    if warm:
        text = f"[{warm}] {text}".strip()
    return text if len(text) <= width else text[: width - 1] + "…"


def summarize_search(study: Any, schedule: Any = None, out: Any = None, stats: Optional[Mapping[str, Any]] = None, *, metric: Optional[str] = None) -> str:
    """A few lines describing a finished search (used by :meth:`Progress.finish`).

    Args:
        study: The ``optuna.Study``.
        schedule: The exported :class:`rapid_search.Schedule` (or None).
        out: Where it was written.
        stats: ``search_stats`` of the runner (trials, pruning saving, ...).
        metric: The metric optimised.
    """
    lines = [f"study {getattr(study, 'study_name', '?')}" + (f" (metric {metric})" if metric else "")]
    if schedule is not None:
        b = getattr(schedule, "budget", None)
        prov = getattr(schedule, "provenance", {}) or {}
        if b is not None:
            ach = ", ".join(f"{k} {v}" for k, v in b.achieved.items())
            lines.append(f"best: trial {prov.get('trial', '?')} — budget {b.spec} (target {b.target}); achieved {ach}")
        scores = getattr(schedule, "scores", {}) or {}
        if scores:
            lines.append("scores: " + ", ".join(f"{k} {v}" for k, v in scores.items()))
    if out is not None:
        lines.append(f"schedule written to {out}")
    if stats:
        lines.append("stats: " + ", ".join(f"{k} {v}" for k, v in stats.items() if v is not None))
    return "\n".join(lines)


def _is_terminal(stream: Any) -> bool:
    if os.environ.get("TERM") == "dumb":
        return False
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _has_rich() -> bool:
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True
