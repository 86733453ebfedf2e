"""Model surgery: apply a schedule to a supported timm ViT in place, and remove it.

Blocks whose schedule entry is ``none`` (while no sizes or padding are in flight) call timm's
own block forward unchanged, and an empty schedule leaves timm's forward untouched (a pre-hook
only notes the batch), so it runs at the unpatched model's speed with fused attention. Reducing
blocks run the shared forward of :mod:`rapid_search.runtime.engine` (adapted from timm 1.0.31, see
there) through the model family's adapter (:mod:`rapid_search.runtime.families`). Facts such as
``num_prefix_tokens`` and ``global_pool`` are read from the model.

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
from torch import nn

from .engine import _ATTR, _block_forward, _Runtime, _wrong_tokens
from .families import UnsupportedModelError, adapter_for, bind, check_model
from .presets import as_schedule
from .schedule import ScheduleError

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
    adapter = adapter_for(model)
    schedule = as_schedule(schedule, model)
    if is_patched(model):
        remove(model)
    rt = _Runtime(model, schedule, trace_source)
    rt.adapter = adapter
    setattr(model, _ATTR, rt)
    if not schedule.reduces and not trace_source:
        # identity fast path: timm's own forward runs untouched; a pre-hook only notes the batch size
        rt.hook = model.register_forward_pre_hook(_identity_record)
        return model
    forward = adapter.block_forward or _block_forward
    for i, (block, layer) in enumerate(zip(model.blocks, schedule.layers)):
        block._rapid_rt, block._rapid_index, block._rapid_layer = rt, i, layer
        block.forward = types.MethodType(forward, block)
    rt.patched = bind(adapter, model)
    return model


def _identity_record(model: nn.Module, args: tuple[Any, ...]) -> None:
    """Forward pre-hook of a model patched with an empty schedule: every block sees all tokens."""
    rt: _Runtime = getattr(model, _ATTR)
    st = rt.state
    st.reset()
    x = args[0] if args and isinstance(args[0], torch.Tensor) else None
    rt.batch = 1 if x is None else x.shape[0]
    pe = model.patch_embed
    if x is not None and x.ndim == 4 and getattr(model, "dynamic_img_size", False):  # other models reject other sizes themselves
        gh, gw = pe.dynamic_feat_size((x.shape[-2], x.shape[-1]))
        if gh * gw + rt.num_prefix != rt.num_tokens:
            raise _wrong_tokens(gh * gw + rt.num_prefix, rt.num_tokens)
    st.counts = [rt.num_tokens] * (len(rt.schedule.layers) + 1)


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`apply`: the model is exactly as it was (no attributes left behind)."""
    if not is_patched(model):
        return model
    hook = getattr(model, _ATTR).hook
    if hook is not None:
        hook.remove()
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
