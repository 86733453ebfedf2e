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
import time
from collections import Counter

import optuna
from optuna.trial import TrialState

from rapid_search.cli import main
from rapid_search.schedule import Schedule
from rapid_search.search.storage import open_storage
from test_distributed import freeze

from rapid_search.search.workers import FAILED_BECAUSE_KEY, HEARTBEAT_KEY, WORKER_KEY, count_trials, deferred_interrupts

# A function whose code lives (by name) in Optuna's storage package, standing in for a journal append.
_FAKE_STORAGE = {}
exec(compile(
    "import os, signal, time\n"
    "def append(log):\n"
    "    os.kill(os.getpid(), signal.SIGINT)\n"
    "    t = time.monotonic()\n"
    "    while time.monotonic() - t < 0.3:\n"
    "        pass\n"
    "    log.append('append finished')\n",
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


def test_ctrl_c_abandons_trial_keeps_study_and_resumes(tiny_search, cli_workers, tmp_path, capsys) -> None:
    spec, name, n = f"journal:{tmp_path / 'i.journal'}", "int", 6
    out = tmp_path / "best.yaml"
    args = tiny_search.args(spec, name, out, trials=n, extra=["--heartbeat-interval", "1", "--grace-period", "5"])
    proc = cli_workers.start(args, tmp_path / "worker.log")

    def study():
        try:
            return optuna.load_study(study_name=name, storage=open_storage(spec, study_name=name, create=False))
        except Exception:  # noqa: BLE001 - not there yet
            return None

    interrupted = None
    deadline = time.monotonic() + 120
    while interrupted is None:
        assert time.monotonic() < deadline and proc.exitcode is None, f"no trial to interrupt:\n{(tmp_path / 'worker.log').read_text()}"
        s = study()
        if s is not None and count_trials(s).finished >= 2:
            freeze(proc.pid)  # frozen: the state read now is the state it is in
            running = [
                t for t in study().get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                if str(t.system_attrs.get(WORKER_KEY, "")).endswith(f":{proc.pid}") and HEARTBEAT_KEY in t.system_attrs
            ]
            if running:  # even inside a journal append: the interrupt waits until the append is done
                interrupted = running[0].number
                os.kill(proc.pid, signal.SIGINT)
            os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.02)
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
