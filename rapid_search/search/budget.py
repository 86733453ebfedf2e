"""Budget grammar: what ``--budget`` accepts and how it becomes a target.

Accepted forms (the unit is case-insensitive; spaces are allowed around the text and between the
number or ``%`` and the unit, but ``%`` must follow the number directly):

===============  ============================================================================
``50%GFLOPs``    relative: a fraction of the unreduced model's analytic GFLOPs (``37.5%GFLOPs``)
``0.6GFLOPs``    absolute GFLOPs (MACs x 1e-9) per image
``60%latency``   relative: a fraction of the unreduced model's measured latency per batch
``12ms``         absolute latency in milliseconds per batch
``35%..70%GFLOPs``  a range (any form, both ends in one unit): one study for every budget in it
===============  ============================================================================

Example:
    >>> from rapid_search.search.budget import resolve
    >>> resolve("50%GFLOPs", base_gflops=1.2)
    0.6
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Any, Mapping, Optional, Union

from ..runtime.schedule import Budget
from ..errors import RapidSearchError

__all__ = ["BudgetError", "BudgetSpec", "Target", "ACCEPTED_FORMS", "parse_budget", "resolve"]

#: The accepted forms, as listed in every grammar error.
ACCEPTED_FORMS = "50%GFLOPs (of the unreduced model), 0.6GFLOPs, 60%latency (of the unreduced model) or 12ms (per batch)"

_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)"
_RELATIVE = re.compile(rf"^({_NUMBER})%\s*(gflops|latency)$", re.IGNORECASE)
_ABSOLUTE = re.compile(rf"^({_NUMBER})\s*(gflops|ms)$", re.IGNORECASE)
_EXAMPLES = {("gflops", True): "50%GFLOPs", ("gflops", False): "0.6GFLOPs", ("latency", True): "60%latency", ("latency", False): "12ms"}


class BudgetError(RapidSearchError, ValueError):
    """A budget that cannot be parsed or reached; the message lists the accepted forms or the fix."""


@dataclass(frozen=True)
class BudgetSpec:
    """A parsed budget.

    Attributes:
        kind: ``"gflops"`` or ``"latency"``.
        value: A fraction of the unreduced model (``relative``: ``50%`` -> ``0.5``), else GFLOPs per
            image or ms per batch.
        relative: Whether ``value`` is a fraction of the unreduced model.
        text: The budget as given (surrounding spaces removed), e.g. ``"50%GFLOPs"``.
        lo: A range's low end, in the unit of ``value`` (its high end); None for one budget.
    """

    kind: str
    value: float
    relative: bool
    text: str
    lo: Optional[float] = None

    @property
    def canonical(self) -> str:
        """The budget in its canonical spelling, e.g. ``"50%GFLOPs"``, ``"0.6GFLOPs"``, ``"12ms"``, ``"35%..70%GFLOPs"``."""
        num = lambda v: _plain(v * 100) + "%" if self.relative else _plain(v)  # noqa: E731
        unit = "GFLOPs" if self.kind == "gflops" else "latency" if self.relative else "ms"
        return ("" if self.lo is None else num(self.lo) + "..") + num(self.value) + unit

    def ends(self) -> tuple["BudgetSpec", "BudgetSpec"]:
        """A range's low and high ends as single budgets (a single budget: itself twice)."""
        one = lambda v: parse_budget(replace(self, value=v, lo=None).canonical)  # noqa: E731
        return (self, self) if self.lo is None else (one(self.lo), one(self.value))


def _plain(x: float) -> str:
    """``x`` as the grammar reads it back to the same value (``37.123456789``, ``0.00001``; not :g's ``1e-05``)."""
    return f"{x:.10f}".rstrip("0").rstrip(".")


def _grammar_error(text: Any) -> BudgetError:
    return BudgetError(f"budget {text!r} is not understood — use one of: {ACCEPTED_FORMS}")


def parse_budget(text: Any) -> BudgetSpec:
    """Parse a budget string (one of the module docstring's forms).

    Raises:
        BudgetError: Not one of the accepted forms; zero or negative; a relative budget at or above 100%.
    """
    if not isinstance(text, str):
        raise _grammar_error(text)
    s = text.strip()
    if ".." in s:  # a range: each end parsed (and checked) as one budget, the unit written once or twice
        a, b = s.split("..", 1)
        if ".." in b:
            raise _grammar_error(text)
        unit = re.search(r"(gflops|latency|ms)$", b.strip(), re.IGNORECASE)
        lo = parse_budget(a if re.search(r"[a-z]\s*$", a, re.IGNORECASE) or unit is None else a + unit.group(1))
        hi = parse_budget(b)
        if (lo.kind, lo.relative) != (hi.kind, hi.relative):
            raise BudgetError(f"budget range {s!r} mixes units ({lo.canonical} and {hi.canonical}) — give both ends in one, e.g. 35%..70%GFLOPs")
        if lo.value >= hi.value:
            raise BudgetError(f"budget range {s!r} must go from low to high — use e.g. 35%..70%GFLOPs")
        return replace(hi, text=s, lo=lo.value)
    m = _RELATIVE.match(s)
    relative = m is not None
    m = m or _ABSOLUTE.match(s)
    if m is None:
        raise _grammar_error(text)
    number, unit = float(m.group(1)), m.group(2).lower()
    kind = "gflops" if unit == "gflops" else "latency"
    example = _EXAMPLES[kind, relative]
    if not math.isfinite(number) or number <= 0:
        raise BudgetError(f"budget {s!r} must be positive — use e.g. {example}")
    if relative and number >= 100:
        raise BudgetError(f"budget {s!r}: a budget at or above 100% reduces nothing — use e.g. {example}")
    return BudgetSpec(kind=kind, value=number / 100.0 if relative else number, relative=relative, text=s)


def resolve(spec: Union[BudgetSpec, str], *, base_gflops: float, base_latency_ms: Optional[float] = None) -> float:
    """The target in absolute units: GFLOPs per image (``base_gflops``: the unreduced model's,
    ``ModelInfo.base_gflops``) or ms per batch (``base_latency_ms``: the unreduced model's measured
    latency; required for ``%latency``, checked against for ``ms``).

    Raises:
        BudgetError: The target is at or above the unreduced model's cost (it reduces nothing), or
            a relative latency budget lacks ``base_latency_ms``.
    """
    if isinstance(spec, str):
        spec = parse_budget(spec)
    if not (isinstance(base_gflops, (int, float)) and math.isfinite(base_gflops) and base_gflops > 0):
        raise BudgetError(f"base_gflops = {base_gflops!r} must be the unreduced model's positive GFLOPs (ModelInfo.base_gflops)")
    latency = spec.kind == "latency"
    if latency and base_latency_ms is not None and not (math.isfinite(base_latency_ms) and base_latency_ms > 0):
        raise BudgetError(f"base_latency_ms = {base_latency_ms!r} must be the unreduced model's positive measured latency")
    if latency and spec.relative and base_latency_ms is None:
        raise BudgetError(
            f"budget {spec.text!r} is relative to the unreduced latency — pass base_latency_ms "
            "(measure it with rapid_search.tools.latency.measure_schedule_ms(model, None, ...))"
        )
    base = base_latency_ms if latency else base_gflops
    if spec.relative:
        return spec.value * base
    if base is not None and spec.value >= base:  # an absolute latency is checked only against a measurement
        what, less = (f"measured {base:.4g} ms", f"{base * 0.6:.3g}ms") if latency else (f"{base:.4g} GFLOPs", f"{base * 0.5:.3g}GFLOPs")
        raise BudgetError(f"budget {spec.text!r} is at or above the unreduced model's {what}, so it reduces nothing — use less, e.g. {less} or {_EXAMPLES[spec.kind, True]}")
    return spec.value


@dataclass(frozen=True)
class Target:
    """A resolved budget, the one object the search passes along (no unit changed by hand).

    Attributes:
        spec: The parsed budget.
        value: The target in the budget's unit: GFLOPs per image or ms per batch (a range: its high end).
        lo: A range's low end in the same unit; None for one budget.
    """

    spec: BudgetSpec
    value: float
    lo: Optional[float] = None

    @classmethod
    def of(cls, spec: BudgetSpec, **bases: Any) -> "Target":
        """Resolve ``spec`` (both ends of a range) with :func:`resolve`'s ``base_gflops`` / ``base_latency_ms``."""
        lo, hi = spec.ends()
        return cls(spec, resolve(hi, **bases), None if spec.lo is None else resolve(lo, **bases))

    def _cost(self, v: float) -> float:
        return v * 1e9 if self.spec.kind == "gflops" else v

    @property
    def cost(self) -> float:
        """The target in the units of the search's cost model: MACs (GFLOPs budgets) or ms."""
        return self._cost(self.value)

    @property
    def lo_cost(self) -> Optional[float]:
        """A range's low end in the units of the cost model (None for one budget)."""
        return None if self.lo is None else self._cost(self.lo)

    def budget(self, achieved: Optional[Mapping[str, Any]] = None, digits: int = 6) -> Budget:
        """The :class:`rapid_search.runtime.schedule.Budget` recorded in an exported schedule (a range:
        its high end), in the canonical spelling, floats rounded to ``digits``."""
        ach = {k: (round(v, digits) if isinstance(v, float) else v) for k, v in (achieved or {}).items()}
        return Budget(spec=self.spec.ends()[1].canonical, kind=self.spec.kind, target=round(float(self.value), digits), achieved=ach)
