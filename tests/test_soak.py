"""Soak: many short trials (timm ``test_vit``) through one journal file with several workers, one
of them SIGKILLed mid-trial and replaced; then the trial count and the storage's consistency.

Bounded: 40 trials, 3 workers (+1 replacement), heartbeat 1 s / grace 33 s (the least a journal
file allows), 180 s at most.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from pathlib import Path

import optuna
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState

from rapid_search.storage import open_storage
from rapid_search.search.workers import FAILED_BECAUSE_KEY, SURPLUS_KEY, WORKER_KEY, count_trials
from test_distributed import FAST_JOURNAL, check_study, export_ok, freeze_mid_trial


def test_soak_journal_many_workers(tiny_search, cli_workers, tmp_path) -> None:
    journal = tmp_path / "soak.journal"
    spec, name, n = f"journal:{journal}", "soak", 40
    lock = Path(str(journal) + ".lock")
    start = time.monotonic()

    def args(i: int) -> list[str]:
        return tiny_search.args(spec, name, tmp_path / f"w{i}.yaml", trials=n, extra=[*FAST_JOURNAL, "--progress", "quiet"])

    procs = [cli_workers.start(args(i), tmp_path / f"w{i}.log") for i in range(3)]

    def study():
        return optuna.load_study(study_name=name, storage=open_storage(spec, study_name=name, create=False))

    # kill worker 0 inside a trial once the study is under way, and start a replacement
    victim = procs[0]
    while not (journal.exists() and journal.stat().st_size and count_trials(study()).finished >= 8):
        assert time.monotonic() - start < 90, "soak did not get under way"
        assert victim.exitcode is None, Path(victim.log_path).read_text()
        time.sleep(0.02)

    killed_trial = freeze_mid_trial(victim, study, start + 90, lock)
    os.kill(victim.pid, signal.SIGKILL)
    victim.join(10)
    procs.append(cli_workers.start(args(3), tmp_path / "w3.log"))

    exports = 0
    while any(p.exitcode is None for p in procs[1:]) and exports < 2:  # exporting while the workers write
        assert export_ok(spec, name, tmp_path / "live.yaml").model.name == "test_vit"
        exports += 1
        time.sleep(1.0)
    for p in procs[1:]:
        p.join(max(1.0, 180 - (time.monotonic() - start)))
        assert p.exitcode == 0, Path(p.log_path).read_text()

    # the journal itself: whole lines of JSON only, and a fresh reader replays it to the same study
    raw = journal.read_bytes()
    assert raw.endswith(b"\n")
    ops = [json.loads(line) for line in raw.splitlines()]
    assert all("op_code" in op for op in ops)
    fresh = optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(journal))))

    trials = check_study(fresh, n)
    by = Counter(t.state for t in trials)
    dead = trials[killed_trial]
    # the other workers see that its process has ended: no need to wait out the grace period
    assert dead.state == TrialState.FAIL and dead.system_attrs[FAILED_BECAUSE_KEY] == f"its worker process (pid {victim.pid}) on this machine has ended"
    redone = [t for t in trials if t.system_attrs.get("retry_history") == [killed_trial]]
    # the redo gets the parameters the dead trial had drawn (all, unless it died while drawing them)
    assert len(redone) == 1 and dead.params.items() <= redone[0].params.items() and redone[0].state.is_finished()
    surplus = sum(1 for t in trials if t.system_attrs.get(SURPLUS_KEY))
    assert by[TrialState.FAIL] == surplus + 1, by
    assert len({t.system_attrs[WORKER_KEY] for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)}) >= 2
    assert exports >= 1
    assert export_ok(spec, name, tmp_path / "final.yaml").model.name == "test_vit"
