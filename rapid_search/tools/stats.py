"""Paired statistics for comparing two classifiers on the same images.

With a few hundred evaluation images, a top-1 difference of one or two points can be noise. Both
tests here are *paired*: they use that the two methods saw the same images, which is far more
sensitive than comparing two independent accuracies.

* :func:`mcnemar_exact` — exact (binomial) McNemar test on the discordant pairs.
* :func:`paired_bootstrap_ci` — percentile bootstrap confidence interval of the accuracy
  difference, resampling images (seeded, numpy only).
* :func:`compare_paired` — both at once, as a :class:`PairedComparison`.

Example:
    >>> import numpy as np
    >>> a = np.array([1] * 10 + [0] * 2 + [1] * 88, dtype=bool)
    >>> b = np.array([0] * 10 + [1] * 2 + [1] * 88, dtype=bool)
    >>> round(mcnemar_exact(a, b).p_value, 5)
    0.03857
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "McNemarResult",
    "PairedComparison",
    "mcnemar_exact",
    "mcnemar_exact_from_counts",
    "paired_bootstrap_ci",
    "compare_paired",
]

ArrayLike = npt.ArrayLike
BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class McNemarResult:
    """Exact McNemar test.

    Attributes:
        b: Images method A gets right and method B gets wrong.
        c: Images method A gets wrong and method B gets right.
        p_value: Two-sided exact p-value, ``min(1, 2 * P[X <= min(b, c)])`` with
            ``X ~ Binomial(b + c, 1/2)``; 1.0 when there are no discordant pairs.
    """

    b: int
    c: int
    p_value: float


@dataclass(frozen=True)
class PairedComparison:
    """Paired comparison of method A against method B on the same ``n`` images.

    Attributes:
        n: Number of images.
        acc_a: Top-1 of A (fraction).
        acc_b: Top-1 of B (fraction).
        diff: ``acc_a - acc_b`` (fraction).
        ci_low: Lower end of the bootstrap confidence interval of ``diff``.
        ci_high: Upper end of the bootstrap confidence interval of ``diff``.
        confidence: Confidence level of the interval (e.g. 0.95).
        b: Images only A gets right.
        c: Images only B gets right.
        p_value: Exact McNemar p-value.
        significant: ``p_value < 1 - confidence`` (the difference is unlikely to be noise).
        n_boot: Bootstrap resamples.
        seed: Seed of the bootstrap generator.
    """

    n: int
    acc_a: float
    acc_b: float
    diff: float
    ci_low: float
    ci_high: float
    confidence: float
    b: int
    c: int
    p_value: float
    significant: bool
    n_boot: int
    seed: int

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable fields."""
        return asdict(self)


def _as_bool(x: ArrayLike, name: str) -> BoolArray:
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D per-image correctness vector, got shape {arr.shape} — pass one entry per image")
    if arr.dtype != np.bool_:
        if not np.isin(arr, (0, 1)).all():
            raise ValueError(f"{name} must hold 0/1 or bools (correct per image) — convert predictions with (pred == label)")
        arr = arr.astype(bool)
    return arr


def _pair(a: ArrayLike, b: ArrayLike) -> tuple[BoolArray, BoolArray]:
    x, y = _as_bool(a, "a"), _as_bool(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"a and b cover different images ({x.shape[0]} vs {y.shape[0]}) — evaluate both on the same images")
    return x, y


def mcnemar_exact_from_counts(b: int, c: int) -> McNemarResult:
    """Exact two-sided McNemar test from the discordant counts.

    Args:
        b: Pairs where only the first method is correct.
        c: Pairs where only the second method is correct.

    Returns:
        :class:`McNemarResult` with ``p = min(1, 2 * sum_{k <= min(b, c)} C(b + c, k) / 2^(b + c))``.

    Example:
        >>> round(mcnemar_exact_from_counts(10, 2).p_value, 6)  # 2 * (1 + 12 + 66) / 4096
        0.038574
    """
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return McNemarResult(b=int(b), c=int(c), p_value=1.0)
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1))  # exact integer arithmetic
    p = min(1.0, 2 * tail / 2**n)  # int / int: correctly rounded float even for large n
    return McNemarResult(b=int(b), c=int(c), p_value=float(p))


def mcnemar_exact(a: ArrayLike, b: ArrayLike) -> McNemarResult:
    """Exact McNemar test on two per-image correctness vectors.

    Args:
        a: ``(n,)`` bool (or 0/1): method A correct on image i.
        b: ``(n,)`` bool (or 0/1): method B correct on image i, same images in the same order.

    Returns:
        :class:`McNemarResult`.
    """
    x, y = _pair(a, b)
    return mcnemar_exact_from_counts(int((x & ~y).sum()), int((~x & y).sum()))


def paired_bootstrap_ci(
    a: ArrayLike,
    b: ArrayLike,
    *,
    n_boot: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
    chunk: int = 1_000,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of ``mean(a) - mean(b)``, resampling images.

    Each resample draws ``n`` image indices with replacement (the same indices for A and B, so
    the pairing is kept) from ``numpy.random.default_rng(seed)``; the result is a pure function
    of the inputs and ``seed``.

    Args:
        a: ``(n,)`` bool (or 0/1) correctness of method A.
        b: ``(n,)`` bool (or 0/1) correctness of method B on the same images.
        n_boot: Number of resamples.
        confidence: Two-sided confidence level in (0, 1).
        seed: Seed of the generator.
        chunk: Resamples drawn at once (bounds memory to ``chunk * n`` indices).

    Returns:
        ``(low, high)`` as fractions (multiply by 100 for points).
    """
    x, y = _pair(a, b)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence = {confidence} must be in (0, 1), e.g. 0.95")
    if n_boot < 1:
        raise ValueError(f"n_boot = {n_boot} must be >= 1, e.g. 10000")
    n = x.shape[0]
    if n == 0:
        raise ValueError("no images to compare — evaluate on at least one image")
    d = x.astype(np.int8) - y.astype(np.int8)  # (n,) in {-1, 0, 1}
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot, dtype=np.float64)
    for start in range(0, n_boot, chunk):
        m = min(chunk, n_boot - start)
        idx = rng.integers(0, n, size=(m, n))  # (m, n)
        means[start : start + m] = d[idx].mean(axis=1, dtype=np.float64)
    alpha = 1.0 - confidence
    low, high = np.quantile(means, [alpha / 2, 1.0 - alpha / 2])
    return float(low), float(high)


def compare_paired(
    a: ArrayLike,
    b: ArrayLike,
    *,
    n_boot: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> PairedComparison:
    """McNemar p-value and bootstrap CI of the top-1 difference of A over B.

    Args:
        a: ``(n,)`` correctness of method A.
        b: ``(n,)`` correctness of method B on the same images.
        n_boot: Bootstrap resamples.
        confidence: Confidence level of the interval; the McNemar test uses ``1 - confidence``.
        seed: Bootstrap seed.

    Returns:
        :class:`PairedComparison`.
    """
    x, y = _pair(a, b)
    mc = mcnemar_exact(x, y)
    low, high = paired_bootstrap_ci(x, y, n_boot=n_boot, confidence=confidence, seed=seed)
    acc_a, acc_b = float(x.mean()), float(y.mean())
    return PairedComparison(
        n=int(x.shape[0]),
        acc_a=acc_a,
        acc_b=acc_b,
        diff=acc_a - acc_b,
        ci_low=low,
        ci_high=high,
        confidence=confidence,
        b=mc.b,
        c=mc.c,
        p_value=mc.p_value,
        significant=mc.p_value < 1.0 - confidence,
        n_boot=n_boot,
        seed=seed,
    )
