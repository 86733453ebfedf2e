"""Many workers on one study: an exact trial count, heartbeats, and redoing dead workers' trials.

Several ``rapid-search search`` processes (on one machine with a journal file, or on several
machines with PostgreSQL) given the same ``--storage`` and ``--study-name`` share one Optuna
study. :func:`run_trials` is the loop each of them runs instead of ``study.optimize``:

Exact trial count
    ``--trials N`` is the number of *finished* trials (COMPLETE or PRUNED) in the study, all
    workers together. A trial *claims a slot* when it is finished or running. Before asking for
    a trial a worker counts the claimed slots: N finished ends the worker; N claimed but fewer
    finished means the last slots are being worked on elsewhere, so it waits (watching their
    heartbeats, see below) rather than start a trial that could overshoot. Two workers can still
    ask at the same moment; the storage numbers trials atomically (PostgreSQL locks the study row,
    the journal orders its log), so right after ``ask`` a worker counts the claimed trials with
    *smaller* numbers and, if they already fill N slots, gives its trial up unrun (state FAIL,
    system attribute ``rapid_search:surplus``; a queued trial it took is queued again). The
    lowest-numbered claimants win, so the study ends with exactly N finished trials. FAIL trials
    (surplus, interrupted, dead workers') never count toward N.

Heartbeats (every storage, the same way)
    While a trial runs, a background thread of its worker stores the wall-clock time in the
    trial's system attribute ``rapid_search:heartbeat`` every ``interval`` seconds (through its
    own storage connection; the first beat is written at once by the worker itself, with
    ``rapid_search:worker`` = ``host:pid``). Before every trial, and while waiting, each worker
    looks at the RUNNING trials: one whose heartbeat is older than ``grace`` seconds (or, without
    any heartbeat, that has been seen running for ``grace`` seconds) belongs to a dead worker. It
    is marked FAIL (the storage lets exactly one worker do that; ``rapid_search:failed_because``
    says why) and the same parameters are queued again as a WAITING trial (``failed_trial`` /
    ``retry_history`` system attributes, as Optuna's ``RetryHeartbeatStaleTrialCallback``), at
    most ``max_retry`` times, so the work is redone by whichever worker asks next. Between the
    FAIL and the queueing, the failed trial keeps its slot (``rapid_search:retry_pending``), so
    no other worker takes the slot meant for the redo; a trial failed for good (its objective
    raised, or it was retried ``max_retry`` times) says so (``rapid_search:no_retry``) and keeps no
    slot, even when a worker that meant to retry it wrote ``retry_pending`` and lost the race to
    fail it. Finished trials are never touched.
    Optuna 5's own heartbeat exists only for RDB storages and only inside ``study.optimize``;
    this one also covers the journal file. The clocks of the machines must agree to well within
    ``grace`` (NTP); a worker whose trial was given up (it was stalled past ``grace``) has its late
    result refused by the storage, says so, and carries on.

Interrupts
    Within :func:`run_trials`, SIGINT (Ctrl-C) and SIGTERM raise KeyboardInterrupt in the main
    thread, but never inside storage code (a journal append cut short leaves its lock file behind
    or turns the interrupt into an OSError) nor inside the steps that must happen together: from
    ``ask`` to the trial's first heartbeat (cut short, a trial would stay RUNNING without worker or
    heartbeat until the grace period ran out), from giving a surplus trial up to queueing its
    parameters again, and from failing a trial to queueing its retry (cut short, queued work would
    be lost). There the interrupt is delivered right after. During a trial the heartbeat stops,
    the trial is marked FAIL and queued again (so a resumed search redoes it) and the interrupt
    propagates, also when that clean-up fails (a storage error is logged). A second Ctrl-C during
    the clean-up (say, hanging on an unreachable database) ends it at once: the trial's heartbeat
    goes stale and the next worker recovers it.
"""

from __future__ import annotations

import _thread
import contextlib
import math
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterable, Iterator, Optional

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

__all__ = [
    "HEARTBEAT_KEY",
    "WORKER_KEY",
    "RETRY_PENDING_KEY",
    "NO_RETRY_KEY",
    "deferred_interrupts",
    "SURPLUS_KEY",
    "FAILED_BECAUSE_KEY",
    "Heartbeat",
    "Liveness",
    "TrialCounts",
    "count_trials",
    "retry_trial",
    "run_trials",
]

HEARTBEAT_KEY = "rapid_search:heartbeat"
WORKER_KEY = "rapid_search:worker"
RETRY_PENDING_KEY = "rapid_search:retry_pending"
NO_RETRY_KEY = "rapid_search:no_retry"
SURPLUS_KEY = "rapid_search:surplus"
FAILED_BECAUSE_KEY = "rapid_search:failed_because"

#: Trial states that take one of the ``--trials`` slots.
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


@dataclass
class TrialCounts:
    """Trials of a study by state.

    ``pending`` are trials just given up (dead worker, Ctrl-C) whose retry is not queued yet: they
    keep their slot for the moment between the two storage writes, so no other worker takes it.
    """

    finished: int = 0
    running: list[FrozenTrial] = field(default_factory=list)
    pending: list[FrozenTrial] = field(default_factory=list)
    waiting: int = 0
    failed: int = 0

    @property
    def claimed(self) -> int:
        return self.finished + len(self.running) + len(self.pending)


def _claims(trials: list[FrozenTrial], pending_window: float) -> tuple[list[FrozenTrial], list[FrozenTrial]]:
    """``(claiming, pending)``: trials holding a slot (finished, running, pending a retry)."""
    retried = {t.system_attrs["retry_history"][-1] for t in trials if t.system_attrs.get("retry_history")}
    now = time.time()
    claiming, pending = [], []
    for t in trials:
        if t.state in FINISHED or t.state == TrialState.RUNNING:
            claiming.append(t)
        elif t.state == TrialState.FAIL and t.number not in retried and not t.system_attrs.get(NO_RETRY_KEY):
            since = t.system_attrs.get(RETRY_PENDING_KEY)  # when it was given up (epoch seconds)
            # after pending_window the one who gave it up is presumed dead before queueing the retry
            if isinstance(since, (int, float)) and abs(now - since) < pending_window:
                claiming.append(t)
                pending.append(t)
    return claiming, pending


def count_trials(study: optuna.Study, *, pending_window: float = 60.0) -> TrialCounts:
    """Count the study's trials by state (one read of the storage)."""
    c = TrialCounts()
    trials = study.get_trials(deepcopy=False)
    _, c.pending = _claims(trials, pending_window)
    for t in trials:
        if t.state in FINISHED:
            c.finished += 1
        elif t.state == TrialState.RUNNING:
            c.running.append(t)
        elif t.state == TrialState.WAITING:
            c.waiting += 1
        elif t.state == TrialState.FAIL:
            c.failed += 1
    return c


def _requeue(study: optuna.Study, trial: FrozenTrial, history: list[int]) -> None:
    system_attrs: dict[str, Any] = {"retry_history": history}
    if history:
        system_attrs["failed_trial"] = history[0]
    if "fixed_params" in trial.system_attrs:
        system_attrs["fixed_params"] = trial.system_attrs["fixed_params"]
    # only what says *what* to run; scores and schedule are recomputed by the retry
    user_attrs = {k: trial.user_attrs[k] for k in ("warm_start",) if k in trial.user_attrs}
    study.add_trial(
        optuna.trial.create_trial(
            state=TrialState.WAITING,
            params=trial.params,
            distributions=trial.distributions,
            user_attrs=user_attrs,
            system_attrs=system_attrs,
        )
    )


def retry_trial(study: optuna.Study, trial: FrozenTrial, *, max_retry: Optional[int] = 3) -> bool:
    """Queue ``trial``'s parameters again as a WAITING trial (after it failed through no fault of its own).

    Returns:
        False when the trial was already retried ``max_retry`` times (nothing queued).
    """
    history = list(trial.system_attrs.get("retry_history", [])) + [trial.number]
    if max_retry is not None and len(history) > max_retry:
        return False
    _requeue(study, trial, history)
    return True


def _was_queued(trial: FrozenTrial) -> bool:
    """Whether the trial came from the queue (enqueued warm start or a retry), not from the sampler."""
    return bool(trial.system_attrs.get("fixed_params") or trial.system_attrs.get("retry_history") or "warm_start" in trial.user_attrs)


class Heartbeat:
    """Background thread storing ``time.time()`` in a running trial's ``rapid_search:heartbeat``.

    Args:
        storage: A storage for the thread's writes. For a journal file, pass a separate
            ``JournalStorage`` instance (its replay state is per instance, and sharing one between
            threads mixes up which thread's writes were refused).
        trial_id: The trial's storage id.
        interval: Seconds between beats.
    """

    def __init__(self, storage: Any, trial_id: int, interval: float, *, on_error: Optional[Callable[[str], None]] = None) -> None:
        self.storage, self.trial_id, self.interval = storage, trial_id, float(interval)
        self.lost = False  # another worker gave the trial up (its result will be refused)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._on_error = on_error
        self._warned = False

    def beat(self) -> bool:
        try:
            self.storage.set_trial_system_attr(self.trial_id, HEARTBEAT_KEY, time.time())
            return True
        except UpdateFinishedTrialError:
            self.lost = True
            return False
        except Exception as e:  # a storage hiccup: keep trying, say so once
            if not self._warned and self._on_error is not None:
                self._warned = True
                self._on_error(f"heartbeat of trial id {self.trial_id} could not be stored ({e.__class__.__name__}); retrying")
            return True

    def _run(self, delay: float) -> None:
        if delay > 0 and self._stop.wait(delay):
            return
        while True:
            if not self.beat():
                return
            if self._stop.wait(self.interval):
                return

    def start(self, delay: float = 0.0) -> "Heartbeat":
        """Beat every ``interval`` seconds from now (the first after ``delay``)."""
        self._thread = threading.Thread(target=self._run, args=(delay,), name=f"rapid-heartbeat-{self.trial_id}", daemon=True)
        self._thread.start()
        return self

    def stop(self, wait: bool = True) -> None:
        """Stop beating; ``wait``: until the thread has ended (a beat in progress is finished).

        Without waiting (after an interrupt), a beat stuck on an unreachable database cannot hold
        up the clean-up; the daemon thread ends after that beat.
        """
        self._stop.set()
        if self._thread is not None:
            if wait:
                self._thread.join(timeout=self.interval + 30)
            self._thread = None

    def __enter__(self) -> "Heartbeat":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class Liveness:
    """Finds RUNNING trials of dead workers, fails them and queues their parameters again.

    Args:
        study: The study.
        grace: Seconds without a heartbeat after which a running trial is considered dead.
        max_retry: How often one trial's parameters are queued again at most.
        log: Where to report recoveries.
        critical: Context manager factory for the steps of :meth:`give_up` that must not be cut
            short by an interrupt (see :meth:`deferred_interrupts.critical`).
    """

    def __init__(
        self,
        study: optuna.Study,
        *,
        grace: float,
        max_retry: Optional[int] = 3,
        log: Optional[Callable[[str], None]] = None,
        critical: Callable[[], ContextManager[Any]] = contextlib.nullcontext,
    ) -> None:
        self.study, self.grace, self.max_retry = study, float(grace), max_retry
        self.log = log or (lambda msg: None)
        self._critical = critical
        self._first_seen: dict[int, float] = {}

    def age(self, trial: FrozenTrial, now: Optional[float] = None) -> float:
        """Seconds since the trial's last sign of life."""
        hb = trial.system_attrs.get(HEARTBEAT_KEY)
        if isinstance(hb, (int, float)) and math.isfinite(hb):
            return (time.time() if now is None else now) - float(hb)
        # no heartbeat yet (its worker died between ask and the first beat, or is about to beat):
        # judge by how long *we* have seen it running, which needs no clock agreement
        first = self._first_seen.setdefault(trial._trial_id, time.monotonic())
        return time.monotonic() - first

    def stale(self, running: Iterable[FrozenTrial]) -> list[FrozenTrial]:
        running = list(running)
        ids = {t._trial_id for t in running}
        for k in [k for k in self._first_seen if k not in ids]:
            del self._first_seen[k]
        now = time.time()
        return [t for t in running if self.age(t, now) > self.grace]

    def give_up(self, trial: FrozenTrial, because: str, *, retry: bool = True) -> bool:
        """Mark a RUNNING trial FAIL (only one worker succeeds) and queue its parameters again.

        With ``retry=False`` (or after ``max_retry`` retries) the trial is marked
        ``rapid_search:no_retry`` before it is failed, so it holds no slot whoever wins the race
        to fail it. An interrupt between the FAIL and the queueing waits until both are done.

        Returns:
            Whether this call failed the trial (False: it was finished meanwhile).
        """
        storage = self.study._storage  # noqa: SLF001 - Optuna's own callbacks use the storage the same way
        history = list(trial.system_attrs.get("retry_history", [])) + [trial.number]
        retry = retry and (self.max_retry is None or len(history) <= self.max_retry)
        with self._critical():
            try:
                storage.set_trial_system_attr(trial._trial_id, FAILED_BECAUSE_KEY, because)
                if retry:  # keeps the slot until the retry is queued (see TrialCounts)
                    storage.set_trial_system_attr(trial._trial_id, RETRY_PENDING_KEY, time.time())
                else:  # a retry_pending written by a worker racing to give it up as stale must not keep its slot
                    storage.set_trial_system_attr(trial._trial_id, NO_RETRY_KEY, True)
                if not storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):
                    return False
            except UpdateFinishedTrialError:
                return False
            if retry:
                _requeue(self.study, storage.get_trial(trial._trial_id), history)
        self.log(f"trial {trial.number} {because}: marked failed" + (" and queued again" if retry else ""))
        return True

    def recover(self, running: Optional[Iterable[FrozenTrial]] = None) -> int:
        """Fail and requeue every stale running trial; returns how many this worker recovered."""
        if running is None:
            running = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        n = 0
        for t in self.stale(running):
            n += self.give_up(t, f"had no heartbeat for {self.age(t):.0f} s (its worker died?)")
        return n


#: Code that must not be cut short by an interrupt: a journal append holds a lock file (cut short,
#: it blocks every worker for the lock's 30 s grace period, or its cleanup fails and replaces the
#: KeyboardInterrupt by an OSError); database calls are cleaner to finish than to abandon.
_CRITICAL = tuple(os.sep + p + os.sep for p in (os.path.join("optuna", "storages"), "sqlalchemy", "psycopg2"))


class deferred_interrupts:
    """Within the block (main thread only), SIGINT (Ctrl-C) and SIGTERM raise KeyboardInterrupt,
    but never inside storage code nor inside a :meth:`critical` section.

    An interrupt that arrives in storage code is delivered again every 10 ms until the main thread
    has left it (storage calls take milliseconds); one that arrives in a critical section is
    raised when the section ends. Meanwhile ``pending`` says one is on its way
    (:meth:`raise_pending` raises it at a safe point). Once raised, the re-deliveries still on
    their way are dropped, but a *new* signal (a second Ctrl-C during the clean-up, say while it
    hangs on an unreachable database) raises KeyboardInterrupt at once, wherever the main thread
    is. A re-delivery still scheduled when the block ends is cancelled. Signals that were ignored
    (``nohup``) stay ignored.
    """

    def __init__(self) -> None:
        self.pending: Optional[int] = None
        self.raised = False
        self._timers: list[threading.Timer] = []
        self._old: dict[int, Any] = {}
        self._depth = 0  # nesting of critical sections
        self._redelivered: list[int] = []  # one entry per re-delivery in flight (list ops are atomic)

    def __enter__(self) -> "deferred_interrupts":
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(sig) is not signal.SIG_IGN:
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._cancel()
        for sig, old in self._old.items():
            signal.signal(sig, old)

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        """A section that an interrupt must not cut short: one arriving within it is raised when
        it ends (sections nest; the outermost one raises). An exception leaving the section takes
        precedence; the interrupt then stays ``pending``."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        self.raise_pending()

    def _cancel(self) -> None:
        for t in self._timers:
            t.cancel()
        self._timers.clear()

    def _raise(self) -> None:
        self.raised, self.pending = True, None
        self._cancel()
        raise KeyboardInterrupt

    def raise_pending(self) -> None:
        """Raise the interrupt now if one arrived during a storage call or critical section
        (nothing within a critical section)."""
        if self.pending is not None and not self.raised and self._depth == 0:
            self._raise()

    def _redeliver(self, signum: int) -> None:
        self._redelivered.append(signum)
        _thread.interrupt_main(signum)

    def _handler(self, signum: int, frame: Any) -> None:
        try:
            self._redelivered.pop()
            redelivery = True
        except IndexError:
            redelivery = False
        if self.raised:
            if redelivery:
                return  # a re-delivery of the interrupt already raised
            raise KeyboardInterrupt  # a new signal during the clean-up: stop it now
        if self._depth:
            self.pending = signum  # raised when the critical section ends
            return
        f = frame
        while f is not None:
            if any(c in f.f_code.co_filename for c in _CRITICAL):
                self.pending = signum
                self._timers = [t for t in self._timers if t.is_alive()]
                timer = threading.Timer(0.01, self._redeliver, args=(signum,))
                timer.daemon = True
                timer.start()
                self._timers.append(timer)
                return
            f = f.f_back
        self._raise()


def _surplus(study: optuna.Study, trial: optuna.trial.Trial, n_trials: int, pending_window: float) -> bool:
    """Whether trials numbered below ``trial`` already claim all ``n_trials`` slots."""
    claiming, _ = _claims(study.get_trials(deepcopy=False), pending_window)
    return sum(1 for t in claiming if t.number < trial.number) >= n_trials


def _lost(study: optuna.Study, trial: optuna.trial.Trial, log: Callable[[str], None], grace: float) -> bool:
    """Whether another worker gave ``trial`` up (it is FAIL with our reason key); logs it."""
    frozen = study._storage.get_trial(trial._trial_id)  # noqa: SLF001
    if frozen.state == TrialState.FAIL and FAILED_BECAUSE_KEY in frozen.system_attrs:
        log(f"trial {trial.number} was given up by another worker (no heartbeat for {grace:.0f} s); its result is discarded")
        return True
    return False


def run_trials(
    study: optuna.Study,
    objective: Callable[[optuna.trial.Trial], float],
    n_trials: int,
    *,
    heartbeat_storage: Any,
    interval: float,
    grace: float,
    max_retry: Optional[int] = 3,
    callbacks: Iterable[Callable[[optuna.Study, FrozenTrial], None]] = (),
    log: Optional[Callable[[str], None]] = None,
    poll: Optional[float] = None,
) -> int:
    """Run trials of ``objective`` until the study has exactly ``n_trials`` finished trials.

    See the module docstring for the protocol. Exceptions from the objective other than
    ``TrialPruned`` mark the trial FAIL and propagate; KeyboardInterrupt also queues it again.

    Args:
        study: The (shared) study.
        objective: ``trial -> value``; may raise ``optuna.TrialPruned``.
        n_trials: Finished trials wanted in the study, all workers together.
        heartbeat_storage: Storage used by the heartbeat thread (see :class:`Heartbeat`).
        interval: Heartbeat interval in seconds.
        grace: Seconds without a heartbeat after which another worker's trial is given up.
        max_retry: How often a dead worker's trial is queued again at most.
        callbacks: Called with ``(study, frozen_trial)`` after each trial this worker finished.
        log: Where to report waiting and recoveries.
        poll: Seconds between looks at the study while waiting (default ``min(1, interval / 2)``).

    Returns:
        The number of trials this worker finished.
    """
    log = log or (lambda msg: None)
    # a journal storage replays the whole file on its first read: do that now, not in the first beat
    heartbeat_storage.get_all_studies()
    poll = min(1.0, interval / 2) if poll is None else poll
    with deferred_interrupts() as interrupts:
        live = Liveness(study, grace=grace, max_retry=max_retry, log=log, critical=interrupts.critical)
        return _loop(study, objective, n_trials, heartbeat_storage, interval, grace, live, callbacks, log, poll, interrupts)


def _loop(
    study: optuna.Study,
    objective: Callable[[optuna.trial.Trial], float],
    n_trials: int,
    heartbeat_storage: Any,
    interval: float,
    grace: float,
    live: Liveness,
    callbacks: Iterable[Callable[[optuna.Study, FrozenTrial], None]],
    log: Callable[[str], None],
    poll: float,
    interrupts: deferred_interrupts,
) -> int:
    done_here = 0
    waiting_for: Optional[tuple[int, ...]] = None
    current: Optional[optuna.trial.Trial] = None
    hb: Optional[Heartbeat] = None
    try:
        while True:
            counts = count_trials(study, pending_window=grace)
            if counts.running and live.recover(counts.running):
                continue  # recount: the recovered trials are queued again
            if counts.finished >= n_trials:
                return done_here
            if counts.claimed >= n_trials:
                busy = tuple(sorted(t.number for t in counts.running + counts.pending))
                if busy != waiting_for:
                    waiting_for = busy
                    log(
                        f"{counts.finished}/{n_trials} trials finished; waiting for trial(s) {', '.join(map(str, busy))} "
                        f"running elsewhere (given up after {grace:.0f} s without a heartbeat)"
                    )
                time.sleep(poll)
                continue
            waiting_for = None

            interrupts.raise_pending()  # Ctrl-C during the last storage call: start nothing new
            # An interrupt from ask to the first heartbeat waits (cut short, the trial would stay
            # RUNNING with no worker and no heartbeat, found only after the grace period), and so
            # does one between giving a surplus trial up and queueing its parameters again.
            with interrupts.critical():
                current = study.ask()
                if _surplus(study, current, n_trials, grace):  # another worker asked at the same moment and won
                    frozen = study._storage.get_trial(current._trial_id)  # noqa: SLF001
                    study._storage.set_trial_system_attr(current._trial_id, SURPLUS_KEY, True)  # noqa: SLF001
                    study.tell(current, state=TrialState.FAIL)
                    if _was_queued(frozen):
                        _requeue(study, frozen, list(frozen.system_attrs.get("retry_history", [])))
                    current = None
                    continue
                study._storage.set_trial_system_attr(current._trial_id, WORKER_KEY, f"{socket.gethostname()}:{os.getpid()}")  # noqa: SLF001
                study._storage.set_trial_system_attr(current._trial_id, HEARTBEAT_KEY, time.time())  # noqa: SLF001 - the first beat, at once
                hb = Heartbeat(heartbeat_storage, current._trial_id, interval, on_error=log).start(delay=interval)

            state, value = TrialState.COMPLETE, None
            try:
                value = objective(current)
            except optuna.TrialPruned:
                state = TrialState.PRUNED
            except KeyboardInterrupt:
                raise  # the heartbeat is stopped below, without waiting for a beat in progress
            except BaseException:
                hb.stop()
                hb = None
                if _lost(study, current, log, grace):  # a storage write was refused: another worker gave it up
                    current = None
                    continue
                live.give_up(study._storage.get_trial(current._trial_id), "raised an error", retry=False)  # noqa: SLF001
                current = None
                raise
            hb.stop()
            hb = None
            try:
                frozen = study.tell(current, value) if state == TrialState.COMPLETE else study.tell(current, state=state)
            except Exception:
                if _lost(study, current, log, grace):
                    current = None
                    continue
                raise
            current = None
            if frozen.state in FINISHED:
                done_here += 1
            for cb in callbacks:
                cb(study, frozen)
    except KeyboardInterrupt:
        if hb is not None:
            hb.stop(wait=False)  # a beat stuck on an unreachable database must not hold up the clean-up
        if current is not None:
            _abandon(study, current, live, log, grace)
        raise


def _abandon(study: optuna.Study, trial: optuna.trial.Trial, live: Liveness, log: Callable[[str], None], grace: float) -> None:
    """After an interrupt: fail the trial in flight and queue it again, if it still runs.

    Never replaces the KeyboardInterrupt being handled: a storage error is logged, and a second
    interrupt (the clean-up hangs) ends the clean-up. Either way the trial's heartbeat has
    stopped, so another worker (or the resumed search) takes it over after ``grace`` seconds.
    """
    later = f"its heartbeat has stopped, so another worker or the resumed search takes it over after {grace:.0f} s"
    try:
        frozen = study._storage.get_trial(trial._trial_id)  # noqa: SLF001
        if frozen.state == TrialState.RUNNING:
            live.give_up(frozen, "was interrupted")
    except KeyboardInterrupt:
        log(f"interrupted again: trial {trial.number} was not marked failed; {later}")
    except Exception as e:  # noqa: BLE001 - the interrupt, not the clean-up's failure, is what the caller must see
        log(f"could not mark trial {trial.number} failed after the interrupt ({e.__class__.__name__}); {later}")
