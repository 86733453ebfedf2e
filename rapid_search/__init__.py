"""rapid-search: training-free RAPID token reduction for timm Vision Transformers.

The runtime (this package's top level) needs only torch, timm, numpy and pyyaml; the search
(``rapid_search.search``, the ``rapid-search`` command) adds optuna and rich.

Example:
    >>> import timm, torch, rapid_search
    >>> model = timm.create_model("test_vit").eval()
    >>> schedule = rapid_search.rapid_schedule(model, 0.5)   # hand-set RAPID at 50% GFLOPs
    >>> _ = rapid_search.apply(model, schedule)
    >>> model(torch.randn(1, 3, 160, 160)).shape
    torch.Size([1, 1000])
"""

__version__ = "0.1.0"

#: Public name -> the runtime module that defines it. Imported on first use (PEP 562), so that
#: ``import rapid_search.cli`` starts without torch and a Ctrl-C during start-up reaches the CLI's
#: own one-line handler.
_EXPORTS = {
    "Budget": "rapid_search.runtime.schedule",
    "DEFAULT_PROTECT": "rapid_search.runtime.presets",
    "FORMAT": "rapid_search.runtime.schedule",
    "LayerSpec": "rapid_search.runtime.schedule",
    "ModelFingerprint": "rapid_search.runtime.schedule",
    "ModelInfo": "rapid_search.runtime.flops",
    "OPS": "rapid_search.runtime.schedule",
    "Schedule": "rapid_search.runtime.schedule",
    "ScheduleError": "rapid_search.runtime.schedule",
    "UnreachableBudget": "rapid_search.runtime.presets",
    "UnsupportedModelError": "rapid_search.runtime.families",
    "applied": "rapid_search.runtime.patch",
    "apply": "rapid_search.runtime.patch",
    "as_schedule": "rapid_search.runtime.presets",
    "check_model": "rapid_search.runtime.families",
    "effective_r": "rapid_search.runtime.flops",
    "empty_schedule": "rapid_search.runtime.presets",
    "is_patched": "rapid_search.runtime.patch",
    "last_sizes": "rapid_search.runtime.patch",
    "last_source": "rapid_search.runtime.patch",
    "last_token_counts": "rapid_search.runtime.patch",
    "load_schedule": "rapid_search.runtime.schedule",
    "macs_from_counts": "rapid_search.runtime.flops",
    "model_info": "rapid_search.runtime.presets",
    "rapid_schedule": "rapid_search.runtime.presets",
    "remove": "rapid_search.runtime.patch",
    "save_schedule": "rapid_search.runtime.schedule",
    "schedule_gflops": "rapid_search.runtime.flops",
    "schedule_macs": "rapid_search.runtime.flops",
    "token_counts": "rapid_search.runtime.flops",
    "tome_for_ratio": "rapid_search.runtime.presets",
    "tome_schedule": "rapid_search.runtime.presets",
    "variant_schedule": "rapid_search.runtime.presets",
}

__all__ = [
    "__version__",
    "FORMAT",
    "OPS",
    "Budget",
    "LayerSpec",
    "ModelFingerprint",
    "ModelInfo",
    "Schedule",
    "ScheduleError",
    "UnreachableBudget",
    "UnsupportedModelError",
    "DEFAULT_PROTECT",
    "applied",
    "apply",
    "as_schedule",
    "check_model",
    "effective_r",
    "empty_schedule",
    "is_patched",
    "last_sizes",
    "last_source",
    "last_token_counts",
    "load_schedule",
    "macs_from_counts",
    "model_info",
    "rapid_schedule",
    "remove",
    "save_schedule",
    "schedule_gflops",
    "schedule_macs",
    "tome_for_ratio",
    "tome_schedule",
    "token_counts",
    "variant_schedule",
]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rapid_search' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
