"""The patched forward against timm's own: a reducing schedule that removes nothing must give
timm's output, on every supported family, with fused and unfused attention.

``engine._attention`` and ``engine._block_forward`` re-state timm 1.0.31's ``Attention.forward``
and ``Block.forward`` (see the ``rapid_search.runtime.engine`` docstring). Threshold layers that never fire
(cosine similarity above 1.0 does not happen) send every block through that re-stated path while
keeping every token, so a change in timm's forward that the re-statement misses fails here.
"""

from __future__ import annotations

import pytest
import torch

from helpers import FAMILIES, images
from rapid_search import LayerSpec, applied as rs_applied, apply, last_token_counts, remove
from rapid_search.runtime.presets import make_schedule, model_info

#: Never fires: tokens are removed only where the cosine similarity exceeds the threshold.
NEVER = 1.0


def _keep_all(model: torch.nn.Module, op: str):
    info = model_info(model)
    layer = LayerSpec(op, 1, NEVER, 0.0 if op == "merge" else None)
    return make_schedule(info, [layer] * info.depth, method="parity")


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "unfused"])
@pytest.mark.parametrize("op", ["prune", "merge"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_reducing_path_equals_timm_forward(family: str, op: str, fused: bool) -> None:
    model = FAMILIES[family]()
    for blk in model.blocks:
        blk.attn.fused_attn = fused
    x = images(model, 3)
    with torch.no_grad():
        want = model(x)  # timm's own forward
        apply(model, _keep_all(model, op))
        got = model(x)
        counts = last_token_counts(model)
        remove(model)
    n = model.patch_embed.num_patches + model.num_prefix_tokens
    assert counts.eq(n).all(), f"a token was removed: {counts.tolist()}"  # the path ran, removing nothing
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_the_reducing_path_is_really_taken(monkeypatch) -> None:
    """The schedule above does not fall back to timm's forward: the re-stated attention runs."""
    import rapid_search.runtime.engine as patch

    calls = []
    real = patch._attention
    monkeypatch.setattr(patch, "_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = FAMILIES["test_vit"]()
    with torch.no_grad(), rs_applied(model, _keep_all(model, "prune")):
        model(images(model, 2))
    assert len(calls) == len(model.blocks)
