"""The reducing forward every family shares: run state, attention with proportional attention,
the per-block reduction (lean fixed-count path or general path) and size-aware pooling.

Reducing blocks run code adapted from timm 1.0.31: :func:`_attention` re-states
``timm.layers.Attention.forward`` (gate, qkv, q/k norm, SDPA or softmax attention, norm, proj) and
adds ToMe's proportional attention (``log(size)`` bias), the head-averaged keys (the similarity
metric of ``similarity: keys`` and ``tome`` layers; ``similarity: tokens`` layers compare the
residual stream instead, in :func:`_reduce`) and the class-token importance row (only where a merge
or EViT needs it: read from the attention's probabilities when they are computed explicitly, as small
attentions on CPU are (:data:`EXPLICIT_ATTENTION_MAX`), else computed separately at O(N) cost);
:func:`_block_forward` re-states
``timm.models.vision_transformer.Block.forward`` (pre-norm, LayerScale, drop-path) with the
reduction between attention and MLP. Both use the block's own modules (skipping those that would
return their input unchanged, :func:`_call`), and ``tests/test_parity.py``
checks them against timm's forward on every supported family (a reducing schedule that removes
nothing must give timm's output), so a change in timm fails a test. The model families
(:mod:`rapid_search.runtime.families`) build on these pieces; :mod:`rapid_search.runtime.patch`
binds them to a model.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .ops import (
    FixedReduction,
    bipartite_soft_matching,
    fixed_evit,
    fixed_merge,
    fixed_prune,
    follow_positions,
    importance_merge,
    importance_prune,
    merge_source,
    merge_wavg,
    peak_norm,
    redundancy_prune,
)
from .ops import _as, _wide
from .schedule import LayerSpec, Schedule, ScheduleError

_ATTR = "_rapid_runtime"

#: The attention's similarity metric, computed on demand: ``() -> (B, N, hd)`` head-averaged keys.
Metric = Callable[[], torch.Tensor]


class _State:
    """Per-forward token state shared by the patched blocks of one model."""

    def __init__(self, trace_source: bool) -> None:
        self.trace_source = trace_source
        self.reset()

    def reset(self) -> None:
        self.size: Optional[torch.Tensor] = None  # (B, N, 1) token sizes; 0 marks padding
        self.n_valid: Optional[torch.Tensor] = None  # (B,) real tokens per image when ragged
        self.merged = False
        self.source: Optional[torch.Tensor] = None  # (B, N, N0) patches covered by each token
        self.pos: Optional[torch.Tensor] = None  # (B, N) input position of each token (RoPE / relative-bias families)
        self.counts: list[Any] = []  # tokens after each block (int, or (B,) tensor when ragged)

    def record(self, x: torch.Tensor) -> None:
        self.counts.append(x.shape[1] if self.n_valid is None else self.n_valid)


class _Runtime:
    """What ``apply`` attached to a model; everything ``remove`` needs to undo it."""

    def __init__(self, model: nn.Module, schedule: Schedule, trace_source: bool) -> None:
        self.schedule = schedule
        self.state = _State(trace_source)
        self.num_prefix = int(model.num_prefix_tokens)
        self.num_tokens = schedule.model.num_tokens
        self.batch = 0
        self.hook: Optional[torch.utils.hooks.RemovableHandle] = None  # the empty schedule's pre-hook
        self.lean = True  # fixed-count layers take the lean path (tests switch it off to compare)
        self.adapter: Any = None  # the model family's adapter (rapid_search.runtime.families), set by apply
        self.patched: tuple[str, ...] = ()  # model methods replaced by apply
        self.importance_rows = _class_rows(model)


def _class_rows(model: nn.Module) -> int:
    """Class-like prefix rows whose attention is the importance: 2 (class + distillation token), 1 (class
    token) or 0 (no class token: global-query importance, see :func:`_importance`)."""
    if getattr(model, "dist_token", None) is not None:
        return 2
    if getattr(model, "has_class_token", True) and getattr(model, "cls_token", None) is not None:
        return 1
    return 0


def _attention(
    attn: nn.Module,
    x: torch.Tensor,
    size: Optional[torch.Tensor],
    *,
    importance_rows: int,
    need_importance: bool,
    num_prefix: int,
) -> tuple[torch.Tensor, Metric, Optional[torch.Tensor]]:
    """timm 1.0.31 ``Attention.forward`` with proportional attention, also returning the keys' metric and the importance.

    Args:
        attn: The block's timm ``Attention`` module (its own layers are used).
        x: ``(B, N, C)`` normalised tokens.
        size: ``(B, N, 1)`` token sizes (0 = padding) or None when all are 1.
        importance_rows: Class-like prefix rows to average (0 = global query).
        need_importance: Compute the importance of patch tokens.
        num_prefix: Prefix tokens.

    Returns:
        Output ``(B, N, C)``, the metric as a function that computes it on demand (the
        head-averaged keys ``(B, N, head_dim)``, needed only by ``similarity: keys`` and ``tome``
        layers) and importance ``(B, N - num_prefix)`` or None.
    """
    B, N, _ = x.shape
    H, hd = attn.num_heads, attn.head_dim
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(B, N, 3, H, hd).permute(2, 0, 3, 1, 4)  # (3, B, H, N, hd)
    q, k, v = qkv.unbind(0)  # (B, H, N, hd) each
    q, k = _call(attn.q_norm, q), _call(attn.k_norm, k)
    bias = None if size is None else _as(size.log(), q.dtype).view(B, 1, 1, N)  # (B, 1, 1, N) proportional attention
    rows = importance_rows if need_importance else 0
    out, probs = _sdpa(attn, q, k, v, bias, rows=rows)
    out = _call(attn.norm, out.transpose(1, 2).reshape(B, N, H * hd))  # (B, N, A)
    if gate is not None:
        out = out * gate
    out = _call(attn.proj_drop, attn.proj(out))  # (B, N, C)
    importance = None
    if need_importance:
        importance = _importance(q, k, attn.scale, size, rows=importance_rows, num_prefix=num_prefix, bias=bias, probs=probs)
    return out, lambda: k.mean(dim=1), importance  # metric: (B, N, hd) head-averaged keys, as ToMe


#: Largest attention matrix (``B * H * N * N`` scores) that a reducing block computes explicitly on CPU
#: although the module asks for the fused kernel. On CPU the fused kernel
#: (``_scaled_dot_product_flash_attention_for_cpu``) is no faster than matmul + softmax + matmul while
#: the scores fit in the caches, and a model that runs explicitly gets the class rows' attention, the
#: merge's importance, for free; beyond that the fused kernel wins (batch 32 at 197 tokens: 16 vs
#: 25 ms with the earlier matmul form, 14 vs 16 ms with the baddbmm form below, on the 2-core AMD
#: EPYC this was measured on, ``benchmarks/attention-cpu.txt`` from ``benchmarks/overhead.py
#: --attention``; batch 8 at 197 tokens reads 1.0x to 1.7x). 2**18
#: scores is batch 1 at 197 tokens with 3 heads, or batch 32 at 23 tokens. Half precision on CPU
#: computes the explicit attention in float32 (its inputs cast up, its output cast back), as the fused
#: kernel accumulates: hand-set RAPID at batch 1 is 5% faster so in bfloat16 and 3% in float16 than on
#: the fused kernel with the importance row computed apart (``benchmarks/against.py --dtype``, README
#: "Speed"), and its outputs are as close to float32's (KL to the float32 model over 500 real images at
#: 70/50/35% GFLOPs: 0.0033/0.0271/0.0602 against the fused kernel's 0.0035/0.0269/0.0678). Other devices
#: always take the fused kernel. Set to 0 to keep the fused kernel everywhere.
EXPLICIT_ATTENTION_MAX = 1 << 18


def _explicit(attn: nn.Module, q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether :func:`_sdpa` computes the scores explicitly (see :data:`EXPLICIT_ATTENTION_MAX`)."""
    if not attn.fused_attn:
        return True
    B, H, N, _ = q.shape
    return q.device.type == "cpu" and B * H * N * k.shape[-2] <= EXPLICIT_ATTENTION_MAX


def _sdpa(
    attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], *, rows: int = 0
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Attention of ``(B, H, N, hd)`` queries and ``(B, H, M, hd)`` keys and values with an additive ``mask``
    broadcastable to ``(B, H, N, M)`` (or None): fused (``F.scaled_dot_product_attention``) or, where
    :func:`_explicit` says so, explicitly as timm 1.0.31 computes it unfused (scaled scores, softmax, the
    module's dropout), with the heads folded into the batch so that the scores are one ``baddbmm`` (scale and
    mask included) and the output one ``bmm``: at batch 1 each call ``torch.matmul`` and an elementwise op would
    add is dispatch time the reduction's blocks pay. On CPU a half-precision explicit attention runs in
    float32 and returns its output in the inputs' dtype (see :data:`EXPLICIT_ATTENTION_MAX`).

    Args:
        rows: Leading query rows whose attention probabilities the caller wants (the importance).

    Returns:
        ``(B, H, N, hd)`` output and the first ``rows`` rows of the probabilities ``(B, H, rows, M)``
        when they were computed explicitly in float32 or wider, else None (fused kernel, half
        precision off the CPU, or ``rows = 0``).
    """
    if not _explicit(attn, q, k):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=attn.attn_drop.p if attn.training else 0.0), None
    B, H, N, hd = q.shape
    M = k.shape[-2]
    dtype = q.dtype
    wide = _wide(dtype) if q.device.type == "cpu" else dtype  # elsewhere (fused_attn off) as timm computes it
    if wide != dtype:  # half precision on CPU: scores, softmax and output in float32, as the fused kernel accumulates
        q, k, v = q.to(wide), k.to(wide), v.to(wide)
        mask = None if mask is None else mask.to(wide)
    q3, k3, v3 = q.reshape(B * H, N, hd), k.reshape(B * H, M, hd), v.reshape(B * H, M, hd)  # views at batch 1, else copies (as matmul makes)
    kt = k3.transpose(1, 2)  # (B * H, hd, M)
    if mask is None:
        a = torch.bmm(q3, kt).mul_(attn.scale)  # (B * H, N, M)
    else:
        m = mask.expand(B, H, -1, -1)  # (B, H, 1 or N, M)
        a = torch.baddbmm(m.reshape(B * H, m.shape[2], M), q3, kt, alpha=attn.scale)  # (B * H, N, M) mask + scale * q k^T
    p = a.softmax(dim=-1)  # (B * H, N, M)
    head = p.view(B, H, N, M)[:, :, :rows] if rows > 0 and _wide(p.dtype) == p.dtype else None  # (B, H, rows, M)
    out = torch.bmm(_call(attn.attn_drop, p), v3).view(B, H, N, hd)  # (B, H, N, hd)
    return (out if wide == dtype else out.to(dtype)), head


def _call(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``, or ``x`` itself where the call would return it unchanged: an ``nn.Identity``, or an
    ``nn.Dropout`` in eval mode or with ``p = 0``, that has no hooks of its own. A skipped call saves its
    dispatch (0.6 µs for an identity, 2.5 µs for a dropout on the CPU this was measured on), which a
    batch-1 forward pays a few times in every reducing block (timm's ``q_norm``, ``norm``, dropouts).
    Global module hooks (``torch.nn.modules.module.register_module_forward_hook``) do not see a skipped call.

    Under ``torch.compile`` the call is always made: Dynamo inlines it (an identity or inactive dropout
    adds nothing to the graph), and reading the hook dictionaries here would add two guards per module
    (about 230 for DeiT-Tiny's hand-set schedule, 0.35% of a batch-1 compiled forward on that CPU)."""
    if torch.compiler.is_compiling():
        return module(x)
    t = type(module)
    if (t is nn.Identity or (t is nn.Dropout and (not module.training or module.p == 0.0))) and not (
        module._forward_hooks or module._forward_pre_hooks
    ):
        return x
    return module(x)


def _importance(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    size: Optional[torch.Tensor],
    *,
    rows: int,
    num_prefix: int,
    bias: Optional[torch.Tensor],
    probs: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Importance of the patch tokens: the class-like rows' attention, head- and row-averaged, O(N).

    Args:
        q, k: ``(B, H, N, hd)`` queries and keys (after any norm or rotation the attention applies).
        scale: The attention's logit scale.
        size: ``(B, N, 1)`` token sizes or None (all 1).
        rows: Class-like prefix rows to average; 0 = no class token: the size-weighted mean query
            over the patch tokens stands in for it ("global query").
        num_prefix: Prefix tokens.
        bias: Added to the ``(B, H, R, N)`` logits (proportional attention, position bias) or None.
        probs: The attention's own probabilities of the ``rows`` class rows ``(B, H, rows, N)``, float32
            or wider, when it computed them (:func:`_sdpa`): the same softmax, not computed twice.

    Returns:
        ``(B, T)`` importance, in float32 (or wider): the softmax is never taken in half precision.
    """
    if probs is not None:
        return probs.mean(dim=(1, 2))[:, num_prefix:]  # (B, T)
    if rows > 0:
        qr = q[:, :, :rows]  # (B, H, R, hd) class (and distillation) token queries
    else:
        w = torch.ones_like(q[:, 0, :, :1]) if size is None else size  # (B, N, 1)
        w = w[:, None, num_prefix:].to(q.dtype)  # (B, 1, T, 1)
        qr = (q[:, :, num_prefix:] * w).sum(2, keepdim=True) / w.sum(2, keepdim=True)  # (B, H, 1, hd)
    logits = (qr * scale) @ k.transpose(-2, -1)  # (B, H, R, N)
    if bias is not None:
        logits = logits + bias
    return _as(logits, _wide(logits.dtype)).softmax(dim=-1).mean(dim=(1, 2))[:, num_prefix:]  # (B, T)


def _reduce_fixed(x: torch.Tensor, metric: Optional[torch.Tensor], importance: Optional[torch.Tensor], layer: LayerSpec, rt: _Runtime) -> torch.Tensor:
    """The lean path: a fixed-count layer on a batch without padding (every shape from the schedule,
    no host synchronisation; see :class:`rapid_search.runtime.ops.FixedReduction`)."""
    st, P = rt.state, rt.num_prefix
    red: Optional[FixedReduction]
    if layer.op == "prune":
        red = fixed_prune(metric, layer.r, num_prefix=P)
    elif layer.op == "merge":
        red = fixed_merge(metric, importance, layer.r, num_prefix=P, protect=float(layer.protect))  # type: ignore[arg-type]
    else:
        red = fixed_evit(importance, layer.r, num_prefix=P)  # type: ignore[arg-type]
    if red is None:
        return x
    if st.trace_source:
        st.source = merge_source(red, x, st.source)
    if st.pos is not None:  # positions follow tokens (RoPE / relative-bias families)
        st.pos = follow_positions(red, st.pos)
    if layer.op == "merge":  # MLERP fused into the merge, reusing the metric's norms when the metric is x itself
        x, st.size = red.merge(x, st.size, peak=layer.merged_norm == "max", norm=red.metric_norm if metric is x else None)
        st.merged = True
    else:
        x = red(x)
        if st.size is not None:
            st.size = red(st.size)
    return x


def _reduce(x: torch.Tensor, keys: Metric, importance: Optional[torch.Tensor], layer: LayerSpec, rt: _Runtime) -> torch.Tensor:
    """Apply one block's reduction to ``x`` ``(B, N, C)`` and update the shared state (``keys``: the
    attention's metric, computed only for the layers that compare tokens by it)."""
    st, P = rt.state, rt.num_prefix
    if layer.op == "evit":
        metric = None  # importance only
    elif layer.similarity == "tokens":
        metric = x  # (B, N, C) the residual stream itself (LayerSpec.similarity)
    else:
        metric = keys()  # (B, N, hd)
    if rt.lean and layer.threshold is None and st.n_valid is None and layer.op in ("prune", "merge", "evit"):
        return _reduce_fixed(x, metric, importance, layer, rt)
    if layer.op == "tome":
        red = bipartite_soft_matching(metric, layer.r, num_prefix=P)
        merging = True
    elif layer.op == "prune":
        red = redundancy_prune(metric, layer.r, num_prefix=P, threshold=layer.threshold, n_valid=st.n_valid)
        merging = False
    elif layer.op == "merge":
        red = importance_merge(
            metric, importance, layer.r, num_prefix=P, protect=float(layer.protect), threshold=layer.threshold, n_valid=st.n_valid
        )
        merging = True
    elif layer.op == "evit":
        red = importance_prune(importance, layer.r, num_prefix=P, n_valid=st.n_valid)
        merging = False
    else:  # pragma: no cover - validated by Schedule
        raise ScheduleError(f"unknown op {layer.op!r}")
    if red is None:
        return x
    if st.pos is not None:
        st.pos = follow_positions(red, st.pos)
    if st.trace_source:
        st.source = merge_source(red, x, st.source)
    if merging:
        merged, st.size = merge_wavg(red, x, st.size)
        x = peak_norm(red, x, merged) if layer.merged_norm == "max" else merged
        st.merged = True
    else:
        x = red(x)
        if st.size is not None:
            st.size = red(st.size)
    valid = red.valid_mask()  # (B, L) or None
    if valid is not None:
        if st.size is None:
            st.size = torch.ones_like(x[..., :1], dtype=_wide(x.dtype))
        st.size = st.size * valid[..., None].to(st.size.dtype)  # padding gets size 0
        st.n_valid = red.n_keep
    else:
        st.n_valid = None
        if not st.merged:
            st.size = None  # all sizes are 1 again: back to the fast path
    return x


def _block_forward(self: nn.Module, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
    """timm 1.0.31 ``Block.forward`` with the reduction between attention and MLP (bound to the
    block, so ``copy.deepcopy`` rebinds it)."""
    rt: _Runtime = self._rapid_rt
    index: int = self._rapid_index
    layer: LayerSpec = self._rapid_layer
    st = rt.state
    if index == 0:
        st.reset()
        rt.batch = x.shape[0]
        if x.shape[1] != rt.num_tokens:
            raise _wrong_tokens(x.shape[1], rt.num_tokens)
        st.record(x)
    if not layer.reduces and st.size is None:
        x = type(self).forward(self, x, attn_mask=attn_mask, is_causal=is_causal)  # identity fast path: timm's own forward
        st.record(x)
        return x
    if attn_mask is not None or is_causal:
        raise ValueError("attention masks are not supported together with token reduction")
    y, metric, importance = _attention(
        self.attn,
        self.norm1(x),
        st.size,
        importance_rows=rt.importance_rows,
        need_importance=layer.reduces and layer.op in ("merge", "evit"),
        num_prefix=rt.num_prefix,
    )
    x = x + _call(self.drop_path1, _call(self.ls1, y))
    if layer.reduces:
        x = _reduce(x, metric, importance, layer, rt)
    x = x + _call(self.drop_path2, _call(self.ls2, self.mlp(self.norm2(x))))
    st.record(x)
    return x


def _pool(self: nn.Module, x: torch.Tensor, pool_type: Optional[str] = None) -> torch.Tensor:
    """Patched ``VisionTransformer.pool``: size-weighted, padding-aware average/max pooling."""
    size = getattr(self, _ATTR).state.size
    pool_type = self.global_pool if pool_type is None else pool_type
    if size is None or pool_type in ("token", ""):
        return type(self).pool(self, x, pool_type=pool_type)
    start = 0 if getattr(self, "pool_include_prefix", False) else self.num_prefix_tokens
    xs, w = x[:, start:], size[:, start:]  # (B, T, C), (B, T, 1)
    avg = ((_as(xs, w.dtype) * w).sum(1) / w.sum(1)).to(x.dtype)  # (B, C) size-weighted mean (float32 or wider), padding excluded
    if pool_type == "avg":
        return avg
    mx = xs.masked_fill(w == 0, float("-inf")).amax(1)  # (B, C)
    return mx if pool_type == "max" else 0.5 * (avg + mx)


def _wrong_tokens(got: int, want: int) -> ScheduleError:
    return ScheduleError(
        f"the input gives {got} tokens but the schedule was made for {want} — "
        "feed images at the model's input size or make a schedule for this size"
    )
