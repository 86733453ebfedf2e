"""Model families: which timm ViTs the runtime patches, the facts it reads from them, and their blocks.

Every model goes through :func:`adapter_for`, which returns the :class:`Adapter` of its family or
raises :class:`UnsupportedModelError` with a one-line reason. Supported:

========================  =====================================================================
family                    models (timm classes / blocks)
========================  =====================================================================
``vit``                   ``VisionTransformer`` with timm ``Block`` + ``Attention`` (ViT, DeiT,
                          DeiT-III, registers, avg/max pooling) and ``global_pool='map'``
                          attention pooling (SigLIP, ``vit_so400m``); ``VisionTransformerDistilled``
``vit-blocks``            ``VisionTransformer`` with ``ResPostBlock`` or ``ParallelThingsBlock``
``eva``                   ``Eva`` (EVA-02, DINOv3, PE, ``vit_*_rope_*``): RoPE, SwiGLU, LayerScale,
                          ``EvaAttention`` / ``AttentionRope`` (also grouped-query), post-norm blocks
``beit``                  ``Beit``: per-block or shared relative position bias, LayerScale
``relpos``                ``VisionTransformerRelPos``: ``RelPosBias`` / ``RelPosMlp``, shared or per block
========================  =====================================================================

Refused (one-line :class:`UnsupportedModelError`): ``NaFlexVit`` (its forward takes patch
dictionaries and masks), blocks that run attention and MLP on the same input in parallel
(``ParallelScalingBlock``: tokens cannot be reduced between the two), ``DiffAttention``, hybrid /
convolutional patch stems (their cost is not counted), and everything that is not one of the above.

Position-dependent families (RoPE, relative position bias) follow tokens through every reduction:
the runtime carries ``pos`` (``(B, N)`` index of each token in the input sequence,
:func:`rapid_search.runtime.ops.follow_positions`). A pruned-away token takes its position with it; a
merged token keeps its **destination's** position (its RoPE angles and its bias-table row and
column). The alternative, a size-weighted position, is not a rotation of any grid position for
RoPE and has no row in a bias table, and no pretrained weights of these families are available
here to measure it against; the destination keeps what the pretrained model saw for that token.

Reducing blocks are composed from the block's own modules, as in :mod:`rapid_search.runtime.patch`; blocks
with nothing to do while no sizes or positions are in flight call timm's own ``forward``.
"""

from __future__ import annotations

import types
import weakref
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .engine import Metric, _call, _importance, _pool, _reduce, _Runtime, _sdpa
from ..errors import RapidSearchError
from .schedule import ScheduleError

__all__ = ["UnsupportedModelError", "check_model", "Adapter", "adapter_for", "family_name", "FAMILY_CLASSES"]


class UnsupportedModelError(RapidSearchError, ValueError):
    """The model is not a timm ViT that rapid-search can patch (the message says why, in one line)."""

#: timm class names of the ViT family (for coverage reports).
FAMILY_CLASSES = ("VisionTransformer", "VisionTransformerDistilled", "Eva", "Beit", "VisionTransformerRelPos", "NaFlexVit")


# ---- attention, composed from the module's own layers ------------------------------------------------------------


def linear_macs(module: Optional[nn.Module]) -> int:
    """MACs per token of all ``nn.Linear`` layers inside ``module`` (0 for None)."""
    if module is None:
        return 0
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def head_dim(attn: nn.Module) -> int:
    """Per-head width of an attention module (BEiT's ``Attention`` stores only ``scale``)."""
    hd = getattr(attn, "head_dim", None)
    if hd is None:
        hd = (attn.qkv.out_features if getattr(attn, "qkv", None) is not None else attn.q_proj.out_features * 3) // 3 // attn.num_heads
    return int(hd)


def attn_dim(attn: nn.Module) -> int:
    """Width of the attention's queries (``num_heads * head_dim``)."""
    return int(attn.num_heads) * head_dim(attn)


_PATCH_MACS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def patch_macs(model: nn.Module) -> int:
    """MACs of the patch embedding for one image at the model's input size.

    timm's ``PatchEmbed`` (one convolution) is counted analytically. A ``HybridEmbed`` (a CNN stem,
    e.g. ``vit_*_r26_s32``, ``vitamin_*``) is counted once with ``FlopCounterMode`` on fake tensors
    (no real compute, any device) and cached per module: convolutions and matmuls, as everywhere.
    """
    from timm.layers import PatchEmbed

    pe = model.patch_embed
    if type(pe).forward is PatchEmbed.forward:
        return int(pe.num_patches) * pe.proj.weight[0].numel() * pe.proj.out_channels
    key = (tuple(pe.img_size), sum(p.numel() for p in pe.parameters()))
    hit = _PATCH_MACS.get(pe)
    if hit is None or hit[0] != key:
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.utils.flop_counter import FlopCounterMode

        p = next(pe.parameters())
        with FakeTensorMode(allow_non_fake_inputs=True):
            x = torch.empty(1, int(getattr(pe, "in_chans", 3)), *pe.img_size, device=p.device, dtype=p.dtype)
            fc = FlopCounterMode(display=False)
            with fc, torch.no_grad():
                y = pe(x)
        if y.shape[1] != pe.num_patches:
            raise ValueError(f"the patch embedding gives {y.shape[1]} tokens, not num_patches = {pe.num_patches}")
        hit = (key, fc.get_total_flops() // 2)
        _PATCH_MACS[pe] = hit
    return int(hit[1])


def _qkv(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q, k, v`` ``(B, H, N, hd)`` (``k``/``v`` may have fewer heads) as the module computes them.

    Handles a fused ``qkv`` Linear (with its own bias, or EVA/BEiT's ``q_bias``/``k_bias``/``v_bias``)
    and separate ``q_proj``/``k_proj``/``v_proj``; applies ``q_norm``/``k_norm`` when present.
    """
    B, N, _ = x.shape
    hd = head_dim(attn)
    qkv_mod = getattr(attn, "qkv", None)
    if qkv_mod is not None:
        q_bias = getattr(attn, "q_bias", None)
        if q_bias is None:
            qkv = qkv_mod(x)
        else:
            bias = torch.cat((q_bias, attn.k_bias, attn.v_bias))
            qkv = qkv_mod(x) + bias if getattr(attn, "qkv_bias_separate", False) else F.linear(x, qkv_mod.weight, bias)
        q, k, v = qkv.reshape(B, N, 3, -1, hd).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, hd) each
    else:
        q = attn.q_proj(x).reshape(B, N, -1, hd).transpose(1, 2)  # (B, H, N, hd)
        k = attn.k_proj(x).reshape(B, N, -1, hd).transpose(1, 2)  # (B, Hkv, N, hd)
        v = attn.v_proj(x).reshape(B, N, -1, hd).transpose(1, 2)  # (B, Hkv, N, hd)
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    if q_norm is not None:
        q, k = _call(q_norm, q), _call(k_norm, k)
    return q, k, v


def _rotate(attn: nn.Module, t: torch.Tensor, rope: Optional[torch.Tensor], num_prefix: int) -> torch.Tensor:
    """Apply rotary embeddings ``rope`` ``(B, 1 or H, T, 2 * hd)`` to the patch tokens of ``t``."""
    if rope is None:
        return t
    from timm.layers.pos_embed_sincos import apply_rot_embed_cat

    half = bool(getattr(attn, "rotate_half", False))
    return torch.cat([t[:, :, :num_prefix], apply_rot_embed_cat(t[:, :, num_prefix:], rope, half=half)], dim=2)


def attention(
    attn: nn.Module,
    x: torch.Tensor,
    size: Optional[torch.Tensor],
    *,
    bias: Optional[torch.Tensor] = None,
    rope: Optional[torch.Tensor] = None,
    importance_rows: int,
    need_importance: bool,
    num_prefix: int,
) -> tuple[torch.Tensor, Metric, Optional[torch.Tensor]]:
    """Self-attention of a timm attention module with proportional attention and a position bias.

    Args:
        attn: timm ``Attention``, ``EvaAttention``, ``AttentionRope``, BEiT ``Attention`` or
            ``RelPosAttention`` (its own layers are used).
        x: ``(B, N, C)`` normalised tokens.
        size: ``(B, N, 1)`` token sizes (0 = padding) or None when all are 1.
        bias: Additive position bias broadcastable to ``(B, H, N, N)`` (gathered for the current tokens).
        rope: Rotary embeddings ``(B, 1 or H, N - prefix, 2 * hd)`` of the current patch tokens.
        importance_rows: Class-like prefix rows to average (0 = size-weighted global query).
        need_importance: Compute the importance of patch tokens.
        num_prefix: Prefix tokens.

    Returns:
        Output ``(B, N, C)``, the metric as a function that computes it on demand (head-averaged
        keys ``(B, N, hd)`` before RoPE: content, not position) and importance ``(B, N - num_prefix)`` or None.
    """
    B, N, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = _qkv(attn, x)
    metric = lambda k=k: k.mean(dim=1)  # noqa: E731 - (B, N, hd) head-averaged keys, as ToMe (the keys before RoPE)
    rope_prefix = int(getattr(attn, "num_prefix_tokens", num_prefix))
    q, k = _rotate(attn, q, rope, rope_prefix).type_as(v), _rotate(attn, k, rope, rope_prefix).type_as(v)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:  # grouped-query attention: expand K/V heads as timm does
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, H, N, hd)
    mask = None if size is None else size.log().to(q.dtype)[:, None, None, :, 0]  # (B, 1, 1, N) proportional attention
    if bias is not None:
        mask = bias.to(q.dtype) if mask is None else mask + bias.to(q.dtype)  # (B, H, N, N)
    out, probs = _sdpa(attn, q, k, v, mask, rows=importance_rows if need_importance else 0)
    out = out.transpose(1, 2).reshape(B, N, -1)  # (B, N, A)
    norm = getattr(attn, "norm", None)
    if norm is not None:
        out = _call(norm, out)
    if gate is not None:
        out = out * gate
    out = _call(attn.proj_drop, attn.proj(out))  # (B, N, C)
    importance = None
    if need_importance:
        if probs is not None:
            bias = None  # the attention's own probabilities are read: no logits to bias
        elif importance_rows > 0:
            bias = None if mask is None else mask[:, :, :importance_rows]  # the class rows' own size and position bias
        else:
            bias = None if size is None else size.log().to(q.dtype)[:, None, None, :, 0]  # the global query has no bias row
        importance = _importance(q, k, attn.scale, size, rows=importance_rows, num_prefix=num_prefix, bias=bias, probs=probs)  # (B, T)
    return out, metric, importance


# ---- position following ---------------------------------------------------------------------------------------------


def gather_bias(bias: torch.Tensor, pos: Optional[torch.Tensor]) -> torch.Tensor:
    """Rows and columns of a ``([1 or B,] H, N0, N0)`` bias for the current tokens ``pos`` ``(B, N)``."""
    if bias.ndim == 3:
        bias = bias[None]  # (1, H, N0, N0)
    if pos is None:
        return bias
    B, N = pos.shape
    H, N0 = bias.shape[1], bias.shape[-1]
    b = bias.expand(B, H, N0, N0)
    b = b.gather(2, pos[:, None, :, None].expand(B, H, N, N0))  # (B, H, N, N0) rows
    return b.gather(3, pos[:, None, None, :].expand(B, H, N, N))  # (B, H, N, N) columns


def gather_rope(rope: Optional[torch.Tensor], pos: Optional[torch.Tensor], num_prefix: int) -> Optional[torch.Tensor]:
    """Rotary embeddings ``(T0, D)`` or ``(H, T0, D)`` of the current patch tokens: ``(B, 1 or H, T, D)``."""
    if rope is None or pos is None:
        return rope
    if rope.ndim == 2:
        rope = rope[None]  # (1, T0, D) shared by all heads
    if rope.ndim != 3:
        raise ValueError(f"rotary embeddings of shape {tuple(rope.shape)} (per image) cannot follow reduced tokens — run the model in eval mode")
    idx = (pos[:, num_prefix:] - num_prefix).clamp_min(0)  # (B, T) patch index in the input grid
    return rope[:, idx].transpose(0, 1)  # (B, Hr, T, D)


# ---- adapters ------------------------------------------------------------------------------------------------------


class Adapter:
    """How the runtime patches one family. Stateless; one instance per family.

    Attributes:
        name: Family name (see the module table).
        tracks_positions: Tokens carry positions (RoPE, relative position bias).
        head_patches: Model methods replaced while patched (size-aware pooling).
    """

    name = "vit"
    tracks_positions = False
    head_patches: tuple[str, ...] = ("pool",)
    #: None: the patched block forward of :mod:`rapid_search.runtime.patch` (timm ``Block``).
    block_forward: Optional[Callable[..., torch.Tensor]] = None

    # -- facts -----------------------------------------------------------------------------------------------
    def attns(self, blk: nn.Module) -> list[nn.Module]:
        """The attention modules of a block."""
        return [blk.attn]

    def mlps(self, blk: nn.Module) -> list[nn.Module]:
        """The MLP modules of a block."""
        return [blk.mlp]

    def const_macs(self, model: nn.Module) -> int:
        """Input-independent MACs of one forward (relative-position MLPs)."""
        return 0

    # -- forward pieces (generic block forward) --------------------------------------------------------------
    def context(self, blk: nn.Module, args: tuple, kwargs: dict) -> Any:
        """Per-call extras passed by the model loop (rope, shared bias)."""
        return None

    def attn_branch(self, blk: nn.Module, x: torch.Tensor, rt: _Runtime, ctx: Any, need_importance: bool):
        raise NotImplementedError

    def mlp_branch(self, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- head -------------------------------------------------------------------------------------------------
    def pool(self, model: nn.Module, x: torch.Tensor, pool_type: Optional[str] = None) -> torch.Tensor:
        """Size-aware pooling: weighted average/max; attention pooling sees ``+log size``."""
        rt: _Runtime = getattr(model, "_rapid_runtime")
        size = rt.state.size
        attn_pool = getattr(model, "attn_pool", None)
        if attn_pool is None:
            return _pool(model, x, pool_type)
        if size is None:
            return type(model).pool(model, x, pool_type)
        if getattr(model, "pool_include_prefix", True) is False:  # VisionTransformer drops prefix tokens first
            x, size = x[:, model.num_prefix_tokens :], size[:, model.num_prefix_tokens :]
        mask = size.log().to(x.dtype)[:, None, None, :, 0]  # (B, 1, 1, N) proportional attention, padding -inf
        return attn_pool(x, attn_mask=mask)


def _attn_kwargs(rt: _Runtime, need_importance: bool) -> dict:
    return dict(importance_rows=rt.importance_rows, need_importance=need_importance, num_prefix=rt.num_prefix)


def _block_forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Patched forward of a family block (bound to the block): attention, reduction, MLP."""
    rt: _Runtime = self._rapid_rt
    ad: Adapter = rt.adapter
    index: int = self._rapid_index
    layer = self._rapid_layer
    st = rt.state
    if index == 0:
        st.reset()
        rt.batch = x.shape[0]
        if x.shape[1] != rt.num_tokens:
            raise ScheduleError(
                f"the input gives {x.shape[1]} tokens but the schedule was made for {rt.num_tokens} — "
                "feed images at the model's input size or make a schedule for this size"
            )
        st.record(x)
    if not layer.reduces and st.size is None and st.pos is None:
        x = type(self).forward(self, x, *args, **kwargs)  # identity fast path: timm's own forward
        st.record(x)
        return x
    if kwargs.get("attn_mask") is not None or kwargs.get("is_causal"):
        raise ValueError("attention masks are not supported together with token reduction")
    need = layer.reduces and layer.op in ("merge", "evit")
    y, metric, importance = ad.attn_branch(self, x, rt, ad.context(self, args, kwargs), need)
    x = x + y
    if layer.reduces:
        if ad.tracks_positions and st.pos is None:
            st.pos = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)  # (B, N) input positions
        x = _reduce(x, metric, importance, layer, rt)
    x = x + ad.mlp_branch(self, x)
    st.record(x)
    return x


class _VitBlocks(Adapter):
    """``VisionTransformer`` with ``ResPostBlock`` / ``ParallelThingsBlock`` (and ``Block``) of timm ``Attention``."""

    name = "vit-blocks"
    block_forward = staticmethod(_block_forward)

    def attns(self, blk):
        from timm.models.vision_transformer import ParallelThingsBlock

        return [a.attn for a in blk.attns] if isinstance(blk, ParallelThingsBlock) else [blk.attn]

    def mlps(self, blk):
        from timm.models.vision_transformer import ParallelThingsBlock

        return [f.mlp for f in blk.ffns] if isinstance(blk, ParallelThingsBlock) else [blk.mlp]

    def attn_branch(self, blk, x, rt, ctx, need):
        from timm.models.vision_transformer import ParallelThingsBlock, ResPostBlock

        size, kw = rt.state.size, _attn_kwargs(rt, need)
        if isinstance(blk, ParallelThingsBlock):
            ys, ms, imps = [], [], []
            for br in blk.attns:
                y, m, imp = attention(br.attn, br.norm(x), size, **kw)
                ys.append(_call(br.drop_path, _call(br.ls, y)))
                ms.append(m)
                imps.append(imp)
            imp = None if imps[0] is None else torch.stack(imps).mean(0)  # (B, T) mean over parallel attentions
            return torch.stack(ys).sum(0), lambda: torch.stack([m() for m in ms]).mean(0), imp  # metric: mean head-averaged keys
        if isinstance(blk, ResPostBlock):
            y, m, imp = attention(blk.attn, x, size, **kw)
            return _call(blk.drop_path1, blk.norm1(y)), m, imp
        y, m, imp = attention(blk.attn, blk.norm1(x), size, **kw)
        return _call(blk.drop_path1, _call(blk.ls1, y)), m, imp

    def mlp_branch(self, blk, x):
        from timm.models.vision_transformer import ParallelThingsBlock, ResPostBlock

        if isinstance(blk, ParallelThingsBlock):
            return torch.stack([f(x) for f in blk.ffns]).sum(0)
        if isinstance(blk, ResPostBlock):
            return _call(blk.drop_path2, blk.norm2(blk.mlp(x)))
        return _call(blk.drop_path2, _call(blk.ls2, blk.mlp(blk.norm2(x))))


def _scale(gamma: Optional[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    return y if gamma is None else gamma * y


class _Eva(Adapter):
    """``Eva``: ``EvaBlock`` / ``EvaBlockPostNorm`` with ``EvaAttention`` / ``AttentionRope``; RoPE follows tokens."""

    name = "eva"
    tracks_positions = True
    block_forward = staticmethod(_block_forward)

    def context(self, blk, args, kwargs):
        return kwargs.get("rope", args[0] if args else None)

    def attn_branch(self, blk, x, rt, rope, need):
        from timm.models.eva import EvaBlockPostNorm

        st = rt.state
        rope = gather_rope(rope, st.pos, rt.num_prefix)
        kw = _attn_kwargs(rt, need)
        if isinstance(blk, EvaBlockPostNorm):
            y, m, imp = attention(blk.attn, x, st.size, rope=rope, **kw)
            return _call(blk.drop_path1, blk.norm1(y)), m, imp
        y, m, imp = attention(blk.attn, blk.norm1(x), st.size, rope=rope, **kw)
        return _call(blk.drop_path1, _scale(blk.gamma_1, y)), m, imp

    def mlp_branch(self, blk, x):
        from timm.models.eva import EvaBlockPostNorm

        if isinstance(blk, EvaBlockPostNorm):
            return _call(blk.drop_path2, blk.norm2(blk.mlp(x)))
        return _call(blk.drop_path2, _scale(blk.gamma_2, blk.mlp(blk.norm2(x))))


class _Beit(Adapter):
    """``Beit``: relative position bias (per block and/or shared) gathered for the remaining tokens."""

    name = "beit"
    tracks_positions = True
    head_patches = ("forward_head",)
    block_forward = staticmethod(_block_forward)

    def context(self, blk, args, kwargs):
        return kwargs.get("shared_rel_pos_bias", args[0] if args else None)

    def attn_branch(self, blk, x, rt, shared, need):
        st, attn = rt.state, blk.attn
        bias = attn._get_rel_pos_bias() if attn.relative_position_bias_table is not None else None  # (1, H, N0, N0)
        if shared is not None:
            bias = shared if bias is None else bias + shared
        bias = None if bias is None else gather_bias(bias, st.pos)
        y, m, imp = attention(attn, blk.norm1(x), st.size, bias=bias, **_attn_kwargs(rt, need))
        return _call(blk.drop_path1, _scale(blk.gamma_1, y)), m, imp

    def mlp_branch(self, blk, x):
        return _call(blk.drop_path2, _scale(blk.gamma_2, blk.mlp(blk.norm2(x))))

    def pool(self, model, x, pool_type=None):
        return _pool_avg_or_token(model, x)

    def forward_head(self, model: nn.Module, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Patched ``forward_head``: timm inlines an unweighted mean here; this one weights by size."""
        if model.global_pool:
            x = _pool_avg_or_token(model, x)
        x = model.head_drop(model.fc_norm(x))
        return x if pre_logits else model.head(x)


def _pool_avg_or_token(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Beit / RelPos pooling (``avg`` over patch tokens or the class token), size-weighted."""
    size = getattr(model, "_rapid_runtime").state.size
    if model.global_pool != "avg":
        return x[:, 0]
    P = model.num_prefix_tokens
    if size is None:
        return x[:, P:].mean(dim=1)
    w = size[:, P:].to(x.dtype)  # (B, T, 1)
    return (x[:, P:] * w).sum(1) / w.sum(1)  # (B, C) size-weighted mean, padding excluded


class _RelPos(_Beit):
    """``VisionTransformerRelPos``: ``RelPosBias`` / ``RelPosMlp`` bias gathered for the remaining tokens."""

    name = "relpos"

    def context(self, blk, args, kwargs):
        return kwargs.get("shared_rel_pos", args[0] if args else None)

    def attn_branch(self, blk, x, rt, shared, need):
        from timm.models.vision_transformer_relpos import ResPostRelPosBlock

        st, attn = rt.state, blk.attn
        bias = attn.rel_pos.get_bias() if attn.rel_pos is not None else shared  # (1, H, N0, N0), timm's precedence
        bias = None if bias is None else gather_bias(bias, st.pos)
        kw = _attn_kwargs(rt, need)
        if isinstance(blk, ResPostRelPosBlock):
            y, m, imp = attention(attn, x, st.size, bias=bias, **kw)
            return _call(blk.drop_path1, blk.norm1(y)), m, imp
        y, m, imp = attention(attn, blk.norm1(x), st.size, bias=bias, **kw)
        return _call(blk.drop_path1, _call(blk.ls1, y)), m, imp

    def mlp_branch(self, blk, x):
        from timm.models.vision_transformer_relpos import ResPostRelPosBlock

        if isinstance(blk, ResPostRelPosBlock):
            return _call(blk.drop_path2, blk.norm2(blk.mlp(x)))
        return _call(blk.drop_path2, _call(blk.ls2, blk.mlp(blk.norm2(x))))

    def const_macs(self, model):
        """``RelPosMlp`` computes its bias table with an MLP once per forward (per block, or shared once)."""
        mods = [model.shared_rel_pos] if model.shared_rel_pos is not None else [b.attn.rel_pos for b in model.blocks]
        total = 0
        for m in mods:
            coords = getattr(m, "rel_coords_log", None)
            if m is not None and coords is not None and getattr(m, "mlp", None) is not None:
                total += coords.numel() // coords.shape[-1] * linear_macs(m.mlp)
        return total


VIT, VIT_BLOCKS, EVA, BEIT, RELPOS = Adapter(), _VitBlocks(), _Eva(), _Beit(), _RelPos()


# ---- checks ---------------------------------------------------------------------------------------------------------

_HINT = "see rapid_search.check_model for the supported families"


def _refuse(msg: str) -> None:
    raise UnsupportedModelError(f"{msg} — {_HINT}")


def _forward_is(mod: nn.Module, cls: type) -> bool:
    return isinstance(mod, cls) and type(mod).forward is cls.forward


def _check_patch_embed(model: nn.Module) -> None:
    from timm.layers import HybridEmbed, PatchEmbed

    pe = getattr(model, "patch_embed", None)
    if _forward_is(pe, PatchEmbed):
        if not isinstance(getattr(pe, "proj", None), nn.Conv2d):
            _refuse(f"the PatchEmbed projection is {type(pe.proj).__name__}, not a Conv2d")
    elif not _forward_is(pe, HybridEmbed):
        _refuse(f"{type(model).__name__} embeds patches with {type(pe).__name__}, not timm's PatchEmbed or HybridEmbed")
    if not isinstance(getattr(pe, "num_patches", None), int) or getattr(pe, "img_size", None) is None:
        _refuse(f"{type(pe).__name__} has no fixed img_size / num_patches; create the model with a fixed img_size")
    if getattr(pe, "output_fmt", None) is not None and str(getattr(pe.output_fmt, "value", pe.output_fmt)) not in ("NCHW", "NHWC", "NLC"):
        _refuse(f"patch embedding output format {pe.output_fmt} is not supported")


def _check_attn(i: int, attn: nn.Module, allowed: tuple) -> None:
    if not any(_forward_is(attn, c) for c in allowed):
        _refuse(f"block {i} uses {type(attn).__name__}, which the runtime cannot compose ({', '.join(c.__name__ for c in allowed)} are supported)")
    if getattr(attn, "qkv", None) is None and getattr(attn, "q_proj", None) is None:
        _refuse(f"block {i}'s {type(attn).__name__} has neither qkv nor q/k/v projections")


def _check_blocks(model: nn.Module, blocks: tuple, attns: tuple, what: str) -> None:
    """Every block's forward is one of ``blocks`` (``what`` names them) and its attention one of ``attns``."""
    for i, blk in enumerate(model.blocks):
        if not any(_forward_is(blk, c) for c in blocks):
            _refuse(f"block {i} is {type(blk).__name__}, not {what}")
        _check_attn(i, blk.attn, attns)


def _check_head(model: nn.Module) -> None:
    from timm.layers import AttentionPoolLatent

    pool = getattr(model, "attn_pool", None)
    if pool is not None:
        if not _forward_is(pool, AttentionPoolLatent):
            _refuse(f"attention pooling {type(pool).__name__} is not timm's AttentionPoolLatent")
        if pool.pos_embed is not None:
            _refuse("attention pooling with a positional embedding depends on the token count")
    elif model.global_pool not in ("token", "avg", "max", "avgmax", ""):
        _refuse(f"global_pool={model.global_pool!r} is not supported; use 'token', 'avg' or 'map'")


def _check_vit(model: nn.Module) -> Adapter:
    from timm.layers import Attention
    from timm.models.vision_transformer import Block, ParallelThingsBlock, ResPostBlock

    _check_patch_embed(model)
    _check_head(model)
    plain = True
    for i, blk in enumerate(model.blocks):
        if _forward_is(blk, Block) and _forward_is(blk.attn, Attention):
            continue
        plain = False
        if _forward_is(blk, ParallelThingsBlock):
            attns = [a.attn for a in blk.attns]
        elif _forward_is(blk, ResPostBlock) or _forward_is(blk, Block):
            attns = [blk.attn]
        else:
            why = " (attention and MLP see the same input, so tokens cannot be reduced between them)" if "Parallel" in type(blk).__name__ else ""
            _refuse(f"block {i} is {type(blk).__name__}, not a timm Block, ResPostBlock or ParallelThingsBlock{why}")
        for a in attns:
            _check_attn(i, a, (Attention,))
    return VIT if plain else VIT_BLOCKS


def _check_eva(model: nn.Module) -> Adapter:
    from timm.layers import AttentionRope
    from timm.models.eva import EvaAttention, EvaBlock, EvaBlockPostNorm

    _check_patch_embed(model)
    _check_head(model)
    _check_blocks(model, (EvaBlock, EvaBlockPostNorm), (EvaAttention, AttentionRope), "EvaBlock or EvaBlockPostNorm")
    for i, blk in enumerate(model.blocks):
        if int(getattr(blk.attn, "num_prefix_tokens", model.num_prefix_tokens)) != model.num_prefix_tokens:
            _refuse(f"block {i} applies RoPE after {blk.attn.num_prefix_tokens} prefix tokens but the model has {model.num_prefix_tokens}")
    return EVA


def _check_beit(model: nn.Module) -> Adapter:
    from timm.models.beit import Attention, Block

    _check_patch_embed(model)
    if model.global_pool not in ("avg", "token", ""):
        _refuse(f"global_pool={model.global_pool!r} is not supported")
    _check_blocks(model, (Block,), (Attention,), "BEiT's Block")
    return BEIT


def _check_relpos(model: nn.Module) -> Adapter:
    from timm.layers.pos_embed_rel import RelPosBias, RelPosMlp
    from timm.models.vision_transformer_relpos import RelPosAttention, RelPosBlock, ResPostRelPosBlock

    _check_patch_embed(model)
    if model.global_pool not in ("avg", "token", ""):
        _refuse(f"global_pool={model.global_pool!r} is not supported")
    _check_blocks(model, (RelPosBlock, ResPostRelPosBlock), (RelPosAttention,), "RelPosBlock or ResPostRelPosBlock")
    for m in [model.shared_rel_pos] + [b.attn.rel_pos for b in model.blocks]:
        if m is not None and type(m) not in (RelPosBias, RelPosMlp):
            _refuse(f"relative position module {type(m).__name__} is not RelPosBias or RelPosMlp")
    return RELPOS


def adapter_for(model: nn.Module) -> Adapter:
    """The :class:`Adapter` of ``model``'s family, or :class:`UnsupportedModelError` (one line) why not."""
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"{type(model).__name__} is not a torch module — pass a timm ViT model")
    from timm.models.beit import Beit
    from timm.models.eva import Eva
    from timm.models.vision_transformer import VisionTransformer
    from timm.models.vision_transformer_relpos import VisionTransformerRelPos

    name = type(model).__name__
    try:
        if isinstance(model, VisionTransformer):
            return _check_vit(model)
        if isinstance(model, Eva):
            return _check_eva(model)
        if isinstance(model, Beit):
            return _check_beit(model)
        if isinstance(model, VisionTransformerRelPos):
            return _check_relpos(model)
    except UnsupportedModelError:
        raise
    except Exception as e:  # noqa: BLE001 - a fact the checks read is missing or odd: refuse, never crash
        raise UnsupportedModelError(f"{name} lacks what the runtime reads ({type(e).__name__}: {e}) — {_HINT}") from None
    if name == "NaFlexVit":
        raise UnsupportedModelError(
            "NaFlexVit (native-aspect ViT) takes patch dictionaries and masks, which the runtime does not patch — "
            "use its fixed-size counterpart (a vit_* model)"
        )
    raise UnsupportedModelError(
        f"{name} is not a timm VisionTransformer, Eva, Beit or VisionTransformerRelPos — rapid-search supports vit_*, deit*, "
        "eva02_*, vit_*_rope_*, *dinov3*, beit*, vit_relpos_* models (e.g. deit_small_patch16_224)"
    )


def family_name(model: nn.Module) -> str:
    """Family of a supported model (``vit``, ``vit-blocks``, ``eva``, ``beit``, ``relpos``)."""
    return adapter_for(model).name


def _patched_pool(self: nn.Module, x: torch.Tensor, pool_type: Optional[str] = None) -> torch.Tensor:
    """Patched ``pool`` (bound to the model): the adapter's size-aware pooling."""
    return self._rapid_runtime.adapter.pool(self, x, pool_type)


def _patched_forward_head(self: nn.Module, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
    """Patched ``forward_head`` (bound to the model) of families that pool inside it."""
    return self._rapid_runtime.adapter.forward_head(self, x, pre_logits)


_PATCHES = {"pool": _patched_pool, "forward_head": _patched_forward_head}


def bind(adapter: Adapter, model: nn.Module) -> tuple[str, ...]:
    """Replace the model methods ``adapter`` patches; returns their names (for ``remove``)."""
    for attr in adapter.head_patches:
        setattr(model, attr, types.MethodType(_PATCHES[attr], model))
    return adapter.head_patches


def check_model(model: nn.Module) -> None:
    """Raise :class:`UnsupportedModelError` (one line, saying why) unless ``model`` can be patched.

    Public API for "is my model supported?": it never raises anything else, for any timm model.
    Supported families: timm ``VisionTransformer`` (ViT, DeiT, DeiT-III, distilled DeiT,
    registers, avg/max pooling, ``global_pool='map'`` attention pooling as in SigLIP,
    ``ResPostBlock`` and ``ParallelThingsBlock`` blocks), ``Eva`` (EVA-02, DINOv3, PE,
    ``vit_*_rope_*``: RoPE, SwiGLU, LayerScale), ``Beit`` and ``VisionTransformerRelPos``
    (relative position bias). Refused: ``NaFlexVit``, ``ParallelScalingBlock``, ``DiffAttention``,
    hybrid (convolutional-stem) patch embeddings and any other model.

    Example:
        >>> import timm, rapid_search
        >>> rapid_search.check_model(timm.create_model("test_vit"))  # returns None: supported
    """
    adapter_for(model)
