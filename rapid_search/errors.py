"""The root of every error rapid-search raises on purpose (as Optuna's ``OptunaError``).

Each such error subclasses :class:`RapidSearchError` and keeps its other base (``ValueError``
mostly), so ``except ValueError`` clauses still catch it. Its message is one line that says what
to do; the command line prints it and exits with status 2. Anything else is a bug and gets a
traceback. Part of the runtime: imports nothing.
"""

from __future__ import annotations

__all__ = ["RapidSearchError"]


class RapidSearchError(Exception):
    """An error rapid-search raises on purpose; the message says what to do."""
