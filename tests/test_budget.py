"""Budget grammar: every accepted form, every rejection, resolution to absolute targets."""

from __future__ import annotations

import pytest

from rapid_search.runtime.schedule import Budget
from rapid_search.search.budget import BudgetError, BudgetSpec, Target, parse_budget, resolve


@pytest.mark.parametrize(
    "text, kind, value, relative",
    [
        ("50%GFLOPs", "gflops", 0.5, True),
        ("50%gflops", "gflops", 0.5, True),
        ("50%GFLOPS", "gflops", 0.5, True),
        ("37.5%GFLOPs", "gflops", 0.375, True),
        ("  50% GFLOPs  ", "gflops", 0.5, True),
        ("0.6GFLOPs", "gflops", 0.6, False),
        ("0.6 gflops", "gflops", 0.6, False),
        (".5GFLOPs", "gflops", 0.5, False),
        ("3GFLOPs", "gflops", 3.0, False),
        ("60%latency", "latency", 0.6, True),
        ("60% Latency", "latency", 0.6, True),
        ("12ms", "latency", 12.0, False),
        ("12.5 MS", "latency", 12.5, False),
    ],
)
def test_accepted_forms(text, kind, value, relative):
    spec = parse_budget(text)
    assert spec == BudgetSpec(kind=kind, value=pytest.approx(value), relative=relative, text=text.strip())


def test_canonical_spelling():
    assert parse_budget("50% gflops").canonical == "50%GFLOPs"
    assert parse_budget("0.6 gflops").canonical == "0.6GFLOPs"
    assert parse_budget("60%LATENCY").canonical == "60%latency"
    assert parse_budget("12 MS").canonical == "12ms"


@pytest.mark.parametrize("text", ["100%GFLOPs", "120%latency", "100.0%gflops"])
def test_rejects_relative_at_or_above_100(text):
    with pytest.raises(BudgetError, match="at or above 100% reduces nothing — use e.g."):
        parse_budget(text)


@pytest.mark.parametrize("text", ["-5ms", "0ms", "0%GFLOPs", "-0.6GFLOPs"])
def test_rejects_zero_and_negative(text):
    with pytest.raises(BudgetError, match="must be positive — use e.g."):
        parse_budget(text)


@pytest.mark.parametrize(
    "text",
    ["50%", "abc", "50 %gflops", "0.5", "", "   ", None, 50, 0.5, "50%ms", "5latency", "nan ms", "inf GFLOPs", "1e3ms", "50%%GFLOPs", "50%GFLOPs extra"],
)
def test_rejects_everything_else_with_the_accepted_forms(text):
    with pytest.raises(BudgetError) as e:
        parse_budget(text)
    msg = str(e.value)
    assert "\n" not in msg
    for form in ("50%GFLOPs", "0.6GFLOPs", "60%latency", "12ms"):
        assert form in msg


def test_budget_error_is_a_value_error():
    assert issubclass(BudgetError, ValueError)


def test_resolve_gflops():
    assert resolve(parse_budget("50%GFLOPs"), base_gflops=1.26) == pytest.approx(0.63)
    assert resolve("0.6GFLOPs", base_gflops=1.26) == pytest.approx(0.6)
    with pytest.raises(BudgetError, match="reduces nothing"):
        resolve("1.3GFLOPs", base_gflops=1.26)
    with pytest.raises(BudgetError, match="reduces nothing"):
        resolve("1.26GFLOPs", base_gflops=1.26)
    with pytest.raises(BudgetError, match="base_gflops"):
        resolve("50%GFLOPs", base_gflops=0.0)


def test_resolve_latency():
    assert resolve("60%latency", base_gflops=1.26, base_latency_ms=20.0) == pytest.approx(12.0)
    assert resolve("12ms", base_gflops=1.26, base_latency_ms=20.0) == pytest.approx(12.0)
    assert resolve("12ms", base_gflops=1.26) == pytest.approx(12.0)  # unchecked without a measurement
    with pytest.raises(BudgetError, match="pass base_latency_ms"):
        resolve("60%latency", base_gflops=1.26)
    with pytest.raises(BudgetError, match="reduces nothing"):
        resolve("25ms", base_gflops=1.26, base_latency_ms=20.0)


def test_target_budget():
    b = Target.of(parse_budget(" 50% gflops "), base_gflops=1.2544).budget({"gflops": 0.62712345678, "ratio": 0.4999})
    assert isinstance(b, Budget)
    assert b == Budget(spec="50%GFLOPs", kind="gflops", target=0.6272, achieved={"gflops": 0.627123, "ratio": 0.4999})
    b = Target.of(parse_budget("12ms"), base_gflops=1.26).budget({"latency_ms": 11.5})
    assert (b.spec, b.kind, b.target, b.achieved) == ("12ms", "latency", 12.0, {"latency_ms": 11.5})
    b = Target.of(parse_budget("35%..70%GFLOPs"), base_gflops=1.0).budget()
    assert (b.spec, b.target) == ("70%GFLOPs", 0.7)
