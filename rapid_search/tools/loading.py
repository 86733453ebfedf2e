"""Loading timm models the ordinary way, with one-line errors instead of tracebacks.

Pretrained weights come through timm's standard Hugging Face loading, so ``HF_HUB_CACHE`` and
``HF_HUB_OFFLINE`` work as usual; ``checkpoint`` loads local weights with
``torch.load(..., weights_only=True)`` (or safetensors): loading never executes code from files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from ..runtime.families import check_model
from ..errors import RapidSearchError

__all__ = ["ModelLoadError", "load_model"]


class ModelLoadError(RapidSearchError, ValueError):
    """The model could not be created or its weights loaded; the message says what to do."""


def _load_state_dict(path: Path) -> dict:
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:  # pragma: no cover - safetensors comes with timm
            raise ModelLoadError("reading .safetensors needs the safetensors package — pip install safetensors") from None
        try:
            return load_file(str(path))
        except Exception as e:  # SafetensorError (header too large, truncated), OSError
            raise ModelLoadError(
                f"cannot read checkpoint {path}: {e.__class__.__name__} (not a complete .safetensors file) — "
                "pass a .safetensors file saved with safetensors.torch.save_file, or a state dict"
            ) from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, refused globals, truncated files
        raise ModelLoadError(
            f"cannot read checkpoint {path}: {e.__class__.__name__} — pass a state dict saved with torch.save(model.state_dict()) or a .safetensors file"
        ) from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelLoadError(f"checkpoint {path} does not hold a state dict of tensors — save model.state_dict()")
    return obj


def load_model(
    name: str,
    *,
    pretrained: bool = True,
    checkpoint: Optional[Union[str, os.PathLike]] = None,
    device: Union[str, torch.device] = "cpu",
    dtype: Union[str, torch.dtype, None] = None,
) -> nn.Module:
    """Create a timm ViT in eval mode on ``device``, with pretrained or local weights.

    Args:
        name: timm model name (e.g. ``deit_tiny_patch16_224``).
        pretrained: Load timm's pretrained weights (ignored when ``checkpoint`` is given).
        checkpoint: Local weights file (state dict, ``.pth``/``.pt``/``.bin`` or ``.safetensors``).
        device: Where to put the model.
        dtype: Parameter dtype (``float32``, ``bfloat16``, ``float16``); None keeps float32.

    Raises:
        ModelLoadError: Unknown name, weights unavailable (offline, not cached), bad checkpoint.
        UnsupportedModelError: The model is not a supported ViT.
    """
    import timm

    if not timm.is_model(name):
        raise ModelLoadError(f"unknown timm model {name!r} — pick one from timm.list_models('vit_*') or timm.list_models('deit*')")
    try:
        model = timm.create_model(name, pretrained=pretrained and checkpoint is None)
    except Exception as e:  # hub errors: offline, not cached, no network
        if not pretrained:
            raise ModelLoadError(f"cannot create {name}: {e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
        raise ModelLoadError(
            f"cannot load pretrained weights for {name} ({e.__class__.__name__}): not in the Hugging Face cache ({cache}) "
            "and the hub is unreachable — set HF_HUB_CACHE to a cache that has them, or pass --checkpoint FILE"
        ) from None
    check_model(model)
    if checkpoint is not None:
        path = Path(checkpoint)
        from ..outputs import input_problem

        problem = input_problem(path)
        if problem is not None:
            raise ModelLoadError(f"checkpoint {path} {problem} — check the path")
        state = _load_state_dict(path)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            first = str(e).splitlines()[0] if str(e) else ""
            raise ModelLoadError(f"checkpoint {path} does not fit {name}: {first} — pass weights for this architecture") from None
    if dtype is not None:
        from .measure import parse_dtype

        model = model.to(parse_dtype(dtype))
    return model.eval().to(device)
