"""Progress display: plain lines, quiet, rich, routing of Optuna's log records."""

from __future__ import annotations

import io
import logging
import re
import subprocess
import sys

import optuna
import pytest

from rapid_search.search.progress import Progress


def _optuna_root() -> logging.Logger:
    return logging.getLogger("optuna")


def _lines(buf: io.StringIO) -> list[str]:
    return [line for line in buf.getvalue().splitlines() if line]


def _objective(trial: optuna.Trial) -> float:
    """Trial 1 pruned, trial 3 over budget (the best value, yet never the best trial)."""
    x = [0.80, 0.0, 0.85, 0.90][trial.number]
    trial.suggest_float("x", 0, 1)
    trial.set_user_attr("gflops", 0.6 + trial.number / 100)
    trial.set_constraint("budget", 0.1 if trial.number == 3 else -0.1)
    if trial.number == 1:
        raise optuna.TrialPruned()
    return x


def test_modes():
    buf = io.StringIO()  # not a terminal: auto means plain
    assert Progress("auto", stream=buf).mode == "plain"
    assert Progress("plain", stream=buf).mode == "plain"
    assert Progress("quiet", stream=buf).mode == "quiet"
    assert Progress("rich", stream=buf).mode == "rich"
    with pytest.raises(ValueError, match="use one of: auto, rich, plain, quiet"):
        Progress("fancy")


def test_plain_writes_one_timestamped_line_per_trial():
    buf = io.StringIO()
    study = optuna.create_study(direction="maximize")
    with Progress("plain", stream=buf, metric="kl") as prog:
        prog.start(4)
        before = len(_lines(buf))
        study.optimize(_objective, n_trials=4, callbacks=[prog])
        lines = _lines(buf)[before:]
    assert len(lines) == 4
    assert all(re.match(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] trial ", line) for line in lines)
    assert "[1/4] COMPLETE" in lines[0] and "-kl 0.8" in lines[0] and "0.6 GFLOPs" in lines[0] and "x=" in lines[0]
    assert "PRUNED" in lines[1]
    assert "best #2" in lines[3] and "over budget" in lines[3]  # infeasible trials never become best
    assert prog.best is not None and prog.best.number == 2


def test_counts_the_whole_studys_finished_trials():
    """[k/N] counts every finished trial of the study (other workers' too), not just this worker's."""
    buf = io.StringIO()
    study = optuna.create_study(direction="maximize")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)  # "another worker"
    with Progress("plain", stream=buf) as prog:
        prog.start(5, done=3)
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1, callbacks=[prog])
    assert "3 already done (resuming)" in buf.getvalue() and "[4/5]" in _lines(buf)[-1]


def test_plain_log_and_finish():
    buf = io.StringIO()
    with Progress("plain", stream=buf) as prog:
        prog.start(2)
        prog.log("two\nlines")
        prog.finish("trials: 2")
    out = _lines(buf)
    assert any(line.endswith("] two") for line in out) and any(line.endswith("] lines") for line in out)
    assert "finished 0/2 trials" in out[-2]
    assert out[-1].endswith("trials: 2")


def test_quiet_writes_only_errors():
    buf = io.StringIO()
    study = optuna.create_study(direction="maximize")
    with Progress("quiet", stream=buf) as prog:
        prog.start(3)
        study.optimize(_objective, n_trials=1, callbacks=[prog])
        prog.log("hello")
        optuna.logging.get_logger("optuna.study").warning("an optuna warning")
        prog.finish("summary")
        assert buf.getvalue() == ""
        prog.log("boom", level=logging.ERROR)
        optuna.logging.get_logger("optuna.study").error("optuna failed")
    text = buf.getvalue()
    assert "boom" in text and "optuna failed" in text
    assert len(_lines(buf)) == 2


def test_optuna_records_are_routed_and_default_handler_restored():
    root = _optuna_root()
    optuna.logging.enable_default_handler()
    before = list(root.handlers)
    buf = io.StringIO()
    with Progress("plain", stream=buf) as prog:
        during = list(root.handlers)
        study = optuna.create_study(direction="maximize")  # logs "A new study created ..." at INFO
        prog.start(3)
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3, callbacks=[prog])
        optuna.logging.get_logger("optuna.study").warning("routed warning")
    after = list(root.handlers)
    assert set(after) == set(before)  # default handler back, ours gone
    assert not any(h in during for h in before if isinstance(h, logging.StreamHandler) and h.stream is sys.stderr)
    text = buf.getvalue()
    assert "optuna: A new study created" in text
    assert "optuna: routed warning" in text
    assert "Trial 0 finished" not in text  # optuna's per-trial lines are replaced by ours
    assert len([line for line in _lines(buf) if "] trial " in line]) == 3


def test_default_handler_stays_off_if_it_was_off():
    root = _optuna_root()
    optuna.logging.disable_default_handler()
    try:
        before = list(root.handlers)
        with Progress("plain", stream=io.StringIO()):
            pass
        assert set(root.handlers) == set(before)
    finally:
        optuna.logging.enable_default_handler()


def test_rich_view_renders_to_a_stream():
    buf = io.StringIO()
    study = optuna.create_study(direction="maximize")
    with Progress("rich", stream=buf) as prog:
        prog.start(3)
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3, callbacks=[prog])
        prog.log("a message")
        prog.finish("done")
    text = buf.getvalue()
    assert "a message" in text and "done" in text and "3/3" in text


def test_progress_imports_without_rich():
    code = (
        "import sys; sys.modules['rich'] = None\n"
        "import rapid_search, rapid_search.search.progress as p\n"
        "import io; prog = p.Progress('auto', stream=io.StringIO()); assert prog.mode == 'plain'\n"
        "assert 'rich.console' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
