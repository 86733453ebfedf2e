"""Analytic cost model.

Convention: **multiply-accumulates (MACs)**, reported as "GFLOPs" = MACs x 1e-9, as fvcore and the
token-reduction papers do (DeiT-Tiny at 224 px: 1.25 G). ``torch.utils.flop_counter`` counts
2 FLOPs per MAC. Counted: the patch-embedding convolution, every ``nn.Linear`` (qkv, proj, MLP,
head), the two attention matmuls ``2 N^2 A`` per block, and the cost of the reduction itself
(the similarity matmul, ``head_dim`` or ``embed_dim`` wide as the layer's ``similarity``, and the
class-token attention row). Not counted, as in fvcore's ViT
numbers: normalisation, softmax, GELU, residual adds, gathers and sorts.

A block ``l`` sees ``N_l`` tokens in attention and ``N_{l+1}`` in its MLP (tokens are reduced
between the two, as in ToMe). For fixed-count layers ``N_{l+1}`` follows from the schedule
(:func:`token_counts`); threshold layers make it data-dependent, and the executed per-image cost
comes from the counts the runtime records (:func:`macs_from_counts`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import nn

from .ops import merge_sizes
from .schedule import LayerSpec, ModelFingerprint, Schedule, effective_r
from .families import adapter_for, attn_dim, head_dim, linear_macs, patch_macs

__all__ = [
    "ModelInfo",
    "effective_r",
    "token_counts",
    "schedule_macs",
    "schedule_gflops",
    "macs_from_counts",
    "block_macs",
]


@dataclass(frozen=True)
class ModelInfo:
    """Everything the cost model and schedule validation need, read from a timm ViT.

    Attributes:
        name: timm model name (``pretrained_cfg['architecture']``).
        depth: Number of transformer blocks.
        embed_dim: Token width.
        num_tokens: Tokens entering block 0 (patches + prefix tokens) at the default input size.
        num_prefix_tokens: Class, distillation and register tokens.
        num_heads, head_dim, attn_dim: Attention shape (``attn_dim = num_heads * head_dim``).
        attn_linear_macs: Per-token MACs of the attention's linear layers (qkv + proj).
        mlp_macs: Per-token MACs of the MLP.
        patch_macs: MACs of the patch embedding for one image.
        head_macs: MACs of the classifier head(s) for one image.
        importance_rows: Query rows used for importance (1; 2 for distilled DeiT).
        pool_token_macs: MACs per token entering attention pooling (``global_pool='map'``: the
            key/value projection and the latent queries' two attention matmuls); 0 otherwise.
        pool_skip: Leading (prefix) tokens the attention pooling does not see.
        const_macs: Input-independent MACs of one forward (``RelPosMlp`` bias tables), counted
            once per image: exact at batch size 1, an upper bound per image for larger batches.
    """

    name: str
    depth: int
    embed_dim: int
    num_tokens: int
    num_prefix_tokens: int
    num_heads: int
    head_dim: int
    attn_dim: int
    attn_linear_macs: int
    mlp_macs: int
    patch_macs: int
    head_macs: int
    importance_rows: int
    pool_token_macs: int = 0
    pool_skip: int = 0
    const_macs: int = 0

    @classmethod
    def from_model(cls, model: nn.Module) -> "ModelInfo":
        """Read the facts from a supported timm ViT (see ``rapid_search.check_model``)."""
        ad = adapter_for(model)
        blk = model.blocks[0]
        attns, mlps = ad.attns(blk), ad.mlps(blk)
        attn = attns[0]
        num_patches = int(model.patch_embed.num_patches)
        P = int(model.num_prefix_tokens)
        head_macs = linear_macs(getattr(model, "head", None)) + linear_macs(getattr(model, "head_dist", None))
        pool_token_macs, pool_skip = 0, 0
        attn_pool = getattr(model, "attn_pool", None)
        if attn_pool is not None:  # AttentionPoolLatent: latent queries attend to the final tokens
            L, E = int(attn_pool.latent_len), int(attn_pool.num_heads * attn_pool.head_dim)
            head_macs += L * (linear_macs(attn_pool.q) + linear_macs(attn_pool.proj) + linear_macs(attn_pool.mlp))
            pool_token_macs = linear_macs(attn_pool.kv) + 2 * L * E
            pool_skip = 0 if getattr(model, "pool_include_prefix", True) else P
        name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__
        return cls(
            name=str(name),
            depth=len(model.blocks),
            embed_dim=int(model.embed_dim),
            num_tokens=num_patches + P,
            num_prefix_tokens=P,
            num_heads=int(attn.num_heads),
            head_dim=head_dim(attn),
            attn_dim=sum(attn_dim(a) for a in attns),
            attn_linear_macs=sum(linear_macs(a) - linear_macs(getattr(a, "rel_pos", None)) for a in attns),  # bias MLPs: const_macs
            mlp_macs=sum(linear_macs(m) for m in mlps),
            patch_macs=patch_macs(model),
            head_macs=int(head_macs),
            importance_rows=2 if getattr(model, "dist_token", None) is not None else 1,
            pool_token_macs=int(pool_token_macs),
            pool_skip=int(pool_skip),
            const_macs=int(ad.const_macs(model)),
        )

    def fingerprint(self) -> ModelFingerprint:
        return ModelFingerprint(self.name, self.depth, self.embed_dim, self.num_tokens, self.num_prefix_tokens)

    @property
    def base_macs(self) -> int:
        """MACs of the unreduced model for one image."""
        return schedule_macs(self, [LayerSpec()] * self.depth)

    @property
    def base_gflops(self) -> float:
        return self.base_macs / 1e9


def _as_layers(schedule: Union[Schedule, Sequence[LayerSpec]]) -> Sequence[LayerSpec]:
    return schedule.layers if isinstance(schedule, Schedule) else schedule


def token_counts(info: ModelInfo, schedule: Union[Schedule, Sequence[LayerSpec]]) -> list[int]:
    """Tokens entering each block, plus the final count: ``depth + 1`` integers.

    For threshold layers this assumes every candidate passes its threshold (the fewest tokens,
    the lowest cost); the executed counts are recorded by the runtime.
    """
    n = info.num_tokens
    counts = [n]
    for layer in _as_layers(schedule):
        n -= effective_r(layer, n, info.num_prefix_tokens)
        counts.append(n)
    return counts


def _similarity_width(info: ModelInfo, layer: LayerSpec) -> int:
    """Width of the features a layer compares: ``embed_dim`` (``similarity: tokens``) or ``head_dim`` (keys)."""
    return info.embed_dim if layer.similarity == "tokens" else info.head_dim


def _reduction_macs(info: ModelInfo, layer: LayerSpec, n: int) -> int:
    """MACs of computing the reduction of a block with ``n`` input tokens."""
    if not layer.reduces:
        return 0
    T = n - info.num_prefix_tokens
    hd = _similarity_width(info, layer)
    if layer.op == "prune":
        return ((T + 1) // 2) * (T // 2) * hd
    if layer.op == "merge":
        n_a = merge_sizes(T, float(layer.protect), 0)[1]  # type: ignore[arg-type]  # sources, each compared with every patch token
        return n_a * T * hd + info.importance_rows * n * info.attn_dim
    if layer.op == "tome":
        return ((n + 1) // 2) * (n // 2) * hd
    if layer.op == "evit":
        return info.importance_rows * n * info.attn_dim
    raise ValueError(f"unknown op {layer.op!r}")


def block_macs(info: ModelInfo, layer: LayerSpec, n_in: int, n_out: int) -> int:
    """MACs of one block: attention on ``n_in`` tokens, reduction, MLP on ``n_out`` tokens."""
    attn = n_in * info.attn_linear_macs + 2 * n_in * n_in * info.attn_dim
    return attn + _reduction_macs(info, layer, n_in) + n_out * info.mlp_macs


def schedule_macs(info: ModelInfo, schedule: Union[Schedule, Sequence[LayerSpec]], counts: Optional[Sequence[int]] = None) -> int:
    """Analytic MACs for one image (fixed counts from the schedule unless ``counts`` is given)."""
    layers = _as_layers(schedule)
    if counts is None:
        counts = token_counts(info, layers)
    total = info.patch_macs + info.head_macs + info.const_macs
    total += info.pool_token_macs * (int(counts[-1]) - info.pool_skip)
    for i, layer in enumerate(layers):
        total += block_macs(info, layer, int(counts[i]), int(counts[i + 1]))
    return total


def schedule_gflops(info: ModelInfo, schedule: Union[Schedule, Sequence[LayerSpec]]) -> float:
    """Analytic GFLOPs (MACs x 1e-9) for one image."""
    return schedule_macs(info, schedule) / 1e9


def macs_from_counts(info: ModelInfo, schedule: Union[Schedule, Sequence[LayerSpec]], counts: torch.Tensor) -> torch.Tensor:
    """Executed per-image MACs from recorded token counts.

    Args:
        info: Model facts.
        schedule: The schedule that ran.
        counts: ``(B, depth + 1)`` token counts as recorded by the runtime
            (``rapid_search.token_counts(model)``).

    Returns:
        ``(B,)`` float64 MACs per image.
    """
    layers = _as_layers(schedule)
    c = counts.to(torch.float64)  # (B, L + 1)
    total = torch.full((c.shape[0],), float(info.patch_macs + info.head_macs + info.const_macs), dtype=torch.float64)
    total += info.pool_token_macs * (c[:, -1] - info.pool_skip)
    P, A = info.num_prefix_tokens, info.attn_dim
    for i, layer in enumerate(layers):
        n, n_out = c[:, i], c[:, i + 1]
        total += n * info.attn_linear_macs + 2 * n * n * A + n_out * info.mlp_macs
        if layer.reduces:
            T, hd = n - P, _similarity_width(info, layer)
            if layer.op == "prune":
                total += torch.ceil(T / 2) * torch.floor(T / 2) * hd
            elif layer.op == "merge":
                n_a = torch.floor((T - torch.floor(T * float(layer.protect) + 0.5) + 1) / 2)
                total += n_a * T * hd + info.importance_rows * n * A
            elif layer.op == "tome":
                total += torch.ceil(n / 2) * torch.floor(n / 2) * hd
            elif layer.op == "evit":
                total += info.importance_rows * n * A
    return total
