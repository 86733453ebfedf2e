"""scripts/gpu_check.sh on a machine without CUDA (its dry run), and the GPU benchmark's bookkeeping.

The CUDA run itself needs a GPU (README, section GPU); here the dry run must say so on one line,
exit 3, and leave a valid report of its CPU smoke run in the folder it was given, nothing in the
repository.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
EXIT_NO_CUDA = 3


def _gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "benchmarks" / "gpu" / "gpu_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _git_status() -> str | None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        return None
    p = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=all"], capture_output=True, text=True)
    return p.stdout if p.returncode == 0 else None


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible: the script would do the real run")
def test_dry_run_without_cuda(tmp_path):
    out, tmp = tmp_path / "out", tmp_path / "tmp"
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAPID_GPU_")}
    env.update(PYTHON=sys.executable, RAPID_GPU_OUT=str(out), TMPDIR=str(tmp))
    before = _git_status()
    p = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    log = f"stdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}"
    assert p.returncode == EXIT_NO_CUDA, log
    said = [ln for ln in p.stderr.splitlines() if ln.startswith("gpu_check: no CUDA device")]
    assert len(said) == 1 and f"exit {EXIT_NO_CUDA}" in said[0] and str(out) in said[0], log
    assert _git_status() == before, "the dry run wrote into the repository"
    assert not list(tmp.glob("gpu_check.*")), "the work folder was not removed"

    rep = json.loads((out / "results.json").read_text())
    assert rep["format"] == "rapid-gpu-bench/v1" and rep["env"]["gpu"] is None and rep["env"]["device"] == "cpu"
    assert rep["env"]["rapid_search_path"].startswith(str(tmp)), "the smoke run must use the installed copy, not the checkout"
    steps = {s["step"]: s for s in rep["steps"]}
    assert {"install", "cuda-tests-collect", "smoke", "search-b4", "remeasure-b4"} <= set(steps), steps
    assert all(s["rc"] == 0 for s in steps.values()), steps

    rows = rep["speed"]["rows"]
    assert [r["schedule"] for r in rows] == ["unreduced", "RAPID 50%", "ToMe 50%"]
    assert all(r["status"] == "ok" and r["median_ms"] > 0 and r["rounds"] == 3 and r["batch"] == 2 for r in rows), rows
    base, rapid, tome = rows
    assert base["speedup"] == 1.0 and base["gflops"] == rep["speed"]["models"]["test_vit"]["base_gflops"]
    for r in (rapid, tome):
        assert r["achieved_ratio"] <= 0.5 and r["ideal_speedup"] >= 2.0
        assert r["of_ideal"] == pytest.approx(r["speedup"] / r["ideal_speedup"], rel=1e-3)

    searched = rep["search"]["search-b4"]
    assert searched["kind"] == "remeasure" and searched["model"] == "test_vit" and searched["ratio_gflops"] <= 0.5
    assert searched["schedule_ms"] > 0 and searched["unreduced_ms"] > 0 and searched["rounds"] == 3
    assert searched["budget"]["spec"] == "50%GFLOPs" and searched["met"] is None  # no latency target on this path
    assert (out / "lat-b4.yaml").is_file()

    md = (out / "results.md").read_text()
    assert "No CUDA device: CPU smoke run only" in md
    assert "| float32 | eager | 2 |" in md and "| search-b4 | 4 |" in md


def test_compile_failure_is_recorded_per_row():
    gb = _gpu_bench()

    def broken_compile(model):
        raise RuntimeError("inductor exploded\nsecond line")

    res = gb.run_speed(
        models=("test_vit",), ratios=(0.5,), batches=(2,), dtypes=("float32",), device=torch.device("cpu"),
        compile_mode="on", compile_batches=(2,), compile_dtypes=("float32",), compile_ratios=(0.5,), compile_estimate_s=0.0,
        time_budget_s=120.0, warmup=1, min_rounds=2, max_rounds=2, compile_fn=broken_compile,
    )
    eager = [r for r in res["rows"] if r["mode"] == "eager"]
    compiled = [r for r in res["rows"] if r["mode"] == "compiled"]
    assert [r["status"] for r in eager] == ["ok"] * 3
    assert [r["schedule"] for r in compiled] == ["unreduced", "RAPID 50%", "ToMe 50%"]
    assert all(r["status"] == "compile failed: RuntimeError: inductor exploded second line" for r in compiled), compiled


def test_time_compiled_times_and_unpatches(model):
    import rapid_search as rs

    gb = _gpu_bench()
    x = torch.randn(2, 3, 160, 160)
    sched = rs.rapid_schedule(model, 0.5)
    seen = []

    def fake_compile(m):
        seen.append(rs.is_patched(m))  # the schedule is applied before compiling
        return m

    res = gb.time_compiled(model, x, sched, device=torch.device("cpu"), warmup=1, rounds=3, timeout_s=60, compile_fn=fake_compile)
    assert res["status"] == "ok" and res["timing"].repeats == 3 and res["compile_s"] >= 0
    assert seen == [True] and not rs.is_patched(model)


def test_time_budget_skips_what_does_not_fit():
    gb = _gpu_bench()
    res = gb.run_speed(
        models=("test_vit",), ratios=(0.5,), batches=(2, 4), dtypes=("float32",), device=torch.device("cpu"),
        compile_mode="off", time_budget_s=1e-6, warmup=1, min_rounds=2, max_rounds=2,
    )
    assert len(res["rows"]) == 6 and all(r["status"] == "skipped: time budget" for r in res["rows"]), res["rows"]
    assert res["setup"]["compile"] == "off"


def test_report_of_a_failed_search(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))
    try:
        import gpu_report
    finally:
        sys.path.remove(str(ROOT / "benchmarks" / "gpu"))
    log = tmp_path / "search.log"
    log.write_text("loading ...\nrapid-search: error: budget 60%latency (1.00 ms) is below the fastest schedule — raise the budget\n")
    gpu_report.failed_step(out=tmp_path / "search-b1.json", status="search failed: budget unreachable", batch_size=1, log=log)
    (tmp_path / "steps.tsv").write_text("search-b1\t2\t12\tbatch 1\n")
    j, m = gpu_report.write_report(tmp_path)
    rep = json.loads(j.read_text())
    assert rep["search"]["search-b1"]["log_tail"][-1].startswith("rapid-search: error: budget 60%latency")
    assert rep["steps"] == [{"step": "search-b1", "rc": 2, "seconds": "12", "note": "batch 1"}]
    assert "| search-b1 | 1 | — | — | — | — | — | — | *search failed: budget unreachable* |" in m.read_text()


def test_compile_past_the_time_left_is_a_skip_not_a_failure(model):
    import time

    import rapid_search as rs

    gb = _gpu_bench()

    def slow_compile(m):
        time.sleep(5)
        return m

    res = gb.time_compiled(model, torch.randn(1, 3, 160, 160), None, device=torch.device("cpu"), warmup=0, rounds=1, timeout_s=0.5,
                           compile_fn=slow_compile)
    assert res["status"].startswith("skipped: time budget") and not rs.is_patched(model)
