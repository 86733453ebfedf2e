"""Which timm models rapid-search supports, checked before anything reads or patches one.

The cost model (:class:`rapid_search.flops.ModelInfo`), the loader and the patcher all call
:func:`check_model`; it lives apart from them so that none of them imports another for it.
"""

from __future__ import annotations

from torch import nn

from .errors import RapidSearchError

__all__ = ["UnsupportedModelError", "check_model"]


class UnsupportedModelError(RapidSearchError, ValueError):
    """The model is not a timm VisionTransformer that rapid-search can patch."""


def check_model(model: nn.Module) -> None:
    """Raise :class:`UnsupportedModelError` unless ``model`` is a patchable timm ViT.

    Supported: ``timm.models.vision_transformer.VisionTransformer`` and subclasses (DeiT,
    distilled DeiT, DeiT-III, register and avg-pool variants) whose blocks are timm ``Block``
    with timm ``Attention``.
    """
    from timm.layers import Attention
    from timm.models.vision_transformer import Block, VisionTransformer

    name = type(model).__name__
    if not isinstance(model, VisionTransformer):
        raise UnsupportedModelError(
            f"{name} is not a timm VisionTransformer — rapid-search supports vit_*, deit_*, deit3_* models (e.g. deit_small_patch16_224)"
        )
    for i, blk in enumerate(model.blocks):
        if type(blk).forward is not Block.forward:
            raise UnsupportedModelError(
                f"block {i} is {type(blk).__name__}, not timm's pre-norm Block — this ViT variant is not supported; use a vit_*/deit_* model"
            )
        if type(blk.attn).forward is not Attention.forward:
            raise UnsupportedModelError(
                f"block {i} uses {type(blk.attn).__name__}, not timm's Attention — this ViT variant is not supported; use a vit_*/deit_* model"
            )
    if getattr(model, "attn_pool", None) is not None:
        raise UnsupportedModelError(
            f"{name} pools with attention (global_pool='map'), which ignores token sizes — use a model with token or avg pooling"
        )
    if model.global_pool not in ("token", "avg", "max", "avgmax", ""):
        raise UnsupportedModelError(f"global_pool={model.global_pool!r} is not supported — use 'token' or 'avg'")
