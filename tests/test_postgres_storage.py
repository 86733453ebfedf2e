"""Optuna RDB storage on a real PostgreSQL server, shared by several worker processes.

Needs ``RAPID_PG_URL`` (see tests/conftest.py); ``.ci/run`` provides it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import uuid

import optuna
import pytest
import sqlalchemy as sa
from optuna.trial import TrialState

pytestmark = pytest.mark.postgres

N_TRIALS = 20
N_WORKERS = 2

# One worker process. It waits at a file barrier until every worker has loaded the study, so
# that they really run side by side (interpreter start-up alone is ~1 s, longer than the whole
# study). MaxTrialsCallback stops a worker once N trials are complete, but with concurrent
# workers it can overshoot (each may finish one more trial after the count is reached), so the
# objective also gates on trial.number, which the storage hands out atomically: numbers >= N are
# pruned and stop that worker. Hence exactly N complete trials, numbered 0..N-1.
WORKER = textwrap.dedent(
    """
    import os, pathlib, time
    import optuna
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    env = os.environ
    n, wid = int(env["T_N_TRIALS"]), env["T_WORKER"]
    study = optuna.load_study(
        study_name=env["T_STUDY"],
        storage=optuna.storages.RDBStorage(env["T_STORAGE"]),  # URL via env, not argv (ps shows argv)
        sampler=optuna.samplers.RandomSampler(),
    )

    barrier = pathlib.Path(env["T_BARRIER"])
    (barrier / wid).touch()
    deadline = time.monotonic() + 30
    while len(list(barrier.iterdir())) < int(env["T_N_WORKERS"]):
        assert time.monotonic() < deadline, "the other workers never showed up"
        time.sleep(0.01)

    def objective(trial):
        trial.set_user_attr("worker", wid)
        if trial.number >= n:
            trial.study.stop()
            raise optuna.TrialPruned()
        x = trial.suggest_float("x", -10, 10)
        time.sleep(0.01)  # let the workers interleave
        return (x - 2) ** 2

    study.optimize(objective, callbacks=[MaxTrialsCallback(n, states=(TrialState.COMPLETE,))])
    """
)


def test_workers_share_one_study(pg_fresh_url: str, tmp_path) -> None:
    name = f"shared-{uuid.uuid4().hex[:12]}"
    storage = optuna.storages.RDBStorage(pg_fresh_url)
    optuna.create_study(study_name=name, storage=storage)  # creates the schema before the workers race

    barrier = tmp_path / "barrier"
    barrier.mkdir()
    env = dict(os.environ, T_STORAGE=pg_fresh_url, T_STUDY=name, T_N_TRIALS=str(N_TRIALS),
               T_N_WORKERS=str(N_WORKERS), T_BARRIER=str(barrier))
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER], env=dict(env, T_WORKER=str(i)),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(N_WORKERS)
    ]
    try:
        outputs = [p.communicate(timeout=60)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, f"worker failed (exit {p.returncode}):\n{out}"

    trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    by_state = {s: [t for t in trials if t.state == s] for s in TrialState}
    numbers = [t.number for t in trials]

    assert len(by_state[TrialState.COMPLETE]) == N_TRIALS
    assert sorted(t.number for t in by_state[TrialState.COMPLETE]) == list(range(N_TRIALS))
    assert sorted(numbers) == list(range(len(trials))), "trial numbers must be unique and gap-free"
    # Nothing lost: no trial left RUNNING/WAITING by a worker, none failed; at most one pruned
    # overshoot trial per worker.
    assert not by_state[TrialState.RUNNING] and not by_state[TrialState.WAITING]
    assert not by_state[TrialState.FAIL]
    assert len(by_state[TrialState.PRUNED]) <= N_WORKERS
    assert all(t.value is not None for t in by_state[TrialState.COMPLETE])
    # Both workers really took part.
    workers = {t.user_attrs["worker"] for t in by_state[TrialState.COMPLETE]}
    assert workers == {str(i) for i in range(N_WORKERS)}, f"completed trials by worker: {workers}"


def test_wrong_password_is_rejected_without_leaking_it(pg_url: str) -> None:
    url = sa.engine.make_url(pg_url)
    wrong = f"wrong-{uuid.uuid4().hex}"
    bad_url = url.set(password=wrong).render_as_string(hide_password=False)

    start = time.monotonic()
    engine = sa.create_engine(bad_url, connect_args={"connect_timeout": 5})
    try:
        with pytest.raises(sa.exc.OperationalError) as info:
            engine.connect()
    finally:
        engine.dispose()
    assert time.monotonic() - start < 5

    # What Optuna users see goes through the same path.
    with pytest.raises(sa.exc.OperationalError) as info_optuna:
        optuna.storages.RDBStorage(bad_url)

    for exc in (info.value, info_optuna.value):
        for text in (str(exc), repr(exc), str(exc.orig)):
            assert wrong not in text
            if url.password:
                assert url.password not in text
    assert "***" in repr(engine) and wrong not in repr(engine)
