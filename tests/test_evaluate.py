"""Fidelity scores: per image, and their means as the search ranks trials."""

from __future__ import annotations

import math

import pytest
import torch

from rapid_search.tools.evaluate import fidelity, metric_value, per_image_scores


def test_per_image_scores_by_hand():
    base = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # (3, 2)
    red = torch.tensor([[2.0, 0.0], [1.0, 0.0], [3.0, 0.0]])  # (3, 2): same, flipped, sharper
    labels = torch.tensor([0, 0, 1])
    s = per_image_scores(red, base, labels)
    assert s["agreement"].tolist() == [1.0, 0.0, 1.0]  # base argmax of a tie is index 0
    assert s["top1"].tolist() == [1.0, 1.0, 0.0]
    q = torch.softmax(base.double(), -1)
    p = torch.softmax(red.double(), -1)
    kl = (q * (q.log() - p.log())).sum(-1)  # KL(p_base || p) per image
    torch.testing.assert_close(s["kl"], kl)
    assert s["kl"][0] == 0 and (s["kl"][1:] > 0).all()
    assert "top1" not in per_image_scores(red, base)  # unlabelled


def test_fidelity_is_the_mean_of_per_image_scores():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(40, 7, generator=g), torch.randn(40, 7, generator=g)
    labels = torch.randint(0, 7, (40,), generator=g)
    f = fidelity(a, b, labels)
    for k, v in per_image_scores(a, b, labels).items():
        assert f[k] == pytest.approx(float(v.mean()), abs=1e-12)
    assert metric_value(f, "kl") == -f["kl"] and metric_value(f, "top1") == f["top1"]
    same = fidelity(a, a, labels)
    assert same["agreement"] == 1.0 and math.isclose(same["kl"], 0.0, abs_tol=1e-12)
