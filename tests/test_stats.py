"""Paired statistics on known inputs (rapid_search.tools.stats)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rapid_search.tools.stats import compare_paired, mcnemar_exact, mcnemar_exact_from_counts, paired_bootstrap_ci


def _pairs(b: int, c: int, both: int = 0, neither: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Correctness vectors with b images only A gets right, c only B, and concordant ones."""
    a = np.array([1] * b + [0] * c + [1] * both + [0] * neither, dtype=bool)
    bb = np.array([0] * b + [1] * c + [1] * both + [0] * neither, dtype=bool)
    return a, bb


def test_mcnemar_b10_c2_matches_hand_computed_binomial() -> None:
    # n = 12 discordant pairs; P[X <= 2] = (C(12,0) + C(12,1) + C(12,2)) / 2^12 = 79 / 4096
    expected = 2 * 79 / 4096
    assert mcnemar_exact_from_counts(10, 2).p_value == pytest.approx(expected, abs=1e-15)
    a, b = _pairs(10, 2, both=80, neither=8)
    res = mcnemar_exact(a, b)
    assert (res.b, res.c) == (10, 2)
    assert res.p_value == pytest.approx(0.03857421875, abs=1e-15)
    assert mcnemar_exact(b, a).p_value == res.p_value  # symmetric


def test_mcnemar_edge_cases() -> None:
    assert mcnemar_exact_from_counts(0, 0).p_value == 1.0
    assert mcnemar_exact_from_counts(5, 5).p_value == 1.0  # capped at 1
    assert mcnemar_exact_from_counts(6, 0).p_value == pytest.approx(2 / 64)
    # large counts stay finite and exact enough
    p = mcnemar_exact_from_counts(300, 200).p_value
    assert 0 < p < 1e-4 and math.isfinite(p)
    with pytest.raises(ValueError):
        mcnemar_exact_from_counts(-1, 2)


def test_bootstrap_ci_known_inputs() -> None:
    # identical methods: every resample has difference 0
    a = np.array([1, 0, 1, 1, 0] * 20, dtype=bool)
    assert paired_bootstrap_ci(a, a, n_boot=500) == (0.0, 0.0)
    # A always right, B always wrong: difference exactly 1
    assert paired_bootstrap_ci(np.ones(50), np.zeros(50), n_boot=200) == (1.0, 1.0)
    # b=10, c=2 on 100 images: diff 0.08, CI roughly 0.08 +- 1.96 * sqrt((12/100 - 0.08^2) / 100)
    x, y = _pairs(10, 2, both=80, neither=8)
    lo, hi = paired_bootstrap_ci(x, y, n_boot=20_000, seed=1)
    se = math.sqrt((12 / 100 - 0.08**2) / 100)
    assert lo == pytest.approx(0.08 - 1.96 * se, abs=0.012)
    assert hi == pytest.approx(0.08 + 1.96 * se, abs=0.012)
    assert lo <= 0.08 <= hi


def test_bootstrap_is_seeded_and_chunk_independent() -> None:
    rng = np.random.default_rng(3)
    a, b = rng.random(300) < 0.7, rng.random(300) < 0.65
    first = paired_bootstrap_ci(a, b, n_boot=2_000, seed=7)
    assert paired_bootstrap_ci(a, b, n_boot=2_000, seed=7) == first
    assert paired_bootstrap_ci(a, b, n_boot=2_000, seed=7, chunk=2_000) == first
    assert paired_bootstrap_ci(a, b, n_boot=2_000, seed=8) != first


def test_compare_paired_summary() -> None:
    x, y = _pairs(10, 2, both=80, neither=8)
    c = compare_paired(x, y, n_boot=2_000)
    assert c.n == 100 and c.acc_a == pytest.approx(0.9) and c.acc_b == pytest.approx(0.82)
    assert c.diff == pytest.approx(0.08)
    assert c.significant and c.p_value == pytest.approx(0.03857421875)
    assert c.ci_low <= c.diff <= c.ci_high
    d = c.to_dict()
    assert d["b"] == 10 and d["c"] == 2 and d["confidence"] == 0.95
    same = compare_paired(x, x, n_boot=100)
    assert not same.significant and same.p_value == 1.0


def test_inputs_are_checked() -> None:
    with pytest.raises(ValueError, match="same images"):
        mcnemar_exact(np.ones(3, bool), np.ones(4, bool))
    with pytest.raises(ValueError, match="0/1"):
        mcnemar_exact(np.array([0, 2]), np.array([0, 1]))
    with pytest.raises(ValueError, match="1-D"):
        paired_bootstrap_ci(np.ones((2, 2)), np.ones((2, 2)))
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap_ci(np.ones(3), np.ones(3), confidence=1.5)
