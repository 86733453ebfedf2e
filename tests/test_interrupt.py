"""Ctrl-C during a search: the trial in flight is abandoned cleanly (FAIL, queued again), the study
is kept, the best schedule so far is written, the exit code is 130 with a one-line message on how
to resume, and re-running the same command finishes the study.

The search runs in a worker process (``rapid_search.cli.main``, forked from a forkserver with the
imports done: see ``cli_workers``) and gets a real SIGINT while it is inside a trial (the process
is frozen with SIGSTOP to check that, then continued). A Ctrl-C in a terminal sends the same
signal to the process group.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter

import optuna
import pytest
from optuna.trial import TrialState

from rapid_search.cli import main
from rapid_search.runtime.schedule import Schedule
from rapid_search.storage import open_storage
from test_distributed import freeze_mid_trial

from rapid_search.search.workers import (
    FAILED_BECAUSE_KEY,
    SURPLUS_KEY,
    WORKER_KEY,
    deferred_interrupts,
    run_trials,
)

# A function whose code lives (by name) in Optuna's storage package, standing in for a journal append.
_FAKE_STORAGE = {}
exec(compile(
    "import os, signal, time\n"
    "def append(log):\n"
    "    os.kill(os.getpid(), signal.SIGINT)\n"
    "    t = time.monotonic()\n"
    "    while time.monotonic() - t < 0.3:\n"
    "        pass\n"
    "    log.append('append finished')\n"
    "def hang(seconds):\n"
    "    time.sleep(seconds)\n",
    os.path.join(os.sep, "site-packages", "optuna", "storages", "journal", "_fake.py"), "exec"), _FAKE_STORAGE)


def test_ctrl_c_inside_a_storage_write_waits_for_it() -> None:
    """Ctrl-C while a storage write runs is delivered right after it, not inside it (a journal
    append cut short leaves its lock file behind, or loses the KeyboardInterrupt to an OSError)."""
    log: list[str] = []
    with deferred_interrupts():
        try:
            _FAKE_STORAGE["append"](log)
            t = time.monotonic()
            while time.monotonic() - t < 5:
                pass
            log.append("not interrupted")
        except KeyboardInterrupt:
            log.append("interrupted")
    assert log == ["append finished", "interrupted"]
    with deferred_interrupts():  # outside storage code: at once
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        except KeyboardInterrupt:
            log.append("at once")
    assert log[-1] == "at once"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_ignored_ctrl_c_stays_ignored() -> None:
    """A search started with SIGINT ignored (``nohup``, a background job of a non-interactive shell)
    is not interrupted by it, and the signal is ignored again afterwards."""
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with deferred_interrupts():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)  # a KeyboardInterrupt would be raised in here
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, old)


def _journal_study(tmp_path, name: str, **kwargs) -> tuple[str, optuna.Study]:
    spec = f"journal:{tmp_path / (name + '.journal')}"
    return spec, optuna.create_study(study_name=name, storage=open_storage(spec, study_name=name), **kwargs)


def _objective(trial) -> float:
    return trial.suggest_float("x", 0, 1)


def test_ctrl_c_between_ask_and_first_heartbeat_waits(tmp_path) -> None:
    """Ctrl-C after the storage made the trial but before the worker owns it (here: in the
    sampler's before_trial) is delivered after the first heartbeat: the trial is failed and
    queued again at once, not left RUNNING without worker or heartbeat for the grace period."""
    fired = []

    class InterruptingSampler(optuna.samplers.RandomSampler):
        def before_trial(self, study, trial):
            super().before_trial(study, trial)
            if not fired:
                fired.append(trial.number)
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.2)  # the handler runs in here: nothing is "in storage code"

    spec, study = _journal_study(tmp_path, "ask", sampler=InterruptingSampler(seed=0))
    ran = []

    def objective(trial):
        ran.append(trial.number)
        return _objective(trial)

    try:
        run_trials(study, objective, 3, heartbeat_storage=open_storage(spec, study_name="ask"), interval=1, grace=600)
        raise AssertionError("the interrupt was lost")
    except KeyboardInterrupt:
        pass
    assert fired == [0] and ran == []
    trials = optuna.load_study(study_name="ask", storage=open_storage(spec, study_name="ask", create=False)).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert trials[0].system_attrs[FAILED_BECAUSE_KEY] == "was interrupted" and WORKER_KEY in trials[0].system_attrs
    assert trials[1].system_attrs["retry_history"] == [0]


def test_ctrl_c_between_surplus_fail_and_requeue_keeps_the_queued_trial(tmp_path) -> None:
    """Ctrl-C right after a surplus trial was failed waits until the queued parameters it took
    are queued again: the warm start is not lost."""
    spec, a = _journal_study(tmp_path, "sur")
    a.enqueue_trial({"x": 0.25}, user_attrs={"warm_start": "a"})
    a.enqueue_trial({"x": 0.75}, user_attrs={"warm_start": "b"})
    b = optuna.load_study(study_name="sur", storage=open_storage(spec, study_name="sur"))
    real_ask, real_set_state = b.ask, b._storage.set_trial_state_values

    def racing_ask(*args, **kwargs):  # worker A takes the last slot just before B asks
        a.ask()
        b.ask = real_ask
        return real_ask(*args, **kwargs)

    def interrupted_fail(trial_id, state, values=None):  # Ctrl-C the moment B's surplus trial is failed
        done = real_set_state(trial_id, state, values)
        if state == TrialState.FAIL:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
        return done

    b.ask, b._storage.set_trial_state_values = racing_ask, interrupted_fail
    try:
        run_trials(b, _objective, 1, heartbeat_storage=open_storage(spec, study_name="sur"), interval=1, grace=600)
        raise AssertionError("the interrupt was lost")
    except KeyboardInterrupt:
        pass
    trials = optuna.load_study(study_name="sur", storage=open_storage(spec, study_name="sur", create=False)).trials
    assert [t.state for t in trials] == [TrialState.RUNNING, TrialState.FAIL, TrialState.WAITING]
    assert trials[1].system_attrs[SURPLUS_KEY] is True
    assert trials[2].system_attrs["fixed_params"] == {"x": 0.75} and trials[2].user_attrs == {"warm_start": "b"}


def test_storage_error_in_the_clean_up_keeps_the_interrupt(tmp_path) -> None:
    """A storage error while failing the interrupted trial is logged; the KeyboardInterrupt, not
    the storage error, reaches the caller (which then exports the best so far and exits 130)."""
    spec, study = _journal_study(tmp_path, "err")
    log: list[str] = []

    def objective(trial):
        def unreachable(*args, **kwargs):
            raise ConnectionError("database unreachable")

        study._storage.get_trial = unreachable  # the database went away with the Ctrl-C
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
        return 0.0

    with pytest.raises(KeyboardInterrupt):
        run_trials(study, objective, 2, heartbeat_storage=open_storage(spec, study_name="err"), interval=1, grace=600, log=log.append)
    assert any("could not mark trial 0 failed after the interrupt (ConnectionError)" in line for line in log), log


def test_second_ctrl_c_ends_a_hanging_clean_up(tmp_path) -> None:
    """A second Ctrl-C while the clean-up after the first hangs in storage code (an unreachable
    database) ends it at once, as the module docstring promises."""
    spec, study = _journal_study(tmp_path, "hang")
    log: list[str] = []

    def objective(trial):
        study._storage.get_trial = lambda *a, **k: _FAKE_STORAGE["hang"](60)  # the clean-up's first storage call hangs
        threading.Timer(0.5, os.kill, args=(os.getpid(), signal.SIGINT)).start()  # the second Ctrl-C
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
        return 0.0

    t = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_trials(study, objective, 2, heartbeat_storage=open_storage(spec, study_name="hang"), interval=1, grace=600, log=log.append)
    assert time.monotonic() - t < 10, "the second Ctrl-C was ignored"
    assert any(line.startswith("interrupted again: trial 0") for line in log), log


@pytest.mark.parametrize("failure", ["unwritable-out", "schedule-error", "storage-down"])
def test_failed_export_after_ctrl_c_still_exits_130(failure, tiny_search, tmp_path, monkeypatch, capsys) -> None:
    """Ctrl-C, then writing the best schedule so far fails (the --out folder became unwritable, a
    schedule error, the database went away): one logged line, and still exit 130 with the
    resume message (no traceback, no exit 2)."""
    import sqlalchemy as sa

    import rapid_search.search.runner as runner
    from rapid_search.runtime.schedule import ScheduleError

    error = {
        "unwritable-out": PermissionError(13, "Permission denied", str(tmp_path / "best.yaml")),
        "schedule-error": ScheduleError("layers[3].r = 99 would remove more tokens than are left"),
        "storage-down": sa.exc.OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly")),
    }[failure]

    def fail(*args, **kwargs):
        raise error

    def interrupted(*args, **kwargs):  # Ctrl-C during the trials
        if failure == "storage-down":  # counting the finished trials fails too
            monkeypatch.setattr(runner, "_finished", fail)
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_trials", interrupted)
    monkeypatch.setattr(runner, "_export", fail)
    capsys.readouterr()
    args = tiny_search.args(f"journal:{tmp_path / 'x.journal'}", "exp", tmp_path / "best.yaml", trials=2)
    assert main(args) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    logged = [line for line in err.splitlines() if "could not write the best schedule so far" in line]
    assert len(logged) == 1 and error.__class__.__name__ in logged[0], err
    last = err.strip().splitlines()[-1]
    assert last.startswith("rapid-search: interrupted — study 'exp' is kept (" + ("?" if failure == "storage-down" else "0") + "/2 trials finished)")
    assert "the best schedule so far could not be written" in last and last.endswith("re-run the same command to resume")
    assert not (tmp_path / "best.yaml").exists()


def test_ctrl_c_abandons_trial_keeps_study_and_resumes(tiny_search, cli_workers, tmp_path, capsys) -> None:
    spec, name, n = f"journal:{tmp_path / 'i.journal'}", "int", 6
    out = tmp_path / "best.yaml"
    args = tiny_search.args(spec, name, out, trials=n, extra=["--heartbeat-interval", "1", "--grace-period", "33"])
    proc = cli_workers.start(args, tmp_path / "worker.log")

    def study():
        try:
            return optuna.load_study(study_name=name, storage=open_storage(spec, study_name=name, create=False))
        except Exception:  # noqa: BLE001 - not there yet
            return None

    interrupted = freeze_mid_trial(proc, study, time.monotonic() + 120)  # frozen: the state read is the state it is in
    os.kill(proc.pid, signal.SIGINT)  # even inside a journal append: the interrupt waits until the append is done
    os.kill(proc.pid, signal.SIGCONT)
    code = cli_workers.wait(proc, 60)
    err = (tmp_path / "worker.log").read_text()

    assert code == 130, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("rapid-search: interrupted — study 'int' is kept (")
    assert f"best schedule so far written to {out}" in last and "re-run the same command to resume" in last

    sched = Schedule.load(out)  # complete and valid
    assert sched.model.name == "test_vit" and sched.provenance["study"] == name
    assert not list(tmp_path.glob(".best.yaml.*"))  # no temporary file left behind

    trials = study().trials
    by = Counter(t.state for t in trials)
    assert by[TrialState.RUNNING] == 0
    cut = trials[interrupted]
    if cut.state == TrialState.FAIL:  # abandoned: failed, and its parameters queued again
        assert cut.system_attrs[FAILED_BECAUSE_KEY] == "was interrupted"
        redo = [t for t in trials if t.system_attrs.get("retry_history") == [interrupted]]
        assert len(redo) == 1 and redo[0].state == TrialState.WAITING and redo[0].params == cut.params
    else:  # the signal came during its last storage write: it finished, and nothing new was started
        assert cut.state in (TrialState.COMPLETE, TrialState.PRUNED) and len(trials) == interrupted + 1
        redo = []
    finished_before = {t.number: (t.state, t.value) for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)}

    # the same command resumes: the abandoned trial is redone first and the study completes
    capsys.readouterr()
    assert main(args) == 0
    trials = study().trials
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) == n
    assert all(trials[r.number].state in (TrialState.COMPLETE, TrialState.PRUNED) for r in redo)
    for number, snap in finished_before.items():
        assert (trials[number].state, trials[number].value) == snap
    Schedule.load(out)
