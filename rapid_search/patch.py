"""Model surgery: apply a schedule to a timm ``VisionTransformer`` in place, and remove it.

No timm forward code is copied. Blocks whose schedule entry is ``none`` (while no sizes or
padding are in flight) call timm's own ``Block.forward`` unchanged, so an empty schedule runs at
the unpatched model's speed with fused attention. Reducing blocks are composed from the block's
own modules (``norm1``, ``attn.qkv``, ``attn.q_norm``/``k_norm``, ``attn.norm``, ``attn.proj``,
``ls1``/``ls2``, ``drop_path1``/``drop_path2``, ``norm2``, ``mlp``), keep SDPA when
``attn.fused_attn`` is set, and compute the class-token attention row separately at O(N) cost
only where a merge needs it. Facts such as ``num_prefix_tokens`` and ``global_pool`` are read
from the model.

Example:
    >>> import timm, torch, rapid_search
    >>> model = timm.create_model("test_vit").eval()
    >>> rapid_search.apply(model, rapid_search.rapid_schedule(model, 0.5))  # doctest: +ELLIPSIS
    VisionTransformer(...)
    >>> logits = model(torch.randn(2, 3, 160, 160))
    >>> rapid_search.last_token_counts(model).shape  # (batch, depth + 1)
    torch.Size([2, 7])
    >>> rapid_search.remove(model)  # doctest: +ELLIPSIS
    VisionTransformer(...)
"""

from __future__ import annotations

import contextlib
import types
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .ops import (
    bipartite_soft_matching,
    follow_positions,
    importance_merge,
    importance_prune,
    merge_source,
    merge_wavg,
    redundancy_prune,
)
from .schedule import LayerSpec, Schedule, ScheduleError

__all__ = [
    "UnsupportedModelError",
    "check_model",
    "apply",
    "remove",
    "applied",
    "is_patched",
    "last_token_counts",
    "last_source",
    "last_sizes",
]

_ATTR = "_rapid_runtime"


class UnsupportedModelError(ValueError):
    """The model is not one of the timm ViT families rapid-search can patch (see ``check_model``)."""


def check_model(model: nn.Module) -> None:
    """Raise :class:`UnsupportedModelError` (one line, saying why) unless ``model`` can be patched.

    Public API for "is my model supported?": it never raises anything else, for any timm model.
    Supported families (``rapid_search.families``): timm ``VisionTransformer`` (ViT, DeiT, DeiT-III,
    distilled DeiT, registers, avg/max pooling, ``global_pool='map'`` attention pooling as in
    SigLIP, ``ResPostBlock`` and ``ParallelThingsBlock`` blocks), ``Eva`` (EVA-02, DINOv3, PE,
    ``vit_*_rope_*``: RoPE, SwiGLU, LayerScale), ``Beit`` and ``VisionTransformerRelPos``
    (relative position bias). Refused: ``NaFlexVit``, ``ParallelScalingBlock``, ``DiffAttention``,
    hybrid (convolutional-stem) patch embeddings and any other model.

    Example:
        >>> import timm, rapid_search
        >>> rapid_search.check_model(timm.create_model("test_vit"))  # returns None: supported
    """
    from .families import adapter_for

    adapter_for(model)


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
        self.adapter: Any = None  # the model family's adapter (rapid_search.families), set by apply
        self.patched: tuple[str, ...] = ()  # model methods replaced by apply
        if getattr(model, "dist_token", None) is not None:
            self.importance_rows = 2
        elif getattr(model, "has_class_token", True) and getattr(model, "cls_token", None) is not None:
            self.importance_rows = 1
        else:
            self.importance_rows = 0  # no class token: global-query importance (see _attention)


def _attention(
    attn: nn.Module,
    x: torch.Tensor,
    size: Optional[torch.Tensor],
    *,
    importance_rows: int,
    need_importance: bool,
    num_prefix: int,
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """timm ``Attention`` with proportional attention, also returning the metric and importance.

    Args:
        attn: The block's timm ``Attention`` module (its own layers are used).
        x: ``(B, N, C)`` normalised tokens.
        size: ``(B, N, 1)`` token sizes (0 = padding) or None when all are 1.
        importance_rows: Class-like prefix rows to average (0 = global query).
        need_importance: Compute the importance of patch tokens.
        num_prefix: Prefix tokens.

    Returns:
        Output ``(B, N, C)``, metric ``(B, N, head_dim)`` (head-averaged keys) and importance
        ``(B, N - num_prefix)`` or None.
    """
    B, N, _ = x.shape
    H, hd = attn.num_heads, attn.head_dim
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(B, N, 3, H, hd).permute(2, 0, 3, 1, 4)  # (3, B, H, N, hd)
    q, k, v = qkv.unbind(0)  # (B, H, N, hd) each
    q, k = attn.q_norm(q), attn.k_norm(k)
    bias = None if size is None else size.log().to(q.dtype)[:, None, None, :, 0]  # (B, 1, 1, N) proportional attention
    if attn.fused_attn:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    else:
        a = (q * attn.scale) @ k.transpose(-2, -1)  # (B, H, N, N)
        if bias is not None:
            a = a + bias
        out = attn.attn_drop(a.softmax(dim=-1)) @ v  # (B, H, N, hd)
    out = out.transpose(1, 2).reshape(B, N, H * hd)  # (B, N, A)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(attn.proj(out))  # (B, N, C)
    metric = k.mean(dim=1)  # (B, N, hd) head-averaged keys, as ToMe
    importance = None
    if need_importance:
        if importance_rows > 0:
            qr = q[:, :, :importance_rows]  # (B, H, R, hd) class (and distillation) token queries
        else:
            # No class token: the size-weighted mean query over real patch tokens stands in for it
            # ("global query"), still O(N).
            w = torch.ones_like(x[:, :, :1]) if size is None else size  # (B, N, 1)
            w = w[:, None, num_prefix:].to(q.dtype)  # (B, 1, T, 1)
            qr = (q[:, :, num_prefix:] * w).sum(2, keepdim=True) / w.sum(2, keepdim=True)  # (B, H, 1, hd)
        logits = (qr * attn.scale) @ k.transpose(-2, -1)  # (B, H, R, N)
        if bias is not None:
            logits = logits + bias
        importance = logits.softmax(dim=-1).mean(dim=(1, 2))[:, num_prefix:]  # (B, T)
    return out, metric, importance


def _reduce(x: torch.Tensor, metric: torch.Tensor, importance: Optional[torch.Tensor], layer: LayerSpec, rt: _Runtime) -> torch.Tensor:
    """Apply one block's reduction to ``x`` ``(B, N, C)`` and update the shared state."""
    st, P = rt.state, rt.num_prefix
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
        x, st.size = merge_wavg(red, x, st.size)
        st.merged = True
    else:
        x = red(x)
        if st.size is not None:
            st.size = red(st.size)
    valid = red.valid_mask()  # (B, L) or None
    if valid is not None:
        if st.size is None:
            st.size = torch.ones_like(x[..., :1])
        st.size = st.size * valid[..., None].to(st.size.dtype)  # padding gets size 0
        st.n_valid = red.n_keep
    else:
        st.n_valid = None
        if not st.merged:
            st.size = None  # all sizes are 1 again: back to the fast path
    return x


def _block_forward(self: nn.Module, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
    """Patched ``Block.forward`` (bound to the block, so ``copy.deepcopy`` rebinds it)."""
    rt: _Runtime = self._rapid_rt
    index: int = self._rapid_index
    layer: LayerSpec = self._rapid_layer
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
    x = x + self.drop_path1(self.ls1(y))
    if layer.reduces:
        x = _reduce(x, metric, importance, layer, rt)
    x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
    st.record(x)
    return x


def _pool(self: nn.Module, x: torch.Tensor, pool_type: Optional[str] = None) -> torch.Tensor:
    """Patched ``VisionTransformer.pool``: size-weighted, padding-aware average/max pooling."""
    size = getattr(self, _ATTR).state.size
    pool_type = self.global_pool if pool_type is None else pool_type
    if size is None or pool_type in ("token", ""):
        return type(self).pool(self, x, pool_type=pool_type)
    start = 0 if getattr(self, "pool_include_prefix", False) else self.num_prefix_tokens
    xs, w = x[:, start:], size[:, start:].to(x.dtype)  # (B, T, C), (B, T, 1)
    avg = (xs * w).sum(1) / w.sum(1)  # (B, C) size-weighted mean, padding excluded
    if pool_type == "avg":
        return avg
    mx = xs.masked_fill(w == 0, float("-inf")).amax(1)  # (B, C)
    return mx if pool_type == "max" else 0.5 * (avg + mx)


def is_patched(model: nn.Module) -> bool:
    """True if :func:`apply` patched ``model``."""
    return getattr(model, _ATTR, None) is not None


def apply(model: nn.Module, schedule: Any, *, trace_source: bool = False) -> nn.Module:
    """Patch a timm ViT in place so that it runs ``schedule``.

    Args:
        model: A supported timm ViT (see :func:`check_model`).
        schedule: Anything :func:`rapid_search.as_schedule` accepts: a :class:`Schedule`, a YAML
            path, a ToMe ``r`` (int), ``(r, inflect)`` or list of per-layer ``r``.
        trace_source: Record which input patches each token covers (``last_source``), for
            visualisation; costs memory and time.

    Returns:
        The same model, patched. Applying again replaces the previous schedule.

    Raises:
        UnsupportedModelError: The model cannot be patched.
        ScheduleError: The schedule is invalid or was made for another model.
    """
    from .families import adapter_for, bind
    from .presets import as_schedule

    adapter = adapter_for(model)
    schedule = as_schedule(schedule, model)
    if is_patched(model):
        remove(model)
    rt = _Runtime(model, schedule, trace_source)
    rt.adapter = adapter
    forward = adapter.block_forward or _block_forward
    for i, (block, layer) in enumerate(zip(model.blocks, schedule.layers)):
        block._rapid_rt, block._rapid_index, block._rapid_layer = rt, i, layer
        block.forward = types.MethodType(forward, block)
    setattr(model, _ATTR, rt)
    rt.patched = bind(adapter, model)
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`apply`: the model is exactly as it was (no attributes left behind)."""
    if not is_patched(model):
        return model
    for block in model.blocks:
        for k in ("forward", "_rapid_rt", "_rapid_index", "_rapid_layer"):
            block.__dict__.pop(k, None)
    for k in getattr(model, _ATTR).patched:
        model.__dict__.pop(k, None)
    delattr(model, _ATTR)
    return model


@contextlib.contextmanager
def applied(model: nn.Module, schedule: Any, *, trace_source: bool = False) -> Iterator[nn.Module]:
    """Context manager: ``with applied(model, schedule): model(x)``; removed on exit."""
    apply(model, schedule, trace_source=trace_source)
    try:
        yield model
    finally:
        remove(model)


def _runtime(model: nn.Module) -> _Runtime:
    rt = getattr(model, _ATTR, None)
    if rt is None:
        raise RuntimeError("model is not patched — call rapid_search.apply(model, schedule) first")
    return rt


def last_token_counts(model: nn.Module) -> torch.Tensor:
    """Tokens per image entering each block and after the last, from the last forward.

    Returns:
        ``(B, depth + 1)`` int64 tensor; column ``l`` is the count entering block ``l``.
    """
    st = _runtime(model).state
    if not st.counts:
        raise RuntimeError("no forward has run since the schedule was applied")
    B = next((c.shape[0] for c in st.counts if isinstance(c, torch.Tensor)), None)
    if B is None:
        B = _runtime(model).batch or 1
    cols = [c.detach().to("cpu", torch.long) if isinstance(c, torch.Tensor) else torch.full((B,), int(c), dtype=torch.long) for c in st.counts]
    return torch.stack(cols, dim=1)


def last_sizes(model: nn.Module) -> Optional[torch.Tensor]:
    """Token sizes ``(B, N, 1)`` after the last block of the last forward (None if all 1)."""
    return _runtime(model).state.size


def last_source(model: nn.Module) -> Optional[torch.Tensor]:
    """``(B, N, N0)`` map of input tokens covered by each final token (needs ``trace_source``)."""
    return _runtime(model).state.source
