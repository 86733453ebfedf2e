"""Evaluation of schedules: predictions, fidelity scores and executed cost.

Runtime-side (no optuna, no rich): used by the search to score trials on calibration images,
by ``rapid-search evaluate`` and by the benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from ..runtime.flops import ModelInfo, macs_from_counts, schedule_macs
from ..runtime.patch import applied, last_token_counts
from ..runtime.presets import as_schedule
from ..runtime.schedule import Schedule

__all__ = ["Predictions", "predict", "per_image_scores", "fidelity", "METRICS", "metric_value"]

#: Scores a trial can be ranked by (all "higher is better" as used by the search).
METRICS = ("top1", "agreement", "kl")


@dataclass
class Predictions:
    """Outputs of one model/schedule on a set of images.

    Attributes:
        logits: ``(N, K)`` float32 logits on the CPU.
        macs: ``(N,)`` float64 executed MACs per image (from the recorded token counts).
        counts: ``(N, depth + 1)`` tokens entering each block (and after the last).
        seconds: Wall time of the forward passes.
    """

    logits: torch.Tensor
    macs: torch.Tensor
    counts: torch.Tensor
    seconds: float


@torch.inference_mode()
def predict(
    model: nn.Module,
    images: torch.Tensor,
    schedule: Any = None,
    *,
    batch_size: int = 64,
    device: Optional[torch.device] = None,
    info: Optional[ModelInfo] = None,
) -> Predictions:
    """Run ``model`` under ``schedule`` on ``images`` ``(N, 3, H, W)``; returns logits and costs.

    The schedule is applied for the duration of the call and removed afterwards. Images are cast
    to the model's floating-point dtype (run a bfloat16 model with ``model.to(torch.bfloat16)``);
    logits come back in float32.
    """
    import time

    info = info or ModelInfo.from_model(model)
    sched: Schedule = as_schedule(schedule, info)
    param = next(model.parameters())
    device = device or param.device
    dtype = param.dtype if param.dtype.is_floating_point else torch.float32
    outs, counts = [], []
    t0 = time.perf_counter()
    with applied(model, sched):
        for i in range(0, len(images), batch_size):
            x = images[i : i + batch_size].to(device, dtype, non_blocking=True)
            outs.append(model(x).float().cpu())
            counts.append(last_token_counts(model))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    counts_t = torch.cat(counts) if counts else torch.zeros(0, info.depth + 1, dtype=torch.long)
    if sched.has_threshold:
        macs = macs_from_counts(info, sched, counts_t)
    else:
        macs = torch.full((len(counts_t),), float(schedule_macs(info, sched)), dtype=torch.float64)
    logits = torch.cat(outs) if outs else torch.zeros(0)
    return Predictions(logits=logits, macs=macs, counts=counts_t, seconds=seconds)


def per_image_scores(logits: torch.Tensor, base_logits: torch.Tensor, labels: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """Per-image scores of reduced-model ``logits`` against the unreduced model (and labels).

    Args:
        logits: ``(N, K)`` reduced-model logits.
        base_logits: ``(N, K)`` unreduced-model logits on the same images.
        labels: ``(N,)`` ImageNet indices, or None for unlabelled images.

    Returns:
        ``(N,)`` float64 tensors: ``agreement`` (1 where the top-1 equals the unreduced model's),
        ``kl`` (KL(p_base || p)) and, with labels, ``top1`` (1 where correct).
    """
    logp = torch.log_softmax(logits.double(), dim=-1)  # (N, K)
    logq = torch.log_softmax(base_logits.double(), dim=-1)  # (N, K)
    pred = logits.argmax(-1)  # (N,)
    out = {
        "agreement": (pred == base_logits.argmax(-1)).double(),  # (N,)
        "kl": (logq.exp() * (logq - logp)).sum(-1),  # (N,)
    }
    if labels is not None:
        out["top1"] = (pred == labels).double()  # (N,)
    return out


def fidelity(logits: torch.Tensor, base_logits: torch.Tensor, labels: Optional[torch.Tensor] = None) -> dict[str, float]:
    """Scores of reduced-model ``logits`` against the unreduced model (and labels, if any): the
    means of :func:`per_image_scores` over the images.

    Args:
        logits: ``(N, K)`` reduced-model logits.
        base_logits: ``(N, K)`` unreduced-model logits on the same images.
        labels: ``(N,)`` ImageNet indices, or None for unlabelled images.

    Returns:
        ``agreement`` (top-1 equal to the unreduced model's), ``kl`` (mean KL(p_base || p)) and,
        with labels, ``top1``.
    """
    return {k: float(v.mean()) for k, v in per_image_scores(logits, base_logits, labels).items()}


def metric_value(scores: dict[str, float], metric: str) -> float:
    """The value a search maximises for ``metric`` (``kl`` is negated)."""
    if metric == "kl":
        return -scores["kl"]
    return scores[metric]
