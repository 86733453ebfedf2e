"""``rapid-search front``: a study's calibration front, as a table and a figure (PNG, PDF, SVG, ...).

The front is the set of finished trials that meet their budget and that no other such trial
beats at the same or a lower cost (non-dominated in (cost, calibration score)). Cost is the
measured GFLOPs per image (analytic MACs x 1e-9, threshold schedules by their executed mean),
or for a latency study the milliseconds per batch (timed on the device when the trial was, else predicted). The schedules ``rapid-search
export`` wrote from the study are marked (``export`` records them in the study).

Works on a study read from its storage only (no model, no images); matplotlib is imported when
the figure is drawn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

__all__ = ["FrontPoint", "study_points", "pareto_front", "front_table", "plot_front"]


@dataclass(frozen=True)
class FrontPoint:
    """One finished trial: its cost, its calibration score (higher is better: ``-KL`` for kl) and what it ran."""

    trial: int
    cost: float
    score: float
    method: str
    params: dict[str, Any] = field(default_factory=dict)


def study_points(study: Any) -> tuple[list[FrontPoint], str, str]:
    """``(points, unit, metric)``: every finished trial of ``study`` that meets its budget.

    ``unit`` is ``"GFLOPs"`` or ``"ms"`` (a latency study: latency per batch, timed or predicted).
    """
    from optuna.trial import TrialState

    setup = study.user_attrs.get("setup") or {}
    latency = "latency" in str(setup.get("budget", "")).lower() or str(setup.get("budget", "")).lower().endswith("ms")
    key, unit = ("predicted_ms", "ms") if latency else ("gflops", "GFLOPs")
    points = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        a = t.user_attrs
        if t.value is None or key not in a or "schedule" not in a or any(v > 0 for v in t.constraints.values()):
            continue
        method = a.get("warm_start") or "rapid-search"
        cost = a.get("measured_ms", a[key]) if latency else a[key]
        points.append(FrontPoint(t.number, float(cost), float(a.get("score", t.value)), method, dict(t.params)))
    return points, unit, str(setup.get("metric", "kl"))


def pareto_front(points: Sequence[FrontPoint]) -> list[FrontPoint]:
    """The non-dominated points, cheapest first: each scores higher than every cheaper one."""
    front: list[FrontPoint] = []
    for p in sorted(points, key=lambda p: (p.cost, -p.score, p.trial)):
        if not front or p.score > front[-1].score:  # a tie in cost: the higher score came first
            front.append(p)
    return front


def _shown(score: float, metric: str) -> float:
    """The score as people read it: KL itself (lower is better), agreement / top-1 as fractions."""
    return -score if metric == "kl" else score


def _params(p: FrontPoint) -> str:
    if not p.params:
        return p.method
    return p.method + " " + " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(p.params.items()))


def front_table(front: Sequence[FrontPoint], *, unit: str, metric: str, n_points: int) -> list[str]:
    """Lines of the table printed by ``rapid-search front``."""
    name = {"kl": "KL (lower is better)", "agreement": "agreement", "top1": "top-1"}.get(metric, metric)
    lines = [f"calibration front: {len(front)} of {n_points} finished trials; score = calibration {name}",
             f"{unit:>9s}  {'score':>9s}  {'trial':>5s}  schedule"]
    for p in front:
        lines.append(f"{p.cost:9.4f}  {_shown(p.score, metric):9.5f}  {p.trial:5d}  {_params(p)}")
    return lines


def plot_front(
    points: Sequence[FrontPoint],
    front: Sequence[FrontPoint],
    exports: Sequence[dict[str, Any]],
    out: Union[str, Path],
    *,
    unit: str,
    metric: str,
    title: str,
    dpi: int = 130,
) -> Path:
    """Draw score against cost (all trials faint, the front as a step line, exports marked) to ``out``
    (atomically, in the format of its ending: .png, .pdf, .svg, ...)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..outputs import save_figure

    fig, ax = plt.subplots(figsize=(7.0, 4.6))
    ax.scatter([p.cost for p in points], [_shown(p.score, metric) for p in points], s=14, color="0.6", alpha=0.45, label="finished trials")
    if front:
        ax.step([p.cost for p in front], [_shown(p.score, metric) for p in front], where="post", color="#d62728", lw=1.8, marker="o", ms=4, label="front")
    by_trial = {p.trial: p for p in points}
    marked = [(e, by_trial[e["trial"]]) for e in exports if isinstance(e, dict) and e.get("trial") in by_trial]
    for i, (e, p) in enumerate(marked):
        ax.scatter([p.cost], [_shown(p.score, metric)], s=90, marker="*", color="#ff7f0e", edgecolor="k", zorder=5, label="exported" if i == 0 else None)
        ax.annotate(str(e.get("budget", "")), (p.cost, _shown(p.score, metric)), textcoords="offset points", xytext=(5, 6), fontsize=8)
    ax.set_xlabel("GFLOPs per image (measured MACs x 1e-9)" if unit == "GFLOPs" else "predicted latency per batch (ms)")
    ax.set_ylabel({"kl": "calibration KL to the unreduced model (lower is better)", "agreement": "calibration agreement", "top1": "calibration top-1"}.get(metric, metric))
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        return save_figure(fig, out, dpi=dpi)
    finally:
        plt.close(fig)
