"""Text that is safe to print on a terminal, whatever file it came from.

Schedules, search spaces, file names and driver messages are untrusted: an ANSI escape sequence
in a schedule's ``provenance`` would recolour, move the cursor or retitle the terminal of whoever
runs ``rapid-search show``. :func:`printable` makes every control character visible as an escape
(``\\x1b``) instead of sending it; newline and tab are kept. Needs only the standard library.

Example:
    >>> printable("ok\\x1b[2Jgone")
    'ok\\\\x1b[2Jgone'
"""

from __future__ import annotations

import re

__all__ = ["printable"]

#: C0 controls except tab and newline, DEL, C1 controls, and the Unicode bidirectional overrides
#: and isolates (they reorder what is shown).
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """``text`` with every control character (C0 but tab and newline, DEL, C1, bidi overrides)
    written as a visible escape (``\\x1b``, ``\\u202e``) and undecodable bytes of file names
    (lone surrogates) as ``\\udcXX``, so that printing it cannot drive the terminal or fail to
    encode."""
    text = _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(text))
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
