"""Many workers on one study, on Optuna's own loop: an exact trial count, heartbeats, dead workers' trials redone.

Workers (processes on one journal file, or machines on PostgreSQL) given the same storage and study
name share one study; each runs :func:`run_trials` (``study.optimize`` with callbacks, ``catch``
and the storage's ``BaseHeartbeat`` seam). The protocol (slots, surplus trials, heartbeats, retries,
deferred interrupts) is described in docs/search-design.md.
"""

from __future__ import annotations

import _thread
import contextlib
import copy
import functools
import logging
import math
import os
import re
import signal
import socket
import threading
import time
import traceback
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional

import optuna
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.storages._cached_storage import _CachedStorage
from optuna.study import MaxTrialsCallback
from optuna.trial import FrozenTrial, TrialState

from ..errors import RapidSearchError
from ..storage import HeartbeatMixin

__all__ = [
    "HEARTBEAT_KEY", "WORKER_KEY", "OWNER_KEY", "RETRY_PENDING_KEY", "SURPLUS_KEY", "FAILED_BECAUSE_KEY", "Worker", "count_trials", "deferred_interrupts",
    "retry_trial", "run_trials",
]

HEARTBEAT_KEY = "rapid_search:heartbeat"
WORKER_KEY = "rapid_search:worker"
OWNER_KEY = "rapid_search:owner"
RETRY_PENDING_KEY = "rapid_search:retry_pending"
NO_RETRY_KEY = "rapid_search:no_retry"
SURPLUS_KEY = "rapid_search:surplus"
FAILED_BECAUSE_KEY = "rapid_search:failed_because"

#: Trial states that take one of the ``--trials`` slots.
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
#: How often one trial's parameters are queued again at most.
MAX_RETRY = 3


@dataclass
class TrialCounts:
    """A study's trials by the ``--trials`` slots they hold; ``pending``: given up (dead worker, Ctrl-C),
    retry not queued yet (they keep their slot)."""

    claiming: list[FrozenTrial]  # finished, running or pending: each holds a slot
    running: list[FrozenTrial]
    pending: list[FrozenTrial]
    waiting: int

    @property
    def claimed(self) -> int:
        return len(self.claiming)

    @property
    def finished(self) -> int:
        return len(self.claiming) - len(self.running) - len(self.pending)


def count_trials(study: optuna.Study, *, pending_window: float = 60.0) -> TrialCounts:
    """Count the study's trials (one read of the storage); a given-up trial is pending for at most
    ``pending_window`` s (then whoever gave it up is presumed dead before queueing the retry)."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.system_attrs["retry_history"][-1] for t in trials if t.system_attrs.get("retry_history")}
    now = time.time()

    def pending(t: FrozenTrial) -> bool:
        if t.state != TrialState.FAIL or t.number in retried or t.system_attrs.get(NO_RETRY_KEY):
            return False
        since = t.system_attrs.get(RETRY_PENDING_KEY)  # when it was given up (epoch seconds)
        return isinstance(since, (int, float)) and abs(now - since) < pending_window

    running = [t for t in trials if t.state == TrialState.RUNNING]
    waiting = [t for t in trials if pending(t)]
    claiming = [t for t in trials if t.state in FINISHED] + running + waiting
    return TrialCounts(claiming, running, waiting, sum(t.state == TrialState.WAITING for t in trials))


# ---- which process runs a trial, and whether it has ended (Linux; elsewhere only the heartbeat tells) ----
#: The tokens of the workers running in this process (see :func:`_owner_record`).
_LIVE_RUNS: set[str] = set()


def _read(path: str) -> Optional[str]:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _proc_start(pid: int) -> Optional[tuple[str, int]]:
    """``(state, start time in clock ticks after boot)`` of process ``pid`` from ``/proc``, or None when it has no entry."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # after "pid (comm)": state is field 3, starttime field 22
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


def _machine() -> Optional[tuple[str, str]]:
    """This kernel's boot id and this process's PID namespace: two processes whose pids can be
    compared must share both. None where ``/proc`` does not say (not Linux)."""
    return _machine_of(os.getpid())


@functools.lru_cache(maxsize=1)
def _machine_of(pid: int) -> Optional[tuple[str, str]]:
    """:func:`_machine`, read once per process (keyed by pid: a forked child reads its own)."""
    boot = _read("/proc/sys/kernel/random/boot_id")
    try:
        ns = os.stat("/proc/self/ns/pid")
    except OSError:
        return None
    return (boot.strip(), f"{ns.st_dev}:{ns.st_ino}") if boot else None


def _owner_record(run: str) -> Optional[dict[str, Any]]:
    """What identifies this process to another on the same machine (``run``: the worker's token in :data:`_LIVE_RUNS`)."""
    machine, me = _machine(), _proc_start(os.getpid())
    if machine is None or me is None:
        return None
    return {"boot": machine[0], "pidns": machine[1], "pid": os.getpid(), "start": me[1], "run": run}


def owner_gone(trial: FrozenTrial) -> Optional[str]:
    """Why ``trial``'s worker has certainly ended, or None when it may still run (another machine or
    PID namespace, no owner record, or the process is there): the same pid with another start time
    is another process; in this process, a worker whose run has returned."""
    owner, machine = trial.system_attrs.get(OWNER_KEY), _machine()
    if not isinstance(owner, dict) or machine is None or (owner.get("boot"), owner.get("pidns")) != machine:
        return None
    pid, start = owner.get("pid"), owner.get("start")
    if not isinstance(pid, int) or not isinstance(start, int):
        return None
    if pid == os.getpid():
        return None if owner.get("run") in _LIVE_RUNS else f"its worker in this process (pid {pid}) has returned"
    ended = f"its worker process (pid {pid}) on this machine has ended"
    seen = _proc_start(pid)
    if seen is None:  # no entry, or /proc hides other users' processes (hidepid): ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return ended
        except OSError:  # there, someone else's
            pass
        return None
    return ended if seen[1] != start or seen[0] in ("Z", "X") else None  # another start time: the pid was reused


def _what_to_run(trial: FrozenTrial) -> FrozenTrial:
    """``trial`` with only what says what to run (scores and schedule are recomputed by a retry)."""
    lean = copy.copy(trial)
    lean.system_attrs = {k: copy.deepcopy(v) for k, v in trial.system_attrs.items() if k in ("fixed_params", "retry_history", "failed_trial")}
    lean.user_attrs = {k: v for k, v in trial.user_attrs.items() if k == "warm_start"}
    return lean


def retry_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    """Queue ``trial``'s parameters again as a WAITING trial (Optuna's retry callback, given only what
    says what to run, never a partial result); nothing after :data:`MAX_RETRY` retries."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(study, _what_to_run(trial))


#: Code an interrupt must not cut short (see docs/search-design.md, Interrupts).
_CRITICAL = tuple(os.sep + p + os.sep for p in (os.path.join("optuna", "storages"), "sqlalchemy", "psycopg2"))


class deferred_interrupts:
    """Within the block (main thread only), SIGINT and SIGTERM raise KeyboardInterrupt, but never
    inside storage code nor inside a :meth:`critical` section.

    One arriving in storage code is re-delivered every 10 ms until the main thread has left it;
    one in a critical section is raised when it ends or on entering an :meth:`interruptible` part
    (``pending`` says one is on its way). Once raised, re-deliveries still on their way are
    dropped, but a *new* signal raises at once, wherever the main thread is. Signals that were
    ignored (``nohup``) stay ignored.
    """

    def __init__(self) -> None:
        self.pending: Optional[int] = None
        self.raised = False
        self._timers: list[threading.Timer] = []
        self._old: dict[int, Any] = {}
        self._depth = 0  # nesting of critical sections
        self._redelivered: list[int] = []  # one entry per re-delivery in flight (list ops are atomic)

    def __enter__(self) -> "deferred_interrupts":
        if threading.current_thread() is threading.main_thread():
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
        """A section an interrupt must not cut short: one arriving within it is raised when the
        outermost section ends (an exception leaving it takes precedence; the interrupt stays ``pending``)."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        self.raise_pending()

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """A part of a critical section where interrupts are raised again (the objective, a wait); one pending is raised on entry."""
        depth, self._depth = self._depth, 0
        try:
            self.raise_pending()
            yield
        finally:
            self._depth = depth

    def _cancel(self) -> None:
        for t in self._timers:
            t.cancel()
        self._timers.clear()

    def _raise(self) -> None:
        self.raised, self.pending = True, None
        self._cancel()
        raise KeyboardInterrupt

    def raise_pending(self) -> None:
        """Raise the interrupt now if one is pending (nothing within a critical section)."""
        if self.pending is not None and not self.raised and self._depth == 0:
            self._raise()

    def _redeliver(self, signum: int) -> None:
        self._redelivered.append(signum)
        _thread.interrupt_main(signum)

    def _handler(self, signum: int, frame: Any) -> None:
        redelivery = bool(self._redelivered)  # only this (main) thread takes entries out
        if redelivery:
            self._redelivered.pop()
        if self.raised:
            if redelivery:
                return  # a re-delivery of the interrupt already raised
            raise KeyboardInterrupt  # a new signal during the clean-up: stop it now
        if self._depth:
            self.pending = signum  # raised when the critical section ends
        elif any(c in f.f_code.co_filename for f, _ in traceback.walk_stack(frame) for c in _CRITICAL):
            self.pending = signum  # delivered again once the main thread has left storage code
            self._timers = [t for t in self._timers if t.is_alive()]
            timer = threading.Timer(0.01, self._redeliver, args=(signum,))
            timer.daemon = True
            timer.start()
            self._timers.append(timer)
        else:
            self._raise()


class Surplus(RapidSearchError):
    """Raised by the objective when lower-numbered trials claim every slot: recorded FAIL (in ``catch``), unrun."""


class _Abandoned(BaseException):
    """The trial in flight was settled already (given up after an interrupt, or by another worker):
    Optuna must not tell it. Not an ``Exception``, so ``optimize`` lets it through."""

    def __init__(self, interrupted: bool) -> None:
        super().__init__(interrupted)
        self.interrupted = interrupted


class Worker:
    """One worker on a shared study: the heartbeat policy its storage follows (beats, stale trials,
    retries: ``HeartbeatMixin.liveness``), and ``optimize``'s objective and callback in :meth:`run`.

    Args:
        study: The study.
        grace: Seconds without a heartbeat after which a running trial is considered dead.
        interval: Seconds between heartbeats (the study is polled every ``min(1, interval / 2)`` s while waiting).
        log: Where waiting, recoveries and heartbeat trouble are reported.
        beats: Storage for the heartbeat thread's writes (None: the study's); for a journal file a
            separate instance keeps a slow beat from holding the main thread's storage lock.
        interrupts: Guards :meth:`give_up` and lets the objective and waits be interrupted (None: defers nothing).
    """

    def __init__(
        self,
        study: optuna.Study,
        *,
        grace: float,
        interval: int = 10,
        log: Optional[Callable[[str], None]] = None,
        beats: Any = None,
        interrupts: Optional[deferred_interrupts] = None,
    ) -> None:
        self.study, self.grace, self.interval = study, float(grace), int(interval)
        self.log = log or (lambda msg: None)
        self.storage = study._storage  # noqa: SLF001 - Optuna's own heartbeat and fail_stale_trials use it the same way
        self.beats = beats if beats is not None else self.storage
        self.interrupts = interrupts or deferred_interrupts()  # never entered
        self.refused: set[int] = set()  # trial ids whose beats were refused: another worker gave them up
        self.recovered = self.done = 0  # trials this worker failed (and queued again); finished
        self.trial: Optional[optuna.trial.Trial] = None  # the trial in flight
        self._first_seen: dict[int, float] = {}
        self._warned = False
        self._waiting_for: Optional[tuple[int, ...]] = None
        self._run = f"{id(self):x}-{time.monotonic_ns():x}"  # this worker's token while it runs (_LIVE_RUNS)
        self._owner: Optional[dict[str, Any]] = None  # set by run (in the process that runs the trials)

    # ---- the heartbeat policy (the storage's BaseHeartbeat seam calls these) ----
    def beat(self, trial_id: int) -> None:
        """Store the time in the trial's ``rapid_search:heartbeat`` (Optuna's heartbeat thread calls this)."""
        if trial_id in self.refused:
            return
        try:
            self.beats.set_trial_system_attr(trial_id, HEARTBEAT_KEY, time.time())
        except UpdateFinishedTrialError:
            self.refused.add(trial_id)
        except Exception as e:  # noqa: BLE001 - a storage hiccup: keep trying, say so once
            if not self._warned:
                self._warned = True
                self.log(f"heartbeat of trial id {trial_id} could not be stored ({e.__class__.__name__}); retrying")

    def age(self, trial: FrozenTrial, now: Optional[float] = None) -> float:
        """Seconds since the trial's last heartbeat; without one, since this worker first saw it running (no clock needed)."""
        hb = trial.system_attrs.get(HEARTBEAT_KEY)
        if isinstance(hb, (int, float)) and math.isfinite(hb):
            return (time.time() if now is None else now) - float(hb)
        return time.monotonic() - self._first_seen.setdefault(trial._trial_id, time.monotonic())

    def stale_trial_ids(self, storage: Any, study_id: int) -> list[int]:
        """The running trials silent for ``grace`` s, or whose worker process has ended on this machine
        (:func:`owner_gone`), each marked as given up (``BaseHeartbeat._get_stale_trial_ids``)."""
        running = storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
        ids, now = {t._trial_id for t in running}, time.time()
        self._first_seen = {k: v for k, v in self._first_seen.items() if k in ids}
        stale = []
        for t in running:
            if self.age(t, now) > self.grace:
                because = f"had no heartbeat for {self.age(t):.0f} s (its worker died?)"
            elif (ended := owner_gone(t)) is not None:  # no need to wait out the grace period
                because = ended
            else:
                continue
            if self.mark(t, because):
                stale.append(t._trial_id)
        return stale

    def mark(self, trial: FrozenTrial, because: str, *, retry: bool = True) -> bool:
        """Say why a RUNNING trial is about to be failed and whether it keeps its slot; False: finished meanwhile."""
        retry = retry and len(trial.system_attrs.get("retry_history", [])) < MAX_RETRY
        try:
            self.storage.set_trial_system_attr(trial._trial_id, FAILED_BECAUSE_KEY, because)
            if retry:  # keeps the slot until the retry is queued (see TrialCounts)
                self.storage.set_trial_system_attr(trial._trial_id, RETRY_PENDING_KEY, time.time())
            else:  # a retry_pending written by a worker racing to give it up as stale must not keep its slot
                self.storage.set_trial_system_attr(trial._trial_id, NO_RETRY_KEY, True)
        except UpdateFinishedTrialError:
            return False
        return True

    def requeue(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """After this worker failed ``trial``: queue it again unless it is failed for good."""
        self.recovered += 1
        retry = not trial.system_attrs.get(NO_RETRY_KEY)
        if retry:
            retry_trial(study, trial)
        because = trial.system_attrs.get(FAILED_BECAUSE_KEY, "was failed")
        self.log(f"trial {trial.number} {because}: marked failed" + (" and queued again" if retry else ""))

    def give_up(self, trial: FrozenTrial, because: str, *, retry: bool = True) -> bool:
        """Mark a RUNNING trial FAIL (only one worker succeeds) and queue it again; an interrupt waits for both.

        With ``retry=False`` (or after :data:`MAX_RETRY` retries) it is marked ``no_retry`` first: it holds no
        slot whoever wins the race to fail it. Returns whether this call failed the trial."""
        with self.interrupts.critical():
            try:
                if not self.mark(trial, because, retry=retry) or not self.storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):
                    return False
            except UpdateFinishedTrialError:
                return False
            self.requeue(self.study, copy.deepcopy(self.storage.get_trial(trial._trial_id)))
        return True

    @contextlib.contextmanager
    def _attached(self) -> Iterator[None]:
        """Attach this policy to the study's storage (behind Optuna's cache for a database) within the block."""
        storage = self.storage._backend if isinstance(self.storage, _CachedStorage) else self.storage  # noqa: SLF001
        if not isinstance(storage, HeartbeatMixin):
            raise TypeError("the study's storage has no heartbeat: open it with rapid_search.storage.open_storage")
        before, storage.liveness = storage.liveness, self
        try:
            yield
        finally:
            storage.liveness = before

    def recover(self) -> int:
        """Fail and requeue every stale running trial (Optuna's ``fail_stale_trials``); how many this worker did."""
        before = self.recovered
        with self._attached(), warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            optuna.storages.fail_stale_trials(self.study)
        return self.recovered - before

    # ---- the worker's part in optimize ----
    def run(self, objective: Callable[[optuna.trial.Trial], float], n_trials: int, callbacks: Iterable[Callable[..., None]] = ()) -> int:
        """``study.optimize`` until the study has ``n_trials`` finished trials; returns how many this worker finished."""
        self.objective, self.n_trials, self.callbacks = objective, n_trials, list(callbacks)
        stop = MaxTrialsCallback(n_trials, states=FINISHED)
        self._owner = _owner_record(self._run)
        _LIVE_RUNS.add(self._run)
        try:
            return self._run_loop(stop)
        finally:
            _LIVE_RUNS.discard(self._run)

    def _run_loop(self, stop: MaxTrialsCallback) -> int:
        with self._attached(), self.interrupts.critical():  # Optuna's loop; the objective and the waits are interruptible
            while self.wait_for_slot():
                try:
                    self.study.optimize(self.run_one, catch=(Surplus,), callbacks=[self.after_trial, stop])
                    return self.done
                except _Abandoned as e:
                    if e.interrupted:
                        raise KeyboardInterrupt from None
                except Exception as e:
                    if self.trial is None or not self.lost(self.trial):
                        raise _unmasked(e)
                self.trial = None
        return self.done

    def wait_for_slot(self) -> bool:
        """Wait while every slot is claimed but not all finished; False when all are finished."""
        while True:
            self.recover()
            counts = count_trials(self.study, pending_window=self.grace)
            if counts.finished >= self.n_trials:
                return False
            if counts.claimed < self.n_trials:
                self._waiting_for = None
                return True
            busy = tuple(sorted(t.number for t in counts.running + counts.pending))
            if busy != self._waiting_for:
                self._waiting_for = busy
                self.log(
                    f"{counts.finished}/{self.n_trials} trials finished; waiting for trial(s) {', '.join(map(str, busy))} "
                    f"running elsewhere (given up after {self.grace:.0f} s without a heartbeat)"
                )
            with self.interrupts.interruptible():
                time.sleep(min(1.0, self.interval / 2))

    def lost(self, trial: optuna.trial.Trial) -> bool:
        """Whether another worker gave ``trial`` up (it is FAIL with a reason); logs it."""
        frozen = self.storage.get_trial(trial._trial_id)
        if frozen.state == TrialState.FAIL and FAILED_BECAUSE_KEY in frozen.system_attrs:
            self.log(f"trial {trial.number} was given up by another worker (no heartbeat for {self.grace:.0f} s); its result is discarded")
            return True
        return False

    def run_one(self, trial: optuna.trial.Trial) -> float:
        """The objective ``optimize`` runs: the surplus check, then the search's objective."""
        self.trial = trial
        if sum(t.number < trial.number for t in count_trials(self.study, pending_window=self.grace).claiming) >= self.n_trials:
            self.storage.set_trial_system_attr(trial._trial_id, SURPLUS_KEY, True)  # another worker asked at the same moment and won
            raise Surplus(f"trials numbered below {trial.number} claim all {self.n_trials} slots")
        self.storage.set_trial_system_attr(trial._trial_id, WORKER_KEY, f"{socket.gethostname()}:{os.getpid()}")
        if self._owner is not None:  # lets a worker on this machine redo it at once should this process end
            self.storage.set_trial_system_attr(trial._trial_id, OWNER_KEY, self._owner)
        pruned: Optional[optuna.TrialPruned] = None
        try:
            with self.interrupts.interruptible():  # a Ctrl-C during ask is raised here: this trial is queued again
                value = self.objective(trial)
        except KeyboardInterrupt:
            self.abandon(trial)
            raise _Abandoned(interrupted=True) from None
        except optuna.TrialPruned as e:
            pruned = e
        except Exception:
            if self.lost(trial):  # a storage write was refused: another worker gave it up
                raise _Abandoned(interrupted=False) from None
            self.mark(self.storage.get_trial(trial._trial_id), "raised an error", retry=False)
            raise
        if trial._trial_id in self.refused and self.lost(trial):  # its beats were refused: given up meanwhile
            raise _Abandoned(interrupted=False)
        if pruned is not None:
            raise pruned
        return value

    def abandon(self, trial: optuna.trial.Trial) -> None:
        """After an interrupt: fail the trial in flight and queue it again, if it still runs. A storage error
        is logged and a second interrupt ends the clean-up, never replacing the KeyboardInterrupt handled."""
        later = f"another worker or the resumed search takes it over once this process has ended (or after {self.grace:.0f} s without a heartbeat)"
        try:
            frozen = self.storage.get_trial(trial._trial_id)
            if frozen.state == TrialState.RUNNING:
                self.give_up(frozen, "was interrupted")
        except KeyboardInterrupt:
            self.log(f"interrupted again: trial {trial.number} was not marked failed; {later}")
        except Exception as e:  # noqa: BLE001 - the interrupt, not the clean-up's failure, is what the caller must see
            self.log(f"could not mark trial {trial.number} failed after the interrupt ({e.__class__.__name__}); {later}")

    def after_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Callback: requeue a surplus trial's queued parameters, or count and report a finished
        trial; then wait for a free slot (``MaxTrialsCallback`` ends the loop when none is left)."""
        self.trial = None
        if not trial.system_attrs.get(SURPLUS_KEY):
            self.done += trial.state in FINISHED
            for cb in self.callbacks:
                cb(study, trial)
        elif trial.system_attrs.get("fixed_params") or trial.system_attrs.get("retry_history") or "warm_start" in trial.user_attrs:
            lean = _what_to_run(trial)  # it came from the queue (warm start, retry): put it back unchanged
            study.add_trial(
                optuna.trial.create_trial(
                    state=TrialState.WAITING,
                    params=trial.params,
                    distributions=trial.distributions,
                    user_attrs=lean.user_attrs,
                    system_attrs=lean.system_attrs,
                )
            )
        self.wait_for_slot()
        with self.interrupts.interruptible():  # an interrupt from Optuna's tell or the callbacks: now
            pass


def _unmasked(e: Exception) -> BaseException:
    """The storage error that Optuna 5.0's ``_run_trial`` hides behind ``AssertionError("Should
    not reach.")`` when telling a trial fails (it is that error's ``__context__``)."""
    if isinstance(e, AssertionError) and "Should not reach" in str(e) and isinstance(e.__context__, Exception):
        return e.__context__
    return e


def run_trials(
    study: optuna.Study,
    objective: Callable[[optuna.trial.Trial], float],
    n_trials: int,
    *,
    interval: int,
    grace: float,
    heartbeat_storage: Any = None,
    callbacks: Iterable[Callable[[optuna.Study, FrozenTrial], None]] = (),
    log: Optional[Callable[[str], None]] = None,
) -> int:
    """Run ``objective`` with ``study.optimize`` until the study has exactly ``n_trials`` finished trials, all workers together.

    Objective errors other than ``TrialPruned`` fail the trial for good and propagate; a KeyboardInterrupt
    (SIGINT, SIGTERM) also queues it again.

    Args:
        study: The (shared) study; its storage from :func:`~rapid_search.storage.open_storage`.
        objective: ``trial -> value``; may raise ``optuna.TrialPruned``.
        n_trials: Finished trials wanted in the study, all workers together.
        interval, grace, heartbeat_storage, log: See :class:`Worker` (``interval``, ``grace``, ``beats``, ``log``).
        callbacks: Called with ``(study, frozen_trial)`` after each trial this worker finished.

    Returns:
        The number of trials this worker finished.
    """
    if heartbeat_storage is not None:  # a journal storage replays the whole file on its first read: now, not in the first beat
        heartbeat_storage.get_all_studies()
    optimize_log = logging.getLogger("optuna.study._optimize")

    def quiet(record: logging.LogRecord) -> bool:  # one per call: a nested run_trials removes only its own
        """Drops Optuna's "Trial N failed ..." records: each is a surplus trial or an objective error that propagates anyway."""
        return re.match(r"Trial \d+ failed ", record.getMessage()) is None

    optimize_log.addFilter(quiet)
    try:
        with deferred_interrupts() as interrupts:
            worker = Worker(study, grace=grace, interval=interval, log=log, beats=heartbeat_storage, interrupts=interrupts)
            return worker.run(objective, n_trials, callbacks)
    finally:
        optimize_log.removeFilter(quiet)
