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
    """The hand-set schedules at 70, 50 and 35% GFLOPs in bfloat16: the same tokens per block as in
    float32, and top-1 within 0.5 point of float32 on average over the three (each within 1 point).

    Why three: in bfloat16 the residual stream is rounded, so near-tied similarities pick other
    tokens in 2-10% of the images (12-50 of 500 predictions change, against 2 for the unreduced
    model); the net top-1 change of one schedule is then a sum of a dozen coin flips, about 0.6
    point either way, so one schedule alone cannot resolve 0.5 point.
    """
    model = _load_model("deit_tiny_patch16_224")
    imgs = load_images(EVAL, model=model)
    assert len(imgs) == 500 and imgs.labels is not None
    info = rs.ModelInfo.from_model(model)
    schedules = [rs.rapid_schedule(info, ratio) for ratio in (0.7, 0.5, 0.35)]
    refs = [predict(model, imgs.images, s, batch_size=50, info=info) for s in schedules]
    model = model.to(torch.bfloat16)
    halves = [predict(model, imgs.images, s, batch_size=50, info=info) for s in schedules]  # images cast by predict
    assert next(model.parameters()).dtype == torch.bfloat16
    gaps = []
    for s, ref, half in zip(schedules, refs, halves):
        assert half.logits.dtype == torch.float32
        assert torch.equal(half.counts, ref.counts)  # the same tokens per block: a fixed-count schedule
        assert torch.equal(half.counts[0], torch.tensor(rs.token_counts(info, s)))
        top1_32 = fidelity(ref.logits, ref.logits, imgs.labels)["top1"]
        top1_16 = fidelity(half.logits, ref.logits, imgs.labels)["top1"]
        assert top1_32 > 0.6  # the model works at all
        gaps.append(top1_16 - top1_32)
    assert max(abs(g) for g in gaps) <= 0.01 and abs(sum(gaps) / len(gaps)) <= 0.005, gaps


@pytest.mark.usefixtures("one_thread")
def test_bfloat16_explicit_attention_is_as_close_to_float32_as_the_fused_kernel():
    """At batch 1 on CPU every reducing block of a bfloat16 model computes its attention explicitly, in
    float32 (``EXPLICIT_ATTENTION_MAX``), and reads the importance from those probabilities. Against the
    fused kernel (limit 0: bfloat16 SDPA, the importance row computed apart), its logits are as close to
    the float32 model's: KL(float32 || bfloat16) over the 500 evaluation images, averaged over the
    hand-set schedules at 70, 50 and 35% GFLOPs, no larger than the fused kernel's (0.0302 against 0.0327
    when this was written; the same explicit attention computed in bfloat16, as timm's unfused path
    would, read 0.0330), with the same tokens per block."""
    from rapid_search.runtime import engine

    model = _load_model("deit_tiny_patch16_224")
    imgs = load_images(EVAL, model=model)
    info = rs.ModelInfo.from_model(model)
    schedules = [rs.rapid_schedule(info, ratio) for ratio in (0.7, 0.5, 0.35)]
    refs = [predict(model, imgs.images, s, batch_size=50, info=info) for s in schedules]
    model = model.to(torch.bfloat16)

    def kl(limit: int) -> float:
        old, engine.EXPLICIT_ATTENTION_MAX = engine.EXPLICIT_ATTENTION_MAX, limit
        try:
            total = 0.0
            for s, ref in zip(schedules, refs):
                half = predict(model, imgs.images, s, batch_size=1, info=info)
                assert torch.equal(half.counts, ref.counts)
                lp, lq = ref.logits.float().log_softmax(-1), half.logits.float().log_softmax(-1)
                total += float((lp.exp() * (lp - lq)).sum(-1).mean())
            return total / len(schedules)
        finally:
            engine.EXPLICIT_ATTENTION_MAX = old

    explicit, fused = kl(engine.EXPLICIT_ATTENTION_MAX), kl(0)
    assert 0 < explicit <= fused, (explicit, fused)
