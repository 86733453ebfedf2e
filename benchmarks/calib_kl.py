"""Calibration-image scaffolding shared by the lever scripts (``handset_structure.py``, ``free_counts.py``).

One model, its calibration images, the unreduced model's logits, and a fixed split of the images: every
third image is the *check* part (never used to choose), the other two thirds the *search* part. A
schedule is scored by the search's own score, the mean KL divergence from the unreduced predictions,
on all images and on each part (so how much of a difference is noise shows beside it).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

import torch

from rapid_search.runtime.flops import ModelInfo
from rapid_search.runtime.presets import model_info
from rapid_search.runtime.schedule import Schedule
from rapid_search.tools.data import load_images
from rapid_search.tools.evaluate import per_image_scores, predict
from rapid_search.tools.loading import load_model


def add_arguments(ap: argparse.ArgumentParser, *, model: str = "vit_tiny_patch16_224") -> None:
    """``--model``, ``--data``, ``--images`` and ``--threads``, as every lever script takes them."""
    ap.add_argument("--model", default=model)
    ap.add_argument("--data", default=os.path.join(os.environ.get("RAPID_SHARED", "../shared"), "data/imagenet-calib"))
    ap.add_argument("--images", type=int, default=750)
    ap.add_argument("--threads", type=int, default=2)


@dataclass
class Scores:
    """Mean KL of one schedule on all images, the search part and the check part, and its top-1."""

    all: float
    search: float
    check: float
    top1: float


@dataclass
class CalibKL:
    """A model with its calibration images and unreduced logits (see the module docstring)."""

    name: str
    model: torch.nn.Module
    info: ModelInfo
    images: torch.Tensor  # (n, 3, H, W)
    labels: torch.Tensor  # (n,)
    base: torch.Tensor  # (n, 1000) unreduced logits
    check: torch.Tensor  # (n,) bool: every third image

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "CalibKL":
        """Load what :func:`add_arguments` names (sets the torch threads)."""
        torch.set_num_threads(args.threads)
        model = load_model(args.model)
        X = load_images(args.data, model=model, limit=args.images, seed=0)
        base = predict(model, X.images, batch_size=50).logits  # (n, 1000)
        check = torch.arange(len(X.images)) % 3 == 2  # (n,)
        return cls(args.model, model, model_info(model), X.images, X.labels, base, check)

    def score(self, schedule: Schedule) -> Scores:
        """Scores of ``schedule`` (forwards every image once)."""
        d = per_image_scores(predict(self.model, self.images, schedule, batch_size=50, info=self.info).logits, self.base, self.labels)
        kl = d["kl"]  # (n,)
        return Scores(kl.mean().item(), kl[~self.check].mean().item(), kl[self.check].mean().item(), d["top1"].mean().item())

    def describe(self, data: str) -> str:
        return f"{self.name}: {len(self.images)} images of {data}: search part {int((~self.check).sum())}, check part {int(self.check.sum())}"
