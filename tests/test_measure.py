"""Timing and device parsing (rapid_search.tools.measure)."""

from __future__ import annotations

import contextlib
import time

import pytest
import torch
from torch import nn

from rapid_search.tools.measure import Timing, measure_model, parse_device, set_cpu_threads, time_callable

CPU = torch.device("cpu")


def test_time_callable_counts_runs_and_summarises() -> None:
    calls: list[bool] = []

    def fn() -> None:
        calls.append(torch.is_inference_mode_enabled())

    t = time_callable(fn, device=CPU, warmup=2, repeats=7, batch_size=4)
    assert len(calls) == 9 and all(calls)  # warmup + repeats, all under inference_mode
    assert t.repeats == 7 and t.batch_size == 4 and len(t.times_ms) == 7
    assert 0.0 <= t.min_ms <= t.median_ms <= t.max_ms and t.min_ms <= t.mean_ms <= t.max_ms
    assert t.iqr_ms >= 0.0 and t.images_per_s > 0


def test_time_callable_measures_wall_time() -> None:
    t = time_callable(lambda: time.sleep(0.002), device="cpu", warmup=0, repeats=3)
    assert 1.9 <= t.median_ms < 200


def test_timing_statistics_and_throughput() -> None:
    t = Timing.from_times([4.0, 1.0, 2.0, 3.0, 100.0], batch_size=8)
    assert (t.median_ms, t.min_ms, t.max_ms, t.mean_ms) == (3.0, 1.0, 100.0, 22.0)
    assert t.iqr_ms == pytest.approx(2.0)
    assert t.images_per_s == pytest.approx(8 / 0.003)
    assert Timing(0.0, 0.0, 0.0, 0.0, 0.0, 1, 1).images_per_s == float("inf")


def test_time_callable_rejects_bad_counts() -> None:
    with pytest.raises(ValueError, match="repeats"):
        time_callable(lambda: None, device=CPU, repeats=0)
    with pytest.raises(ValueError, match="warmup"):
        time_callable(lambda: None, device=CPU, warmup=-1)


def test_measure_model_random_and_given_inputs() -> None:
    seen: list[tuple[int, ...]] = []

    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(tuple(x.shape))
            return self.lin(x.mean((2, 3)).repeat(1, 3)[:, :8])

    model = Probe().eval()
    t = measure_model(model, device=CPU, batch_size=5, input_size=(3, 8, 8), warmup=1, repeats=2)
    assert t.batch_size == 5 and t.repeats == 2 and seen == [(5, 3, 8, 8)] * 3
    seen.clear()
    t = measure_model(model, device="cpu", inputs=torch.zeros(3, 3, 4, 4), warmup=0, repeats=2)
    assert t.batch_size == 3 and seen == [(3, 3, 4, 4)] * 2


def test_parse_device_cpu_and_unknown() -> None:
    assert parse_device("cpu") == CPU and parse_device(" CPU ") == CPU and parse_device(CPU) == CPU
    for bad in ("gpu", "cpu:0", "cuda:x", "cuda0", "", "mps"):
        with pytest.raises(ValueError, match="unknown device .* use --device cpu, cuda or cuda:N"):
            parse_device(bad)


def test_parse_device_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for spec in ("cuda", "cuda:0"):
        with pytest.raises(ValueError, match=r"CUDA requested \(--device cuda.*\) but no CUDA device is visible — use --device cpu"):
            parse_device(spec)


def test_parse_device_cuda_index_range(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert parse_device("cuda:1") == torch.device("cuda", 1)
    assert parse_device("cuda") == torch.device("cuda", 0)
    with pytest.raises(ValueError, match=r"CUDA device 2 requested .* only 2 visible"):
        parse_device("cuda:2")


def test_set_cpu_threads() -> None:
    before = torch.get_num_threads()
    try:
        set_cpu_threads(None)
        assert torch.get_num_threads() == before
        set_cpu_threads(1)
        assert torch.get_num_threads() == 1
        for bad in (0, -1):
            with pytest.raises(ValueError, match="--threads"):
                set_cpu_threads(bad)
    finally:
        torch.set_num_threads(before)


def test_time_rounds_interleaves_and_honours_per_piece_counts() -> None:
    """One run of every piece per round (round-robin, the order rotating from round to round), each
    after its own warm-up, for its own number of rounds; with a time limit, rounds go on until the
    medians are stable."""
    from rapid_search.tools.measure import time_rounds

    calls: list[str] = []
    runs = {k: (lambda k=k: calls.append(k)) for k in "abc"}
    out = time_rounds(runs, device=CPU, repeats={"a": 3, "b": 1, "c": 2}, warmup={"a": 1, "b": 0, "c": 2}, batch_size=4)
    assert calls == ["a", "a", "b", "c", "c", "c", "c", "a", "a"]  # rounds a b c, (b) c a, (c) a: b and c are done
    assert {k: t.repeats for k, t in out.items()} == {"a": 3, "b": 1, "c": 2} and out["a"].batch_size == 4
    rounds: list[str] = []
    slow = time_rounds({"x": lambda: time.sleep(0.001)}, device=CPU, repeats=2, time_limit=0.05, stable=0.0, log=rounds.append)
    assert slow["x"].repeats > 2 and len(rounds) == slow["x"].repeats  # unstable (stable=0): rounds until the time limit
    steady = time_rounds({"x": lambda: None}, device=CPU, repeats=3, time_limit=60, stable=float("inf"))
    assert steady["x"].repeats == 3  # stable at once: no extra rounds
    entered: list[str] = []

    @contextlib.contextmanager
    def slow_setup():  # e.g. a schedule applied: around each run, never timed
        entered.append("setup")
        time.sleep(0.05)
        yield

    t = time_rounds({"x": lambda: entered.append("run")}, device=CPU, repeats=3, warmup=1, around={"x": slow_setup})
    assert entered == ["setup", "run", "run", "setup", "run", "setup", "run"] and t["x"].max_ms < 40
    calls.clear()
    time_rounds(runs, device=CPU, repeats=3)
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # each piece first once, last once
    with pytest.raises(ValueError, match="repeats >= 1"):
        time_rounds(runs, device=CPU, repeats=0)
