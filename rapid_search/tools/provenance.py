"""Versions recorded in what the tools write (schedules, benchmark results), collected once."""

from __future__ import annotations

import importlib
import platform

__all__ = ["versions"]


def versions(*more: str) -> dict[str, str]:
    """``rapid_search``, ``torch``, ``timm`` and ``python`` versions, plus those of the packages ``more``
    (e.g. ``"optuna"``, ``"numpy"``)."""
    from .. import __version__

    out = {"rapid_search": __version__, "python": platform.python_version()}
    for name in ("torch", "timm", *more):
        out[name] = str(importlib.import_module(name).__version__)
    return out
