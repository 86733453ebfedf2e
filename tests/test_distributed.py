"""Many workers on one study: exact trial count, dead workers' trials redone, export while running.

Worker processes run ``rapid_search.cli.main`` (the console script's code) on timm ``test_vit``
with 16 images; they are forked from a forkserver with the imports done (``cli_workers``), so a
worker starts in well under a second. PostgreSQL tests need ``RAPID_PG_URL`` (``.ci/run``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import optuna
import pytest
import sqlalchemy as sa
from optuna.trial import TrialState

from rapid_search.cli import main
from rapid_search.runtime.schedule import Schedule
from rapid_search.storage import open_storage
from rapid_search.search.workers import (
    FAILED_BECAUSE_KEY,
    HEARTBEAT_KEY,
    OWNER_KEY,
    RETRY_PENDING_KEY,
    SURPLUS_KEY,
    WORKER_KEY,
    Worker,
    count_trials,
    retry_trial,
    run_trials,
)

FAST = ["--heartbeat-interval", "1", "--grace-period", "3"]
# a journal file needs a grace period above 2 x interval + 30 s (its lock, left by a killed worker,
# blocks heartbeats for 30 s): the shortest allowed with 1 s heartbeats
FAST_JOURNAL = ["--heartbeat-interval", "1", "--grace-period", "33"]


def load(spec: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(spec, study_name=name, create=False))


def check_study(study: optuna.Study, n: int) -> list:
    """The invariants of a study that workers (some killed) have finished; returns its trials."""
    trials = study.get_trials(deepcopy=False)
    by = Counter(t.state for t in trials)
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == n, f"{len(finished)} finished trials, asked for {n}: {by}"
    assert sorted(t.number for t in trials) == list(range(len(trials))), "trial numbers must be unique and gap-free"
    assert by[TrialState.RUNNING] == 0, "a trial was left running"
    for t in trials:
        if t.state == TrialState.FAIL:  # only surplus, interrupted or dead workers' trials fail
            assert t.system_attrs.get(SURPLUS_KEY) or FAILED_BECAUSE_KEY in t.system_attrs, t
        if t.state == TrialState.WAITING:  # only queued work (a retry, a warm start) can be left once N are finished
            assert t.system_attrs.get("retry_history") or t.system_attrs.get("fixed_params") or "warm_start" in t.user_attrs, t
    for t in finished:
        assert WORKER_KEY in t.system_attrs
        if t.state == TrialState.COMPLETE:
            assert t.value is not None and "schedule" in t.user_attrs
            Schedule.from_dict(t.user_attrs["schedule"])  # every stored schedule is whole
    sampled = [tuple(sorted(t.params.items())) for t in finished if t.params]
    assert len(sampled) == len(set(sampled)), "two finished trials evaluated the same parameters"
    return trials


def export_ok(spec: str, name: str, out: Path) -> Schedule:
    assert main(["export", "--study-name", name, "--storage", spec, "--out", str(out)]) == 0
    return Schedule.load(out)


# ---- the protocol, in-process (fast) ---------------------------------------------------------------
def test_exact_count_with_racing_workers(tmp_path) -> None:
    """Four threads, each with its own journal storage (as separate processes would be), ask as
    fast as they can: the study ends with exactly N finished trials and the rest failed as surplus."""
    spec = f"journal:{tmp_path / 'race.journal'}"
    optuna.create_study(study_name="race", storage=open_storage(spec, study_name="race"))
    n, errors = 40, []

    def worker(i: int) -> None:
        try:
            study = load(spec, "race")

            def objective(trial):
                x = trial.suggest_float("x", 0, 1)
                if x < 0.3:
                    raise optuna.TrialPruned()
                return x

            run_trials(study, objective, n, heartbeat_storage=open_storage(spec, study_name="race"), interval=1, grace=30)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    study = load(spec, "race")
    by = Counter(t.state for t in study.trials)
    assert by[TrialState.COMPLETE] + by[TrialState.PRUNED] == n
    assert by[TrialState.RUNNING] == by[TrialState.WAITING] == 0
    assert all(t.system_attrs.get(SURPLUS_KEY) for t in study.trials if t.state == TrialState.FAIL)


def test_surplus_trial_is_given_up_unrun_and_its_queue_entry_kept(tmp_path) -> None:
    """Two workers ask at the same moment for the last slot: the higher trial number gives its
    trial up without running it (FAIL, ``rapid_search:surplus``), puts the queued parameters it
    took back in the queue, and waits for the other worker's trial instead of overshooting."""
    spec = f"journal:{tmp_path / 'surplus.journal'}"
    study = optuna.create_study(study_name="s", storage=open_storage(spec, study_name="s"))
    study.enqueue_trial({"x": 0.25}, user_attrs={"warm_start": "a"})
    study.enqueue_trial({"x": 0.75}, user_attrs={"warm_start": "b"})
    a, b = load(spec, "s"), load(spec, "s")
    real_ask, ran, first = b.ask, [], []

    def racing_ask(*args, **kwargs):
        if not first:  # worker A asks just before B and takes the last slot, finishing 0.5 s later
            first.append(a.ask())
            threading.Timer(0.5, lambda: a.tell(first[0], 1.0)).start()
        return real_ask(*args, **kwargs)

    b.ask = racing_ask

    def objective(trial):
        ran.append(trial.number)
        return trial.suggest_float("x", 0, 1)

    assert run_trials(b, objective, 1, heartbeat_storage=open_storage(spec, study_name="s"), interval=1, grace=30) == 0
    assert ran == []
    trials = load(spec, "s").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]
    assert trials[1].system_attrs[SURPLUS_KEY] is True
    assert trials[2].system_attrs["fixed_params"] == {"x": 0.75} and trials[2].user_attrs == {"warm_start": "b"}


def test_slot_kept_between_giving_up_and_requeueing(tmp_path) -> None:
    """A trial just given up keeps its slot until its retry is queued (or the one who gave it up
    is presumed dead), so no other worker takes the slot meant for the redo."""
    spec = f"journal:{tmp_path / 'pending.journal'}"
    study = optuna.create_study(study_name="p", storage=open_storage(spec, study_name="p"))
    for age in (0, 1000):
        t = study.ask()
        study._storage.set_trial_system_attr(t._trial_id, RETRY_PENDING_KEY, time.time() - age)
        study.tell(t, state=TrialState.FAIL)
    c = count_trials(study, pending_window=60)
    assert [t.number for t in c.pending] == [0] and c.claimed == 1  # the old one no longer holds a slot
    retry_trial(study, study.trials[0])
    c = count_trials(study, pending_window=60)
    assert c.pending == [] and c.claimed == 0 and c.waiting == 1


def test_failed_for_good_trial_keeps_no_slot_after_a_lost_race(tmp_path) -> None:
    """A worker gives a trial up as stale (writes retry_pending) while the trial's own worker
    fails it for good (its objective raised: no retry) and wins the race to the FAIL: the trial
    neither holds a slot nor is queued again, so no worker idles for the grace period."""
    spec = f"journal:{tmp_path / 'race.journal'}"
    study = optuna.create_study(study_name="r", storage=open_storage(spec, study_name="r"))
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    owner, other = load(spec, "r"), load(spec, "r")
    real_fail = other._storage.set_trial_state_values

    def owner_fails_first(trial_id, state, values=None):  # the owner's error path runs just before the FAIL
        assert Worker(owner, grace=10).give_up(owner._storage.get_trial(trial_id), "raised an error", retry=False)
        return real_fail(trial_id, state, values)

    other._storage.set_trial_state_values = owner_fails_first
    assert Worker(other, grace=10).give_up(other._storage.get_trial(trial._trial_id), "had no heartbeat") is False
    final = load(spec, "r")
    [t] = final.trials
    assert t.state == TrialState.FAIL and RETRY_PENDING_KEY in t.system_attrs  # the loser's write is there...
    c = count_trials(final, pending_window=60)
    assert c.pending == [] and c.claimed == 0 and c.waiting == 0  # ...but holds no slot


def test_stale_trial_failed_once_and_requeued(tmp_path) -> None:
    """A RUNNING trial whose heartbeat stopped is failed by exactly one of two workers and queued
    again once, with its parameters; fresh and finished trials are left alone."""
    spec = f"journal:{tmp_path / 'stale.journal'}"
    study = optuna.create_study(study_name="s", storage=open_storage(spec, study_name="s"))
    done = study.ask()
    done.suggest_float("x", 0, 1)
    study.tell(done, 1.0)
    dead = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    dead.suggest_float("x", 0, 1)
    dead.set_user_attr("warm_start", "tome")
    dead.set_user_attr("kl", 0.5)  # a partial result: not carried over
    study._storage.set_trial_system_attr(dead._trial_id, HEARTBEAT_KEY, time.time() - 100)
    alive = study.ask()
    study._storage.set_trial_system_attr(alive._trial_id, HEARTBEAT_KEY, time.time())

    a, b = load(spec, "s"), load(spec, "s")
    assert Worker(a, grace=10).recover() + Worker(b, grace=10).recover() == 1
    trials = load(spec, "s").trials
    assert trials[0].state == TrialState.COMPLETE and trials[0].value == 1.0
    assert trials[1].state == TrialState.FAIL and "heartbeat" in trials[1].system_attrs[FAILED_BECAUSE_KEY]
    assert trials[2].state == TrialState.RUNNING
    assert len(trials) == 4 and trials[3].state == TrialState.WAITING
    assert trials[3].params == trials[1].params and trials[3].system_attrs["retry_history"] == [1]
    assert trials[3].user_attrs == {"warm_start": "tome"}


@pytest.mark.skipif(not Path("/proc/self/ns/pid").exists(), reason="owner records need Linux /proc")
def test_trial_of_an_ended_worker_process_is_failed_at_once(tmp_path) -> None:
    """A RUNNING trial whose owner record names a process of this machine that has ended (or whose
    pid now belongs to a process started later) is failed and queued again at once, heartbeat fresh
    or not; one whose owner still runs, runs in another machine or PID namespace, or has no record
    waits for the heartbeat. In this process: a worker whose run has returned has ended."""
    from rapid_search.search import workers

    spec = f"journal:{tmp_path / 'owner.journal'}"
    study = optuna.create_study(study_name="o", storage=open_storage(spec, study_name="o"))
    live = subprocess.Popen(["sleep", "60"])
    ended = subprocess.Popen(["sleep", "60"])
    try:
        me = workers._owner_record("live-run")
        rec = {k: workers._owner_record("r")[k] for k in ("boot", "pidns")}
        start_of = {q.pid: workers._proc_start(q.pid)[1] for q in (live, ended)}
        ended.kill()
        ended.wait()
        owners = {
            "ended": {**rec, "pid": ended.pid, "start": start_of[ended.pid], "run": "r"},
            "pid reused": {**rec, "pid": live.pid, "start": start_of[live.pid] - 1, "run": "r"},
            "returned here": {**me, "run": "a run that has returned"},
            "running": {**rec, "pid": live.pid, "start": start_of[live.pid], "run": "r"},
            "running here": me,
            "other machine": {**rec, "boot": "another-machine", "pid": ended.pid, "start": start_of[ended.pid], "run": "r"},
            "other namespace": {**rec, "pidns": "0:1", "pid": ended.pid, "start": start_of[ended.pid], "run": "r"},
            "no record": None,
        }
        for label, owner in owners.items():
            t = study.ask()
            t.suggest_float("x", 0, 1)
            t.set_user_attr("label", label)
            study._storage.set_trial_system_attr(t._trial_id, HEARTBEAT_KEY, time.time())  # fresh
            if owner is not None:
                study._storage.set_trial_system_attr(t._trial_id, OWNER_KEY, owner)
        workers._LIVE_RUNS.add("live-run")
        try:
            assert Worker(load(spec, "o"), grace=1000).recover() == 3
        finally:
            workers._LIVE_RUNS.discard("live-run")
    finally:
        live.kill()
        live.wait()
    got = {t.user_attrs["label"]: t for t in load(spec, "o").trials if "label" in t.user_attrs}
    failed = {k for k, t in got.items() if t.state == TrialState.FAIL}
    assert failed == {"ended", "pid reused", "returned here"}, failed
    assert got["ended"].system_attrs[FAILED_BECAUSE_KEY] == f"its worker process (pid {ended.pid}) on this machine has ended"
    assert "has returned" in got["returned here"].system_attrs[FAILED_BECAUSE_KEY]
    assert all(t.state == TrialState.RUNNING for k, t in got.items() if k not in failed)
    queued = [t for t in load(spec, "o").trials if t.state == TrialState.WAITING]
    assert sorted(t.system_attrs["retry_history"][0] for t in queued) == sorted(got[k].number for k in failed)


def test_only_the_creator_records_the_setup(tmp_path) -> None:
    """Two workers start a new study at the same moment with different set-ups: the one that
    joins waits for the creator's set-up and is refused, instead of finding none and writing its
    own; a joiner with the same set-up keeps the creator's target (and says when its own differs)."""
    from rapid_search.search.runner import share_setup
    from rapid_search.search.study import SearchError

    spec = f"journal:{tmp_path / 'setup.journal'}"
    creator = optuna.create_study(study_name="s", storage=open_storage(spec, study_name="s"))
    mine = {"setup": {"model": "test_vit", "budget": "60%latency"}, "base_gflops": 0.04, "target": 12.0}
    other = {"setup": {"model": "test_vit2", "budget": "60%latency"}, "base_gflops": 0.05, "target": 15.0}
    threading.Timer(0.5, share_setup, args=(creator, True, mine)).start()  # the creator is a moment late
    with pytest.raises(SearchError, match="was started with model = 'test_vit', not 'test_vit2'"):
        share_setup(load(spec, "s"), False, other, poll=0.05)
    assert load(spec, "s").user_attrs == mine

    log: list[str] = []
    assert share_setup(load(spec, "s"), False, dict(mine, target=12.5), log=log.append)["target"] == 12.0
    assert log == []  # within 10 %: nothing to say
    assert share_setup(load(spec, "s"), False, dict(mine, target=20.0), log=log.append)["target"] == 12.0
    assert len(log) == 1 and "measured by the worker that created it" in log[0]
    assert load(spec, "s").user_attrs == mine


def test_joining_worker_keeps_the_creators_target(tiny_search, tmp_path, capsys) -> None:
    """A worker that joins (here: resumes) a study does not overwrite the target the creator
    recorded (for a latency budget, the creator's measurement; export reports that one)."""
    spec, name = f"journal:{tmp_path / 't.journal'}", "tgt"
    assert main(tiny_search.args(spec, name, tmp_path / "a.yaml", trials=1, extra=["--progress", "quiet"])) == 0
    study = load(spec, name)
    created = study.user_attrs["target"]
    study.set_user_attr("target", created * 0.9)  # as if measured on the creator's machine
    assert main(tiny_search.args(spec, name, tmp_path / "b.yaml", trials=2, extra=["--progress", "quiet"])) == 0
    capsys.readouterr()
    assert load(spec, name).user_attrs["target"] == created * 0.9


# ---- real worker processes ---------------------------------------------------------------------------
def _pg_no_password(url: str) -> tuple[str, dict]:
    """The URL without its password, and the PGPASSWORD environment that libpq reads instead."""
    u = sa.engine.make_url(url)
    return u.set(password=None).render_as_string(hide_password=False), {"PGPASSWORD": u.password or ""}


def _log(p) -> str:
    log = Path(p.log_path)
    return log.read_text(errors="replace") if log.exists() else ""  # not there before the child opens it


@pytest.mark.postgres
def test_two_workers_share_one_postgres_study(pg_fresh_url, tiny_search, cli_workers, tmp_path) -> None:
    """Two workers on one PostgreSQL study finish exactly the requested trials together, with no
    duplicate or lost trial, and exporting while they run (both frozen mid-run, wherever they were,
    a transaction perhaps open) is safe. The password reaches libpq through PGPASSWORD, not the
    command line."""
    url, env = _pg_no_password(pg_fresh_url)
    name, n = "two", 6
    procs = [
        cli_workers.start(tiny_search.args(url, name, tmp_path / f"w{i}.yaml", trials=n, extra=FAST), tmp_path / f"w{i}.log", env=env)
        for i in range(2)
    ]
    # Step both workers together until each has finished a trial (neither can take every trial
    # while the other loads its model), then export with both frozen mid-run.
    storage = open_storage(pg_fresh_url, study_name=name)

    def finished_one(p) -> bool:
        if name not in optuna.get_all_study_names(storage):
            return False
        trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        return any(str(t.system_attrs.get(WORKER_KEY, "")).endswith(f":{p.pid}") for t in trials)

    step_each_until(procs, finished_one, time.monotonic() + 90)
    exports = 0
    os.environ["PGPASSWORD"] = env["PGPASSWORD"]
    try:
        for _ in range(2):
            assert main(["export", "--study-name", name, "--storage", url, "--out", str(tmp_path / "live.yaml")]) == 0
            Schedule.load(tmp_path / "live.yaml")
            exports += 1
    finally:
        del os.environ["PGPASSWORD"]
        for p in procs:
            os.kill(p.pid, signal.SIGCONT)
    for p in procs:
        assert cli_workers.wait(p) == 0, _log(p)
    study = optuna.load_study(study_name=name, storage=open_storage(pg_fresh_url, study_name=name))
    trials = check_study(study, n)
    workers = {t.system_attrs[WORKER_KEY] for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)}
    assert len(workers) == 2, f"both workers should have finished trials: {workers}"
    assert exports >= 1, "export never ran while the workers were running"
    assert export_ok(pg_fresh_url, name, tmp_path / "final.yaml").model.name == "test_vit"
    for p in procs:
        assert env["PGPASSWORD"] not in _log(p)


def freeze(pid: int) -> None:
    """SIGSTOP ``pid`` and wait until it has really stopped (the signal is asynchronous: on a busy
    machine the process can run on for a while, and a state read meanwhile would be stale)."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        states = []
        for task in Path(f"/proc/{pid}/task").iterdir():  # every thread (the heartbeat thread too)
            try:
                states.append((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
            except FileNotFoundError:  # a thread that just ended
                pass
        if states and all(st in ("T", "t") for st in states):
            return
        time.sleep(0.002)
    raise AssertionError(f"process {pid} did not stop")


def step_until(p, found, deadline: float, *, step: float = 0.005):
    """Single-step worker ``p`` until ``found()`` (called with ``p`` frozen) returns something truthy;
    returns it with ``p`` left frozen (:func:`step_each_until` for one worker)."""
    return step_each_until([p], lambda _: found(), deadline, step=step)[0]


def step_each_until(procs, found, deadline: float, *, step: float = 0.005) -> list:
    """Single-step the workers ``procs`` together until ``found(p)`` (called with every stepped worker
    frozen) is truthy for each; returns those values with every worker left frozen. A worker that got
    there stays frozen while the others step on. Each step lets the workers run for ``step`` seconds.
    Polling free-running workers loses races on a fast machine (a tiny study can finish every trial
    between two reads of a PostgreSQL storage, or one worker take every trial while another is
    held); stepped workers cannot get past a state that lasts longer than one step unseen."""
    values: dict[int, object] = {}
    while time.monotonic() < deadline:
        stepping = [p for p in procs if p.pid not in values]
        for p in stepping:
            try:
                freeze(p.pid)
            except ProcessLookupError:  # it ended during the last step
                raise AssertionError(f"worker ended before what the test waits for:\n{_log(p)}") from None
        for p in stepping:
            if value := found(p):
                values[p.pid] = value
        if len(values) == len(procs):
            return [values[p.pid] for p in procs]
        for p in procs:
            if p.pid not in values:
                os.kill(p.pid, signal.SIGCONT)
        time.sleep(step)
    raise AssertionError("timed out stepping the workers:\n" + "\n".join(_log(p) for p in procs))


def freeze_mid_trial(p, study_of, deadline: float, lock=None) -> int:
    """SIGSTOP ``p`` while it runs a trial (checked with the process frozen), after at least two
    finished trials; returns that trial's number (with ``p`` left frozen). The trial has
    its worker, heartbeat and owner record stored. ``lock``: the journal's lock file; a worker killed
    while holding it would stall the next one for the lock's 30 s grace period, which is not what
    these tests are about (frozen inside a journal append: step on)."""
    pid_tag = f":{p.pid}"
    while study_of() is None:  # loading the model: nothing to catch yet
        assert p.exitcode is None, f"worker ended early:\n{_log(p)}"
        assert time.monotonic() < deadline, f"the worker never created its study:\n{_log(p)}"
        time.sleep(0.02)

    def running_trial() -> int | None:
        study = study_of()
        if count_trials(study).finished < 2 or (lock is not None and lock.exists()):
            return None
        mine = [
            t.number
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if str(t.system_attrs.get(WORKER_KEY, "")).endswith(pid_tag) and {HEARTBEAT_KEY, OWNER_KEY} <= t.system_attrs.keys()
        ]
        return mine[0] if mine else None  # trial 0 is never the one caught: at least two finished

    return step_until(p, running_trial, deadline)


@pytest.mark.parametrize("owner", ["here", "elsewhere"])
@pytest.mark.parametrize("kind", ["journal", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_killed_worker_trial_is_redone(kind, owner, request, tiny_search, cli_workers, tmp_path) -> None:
    """A worker SIGKILLed mid-trial, then a worker restarted: the dead trial is failed and redone
    with its parameters, every trial finished before the kill is intact, the study ends with exactly
    N finished trials and exports. On the same machine the new worker sees that the owner process
    has ended and fails the trial at once; a trial whose owner record names another machine
    (``elsewhere``, as a worker there would have written it) waits for the heartbeat's grace period."""
    spec = request.getfixturevalue("pg_fresh_url") if kind == "postgres" else f"journal:{tmp_path / 'k.journal'}"
    name, n = "kill", 10  # enough trials left after the first two to catch the worker in one

    def study_of():
        try:
            return optuna.load_study(study_name=name, storage=open_storage(spec, study_name=name, create=False))
        except Exception:  # noqa: BLE001 - not created yet
            return None

    fast = FAST_JOURNAL if kind == "journal" else FAST
    p = cli_workers.start(tiny_search.args(spec, name, tmp_path / "k.yaml", trials=n, extra=fast), tmp_path / "a.log")
    lock = tmp_path / "k.journal.lock" if kind == "journal" else None
    killed = freeze_mid_trial(p, study_of, time.monotonic() + 90, lock)
    os.kill(p.pid, signal.SIGKILL)
    p.join(10)
    assert p.exitcode == -signal.SIGKILL
    before = {t.number: (t.state, t.value, t.params, t.user_attrs) for t in study_of().trials if t.state.is_finished()}
    running = study_of().trials[killed]
    assert running.state == TrialState.RUNNING and running.system_attrs[OWNER_KEY]["pid"] == p.pid
    if owner == "elsewhere":
        study_of()._storage.set_trial_system_attr(running._trial_id, OWNER_KEY, {**running.system_attrs[OWNER_KEY], "boot": "another-machine"})

    q = cli_workers.start(tiny_search.args(spec, name, tmp_path / "k.yaml", trials=n, extra=fast), tmp_path / "b.log")
    assert cli_workers.wait(q, 120) == 0, _log(q)
    why = "no heartbeat" if owner == "elsewhere" else f"its worker process (pid {p.pid}) on this machine has ended"
    assert why in _log(q)

    study = study_of()
    trials = check_study(study, n)
    for number, snap in before.items():  # nothing finished was lost or rewritten
        t = trials[number]
        assert (t.state, t.value, t.params, t.user_attrs) == snap
    dead = trials[killed]
    assert dead.state == TrialState.FAIL and dead.system_attrs[FAILED_BECAUSE_KEY].startswith("had no heartbeat" if owner == "elsewhere" else why)
    redo = [t for t in trials if t.system_attrs.get("retry_history") == [killed]]
    assert len(redo) == 1 and dead.params.items() <= redo[0].params.items()  # all of them unless it died while drawing them
    assert redo[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert redo[0].user_attrs.get("warm_start") == dead.user_attrs.get("warm_start")
    assert export_ok(spec, name, tmp_path / "e.yaml").model.name == "test_vit"
