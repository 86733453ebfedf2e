"""argparse ``type=`` helpers shared by the command-line entry points (no heavy imports)."""

from __future__ import annotations

import argparse
from typing import Callable

__all__ = ["DTYPES", "int_in"]

#: Floating-point dtypes a model can run in (``--dtype``).
DTYPES = ("float32", "bfloat16", "float16")


def int_in(low: int, high: int) -> Callable[[str], int]:
    """argparse type: a whole number in ``[low, high]`` (huge values are refused, not attempted).

    Example:
        >>> int_in(1, 64)("8")
        8
    """

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number — give e.g. {max(low, min(8, high))}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"{v} must be at least {low}")
        if v > high:
            raise argparse.ArgumentTypeError(f"{v} is too large — at most {high}")
        return v

    parse.__name__ = "whole number"
    return parse
