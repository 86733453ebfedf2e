"""Reduced precision with real weights: pretrained DeiT-Tiny in bfloat16 on the 500 ImageNet
evaluation images in ../shared, against float32 with the same schedule."""

from __future__ import annotations

import pytest
import torch
from test_real import EVAL, _load_model, pytestmark  # noqa: F401  (the real marker and the skip)

import rapid_search as rs
from rapid_search.tools.data import load_images
from rapid_search.tools.evaluate import fidelity, predict


@pytest.mark.usefixtures("one_thread")
def test_bfloat16_keeps_the_schedule_and_the_accuracy():
    model = _load_model("deit_tiny_patch16_224")
    imgs = load_images(EVAL, model=model)
    assert len(imgs) == 500 and imgs.labels is not None
    info = rs.ModelInfo.from_model(model)
    schedule = rs.rapid_schedule(info, 0.5)
    ref = predict(model, imgs.images, schedule, batch_size=50, info=info)
    half = predict(model.to(torch.bfloat16), imgs.images, schedule, batch_size=50, info=info)  # images cast by predict
    assert next(model.parameters()).dtype == torch.bfloat16 and half.logits.dtype == torch.float32
    assert torch.equal(half.counts, ref.counts)  # the same tokens per block: a fixed-count schedule
    assert torch.equal(half.counts[0], torch.tensor(rs.token_counts(info, schedule)))
    top1_32 = fidelity(ref.logits, ref.logits, imgs.labels)["top1"]
    top1_16 = fidelity(half.logits, ref.logits, imgs.labels)["top1"]
    assert top1_32 > 0.6  # the model works at all
    assert abs(top1_16 - top1_32) <= 0.005, (top1_16, top1_32)
