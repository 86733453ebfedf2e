"""Progress display: plain lines, quiet, routing of Optuna's log records."""

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


def test_create_modes():
    buf = io.StringIO()  # not a terminal: auto means plain
    assert Progress.create("auto", stream=buf).mode == "plain"
    assert Progress.create("plain", stream=buf).mode == "plain"
    assert Progress.create("quiet", stream=buf).mode == "quiet"
    assert Progress.create("rich", stream=buf).mode == "rich"
    with pytest.raises(ValueError, match="use one of: auto, rich, plain, quiet"):
        Progress.create("fancy")


def test_plain_writes_one_timestamped_line_per_update():
    buf = io.StringIO()
    with Progress.create("plain", stream=buf) as prog:
        prog.start(4, cost_unit="GFLOPs")
        before = len(_lines(buf))
        prog.update(0, "COMPLETE", 0.80, "switch=3 protect=0.5", 0.62)
        prog.update(1, "PRUNED", None, "switch=1", 0.63)
        prog.update(2, "COMPLETE", 0.85, "switch=2", 0.61)
        prog.update(3, "COMPLETE", 0.90, "switch=2", 0.70, feasible=False)
        lines = _lines(buf)[before:]
    assert len(lines) == 4
    assert all(re.match(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] trial ", line) for line in lines)
    assert "0.62 GFLOPs" in lines[0] and "switch=3 protect=0.5" in lines[0]
    assert "PRUNED" in lines[1]
    assert "best #2" in lines[3] and "over budget" in lines[3]  # infeasible trials never become best
    assert prog.best is not None and prog.best.number == 2
    assert [t.number for t in prog.top(5)] == [2, 0]


def test_plain_log_set_best_and_finish():
    buf = io.StringIO()
    with Progress.create("plain", stream=buf) as prog:
        prog.start(2, direction="minimize")
        prog.update(0, "COMPLETE", 0.3)
        prog.update(1, "COMPLETE", 0.1)
        assert prog.best.number == 1
        prog.set_best(0, 0.3, "1.0 ms")
        prog.log("two\nlines")
        prog.finish({"trials": 2})
    out = _lines(buf)
    assert any(line.endswith("] two") for line in out) and any(line.endswith("] lines") for line in out)
    assert "best #0" in out[-2] and "1.0 ms" in out[-2]
    assert out[-1].endswith("trials: 2")


def test_quiet_writes_only_errors():
    buf = io.StringIO()
    with Progress.create("quiet", stream=buf) as prog:
        prog.start(3)
        prog.update(0, "COMPLETE", 0.5, "x=1", 0.6)
        prog.set_best(0, 0.5)
        prog.log("hello")
        optuna.logging.get_logger("optuna.study").warning("an optuna warning")
        prog.finish("summary")
        assert buf.getvalue() == ""
        prog.error("boom")
        optuna.logging.get_logger("optuna.study").error("optuna failed")
    text = buf.getvalue()
    assert "boom" in text and "optuna failed" in text
    assert len(_lines(buf)) == 2


def test_optuna_records_are_routed_and_default_handler_restored():
    root = _optuna_root()
    optuna.logging.enable_default_handler()
    before = list(root.handlers)
    buf = io.StringIO()
    with Progress.create("plain", stream=buf) as prog:
        during = list(root.handlers)
        study = optuna.create_study(direction="maximize")  # logs "A new study created ..." at INFO
        prog.start(3)
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3, callbacks=[prog.trial])
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
        with Progress.create("plain", stream=io.StringIO()):
            pass
        assert set(root.handlers) == set(before)
    finally:
        optuna.logging.enable_default_handler()


def test_trial_callback_reads_cost_and_constraints():
    buf = io.StringIO()
    study = optuna.create_study(direction="maximize")

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0, 1)
        trial.set_user_attr("gflops", 0.5 + x)
        trial.set_constraint("budget", x - 0.5)
        return x

    with Progress.create("plain", stream=buf) as prog:
        prog.start(6)
        study.optimize(objective, n_trials=6, callbacks=[lambda s, t: prog.trial(s, t, metric="kl")])
    feasible = [t for t in study.trials if t.constraints["budget"] <= 0]
    assert prog.best is not None and prog.best.number == max(feasible, key=lambda t: t.value).number
    assert "-kl" in buf.getvalue() and "GFLOPs" in buf.getvalue()


def test_rich_view_renders_to_a_stream():
    buf = io.StringIO()
    with Progress.create("rich", stream=buf) as prog:
        prog.start(3, cost_unit="GFLOPs")
        for i in range(3):
            prog.update(i, "COMPLETE", 0.1 * i, f"x={i}", 0.6)
        prog.log("a message")
        prog.finish("done")
    text = buf.getvalue()
    assert "a message" in text and "done" in text and "3/3" in text


def test_runtime_imports_without_rich():
    code = (
        "import sys; sys.modules['rich'] = None\n"
        "import rapid_search, rapid_search.search.progress as p\n"
        "import io; prog = p.Progress.create('auto', stream=io.StringIO()); assert prog.mode == 'plain'\n"
        "assert 'rich.console' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
