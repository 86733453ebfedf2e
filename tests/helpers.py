"""Shared helpers for the runtime/ops/flops tests: tiny timm ViTs of every supported family."""

from __future__ import annotations

import os
from typing import Callable

import timm
import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

# Tiny models on 2 shared cores: intra-op threads only add synchronisation (10-50x slower under load).
torch.set_num_threads(int(os.environ.get("RAPID_TEST_THREADS", "1")))

_HAND = dict(img_size=64, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=10)


def _seeded(factory: Callable[[], torch.nn.Module]) -> Callable[[], torch.nn.Module]:
    def make() -> torch.nn.Module:
        torch.manual_seed(0)
        return factory().eval()

    return make


#: name -> factory of a fresh, deterministic, eval-mode model. Every family the runtime supports.
FAMILIES: dict[str, Callable[[], torch.nn.Module]] = {
    # class token, token pool (DeiT / ViT)
    "test_vit": _seeded(lambda: timm.create_model("test_vit")),
    # 1 register token, no class token, avg pool, LayerScale
    "test_vit2": _seeded(lambda: timm.create_model("test_vit2")),
    # avg pool, LayerScale
    "test_vit4": _seeded(lambda: timm.create_model("test_vit4")),
    # distilled DeiT: class + distillation token
    "distilled": _seeded(lambda: VisionTransformerDistilled(**_HAND)),
    # DeiT-III: LayerScale
    "deit3": _seeded(lambda: VisionTransformer(**_HAND, init_values=1e-5)),
    # class + 4 register tokens
    "reg4": _seeded(lambda: VisionTransformer(**_HAND, reg_tokens=4)),
    # no prefix token at all, avg pool
    "avg_nocls": _seeded(lambda: VisionTransformer(**_HAND, class_token=False, global_pool="avg")),
    # QK-norm
    "qk_norm": _seeded(lambda: VisionTransformer(**_HAND, qk_norm=True)),
}


def image_size(model: torch.nn.Module) -> int:
    return int(model.patch_embed.img_size[0])


def images(model: torch.nn.Module, n: int, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``n`` images of different smoothness (so redundancy, and threshold counts, differ per image)."""
    g = torch.Generator().manual_seed(seed)
    s = image_size(model)
    x = torch.randn(n, 3, s, s, generator=g, dtype=torch.float64)
    out = []
    for i in range(n):
        k = (2 * i + 1) % 9 or 1  # blur kernel 1, 3, 5, 7, 9 ...: more blur = more redundant tokens
        xi = x[i : i + 1]
        if k > 1:
            xi = torch.nn.functional.avg_pool2d(xi, k, 1, k // 2)
        out.append(xi)
    return torch.cat(out).to(dtype)


def module_state(model: torch.nn.Module) -> dict[str, tuple]:
    """Instance attribute names of every submodule, for before/after comparison."""
    state = {}
    for name, mod in model.named_modules():
        state[name] = tuple(sorted(mod.__dict__.keys()))
    return state


def search_argv(ts, default_name: str, *extra: str, **change: str) -> list[str]:
    """``rapid-search search`` arguments of a valid tiny search (``ts``: the ``tiny_search``
    fixture; default storage and output under ./studies/), options replaced (``None``: removed)
    or added."""
    args = ["--model", "test_vit", "--checkpoint", str(ts.ckpt), "--data", str(ts.data), "--budget", "50%GFLOPs",
            "--trials", "2", "--calib-images", "16", "--batch-size", "8", "--threads", "1", "--progress", "quiet",
            "--study-name", default_name]
    for k, v in change.items():
        i = args.index("--" + k.replace("_", "-"))
        if v is None:
            del args[i : i + 2]
        else:
            args[i + 1] = v
    return ["search", *args, *extra]


def read_importance_macs(model: torch.nn.Module, info, schedule, counts=None) -> int:
    """Per-image MACs of the importance rows that an explicit attention (``engine._sdpa``) reads from its
    probabilities instead of computing them; the cost model counts them (what a block running the fused
    kernel computes). Class-like rows only: the global query of a model without a class token is no row.
    ``counts``: the recorded token counts of one image, for data-dependent schedules."""
    import rapid_search as rs
    from rapid_search.runtime.engine import _class_rows

    counts = rs.token_counts(info, schedule) if counts is None else [int(c) for c in counts]
    return sum(
        _class_rows(model) * counts[i] * info.attn_dim for i, layer in enumerate(schedule.layers) if layer.reduces and layer.op in ("merge", "evit")
    )
