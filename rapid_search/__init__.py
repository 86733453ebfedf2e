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

from .runtime.flops import ModelInfo, effective_r, macs_from_counts, schedule_gflops, schedule_macs, token_counts
from .runtime.patch import (
    UnsupportedModelError,
    applied,
    apply,
    check_model,
    is_patched,
    last_sizes,
    last_source,
    last_token_counts,
    remove,
)
from .runtime.presets import (
    DEFAULT_PROTECT,
    UnreachableBudget,
    as_schedule,
    empty_schedule,
    model_info,
    rapid_schedule,
    tome_for_ratio,
    tome_schedule,
    variant_schedule,
)
from .runtime.schedule import FORMAT, OPS, Budget, LayerSpec, ModelFingerprint, Schedule, ScheduleError, load_schedule, save_schedule

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
