"""The package's layout: no import cycle at any level, one exception root."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import rapid_search
from rapid_search.errors import RapidSearchError

PACKAGE = Path(rapid_search.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``name`` imports anywhere in its code (function-level imports included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of ``graph`` (empty when there is none)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return []

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return []


def test_no_import_cycle() -> None:
    """Modules import each other in one direction only, counting imports inside functions (they
    hide a cycle from Python, not from a reader). A package's ``__init__`` re-exporting its
    modules is not an edge back from them."""
    mods = _modules()
    known = set(mods)
    graph = {name: _imports(name, path, known) for name, path in mods.items()}
    for name in graph:  # a module importing its own package means it wants a sibling, named in the same statement
        graph[name] = {m for m in graph[name] if not (name.startswith(m + ".") and mods[m].name == "__init__.py")}
    assert _cycle(graph) == [], " -> ".join(_cycle(graph))


def test_the_cycle_finder_finds_cycles() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_every_error_of_the_project_has_one_root() -> None:
    """Every exception class the package defines subclasses RapidSearchError (the CLI turns it
    into a one-line message and exit 2); interrupts (KeyboardInterrupt) are not errors."""
    classes = []
    for info in pkgutil.walk_packages(rapid_search.__path__, "rapid_search."):
        mod = importlib.import_module(info.name)
        for _, obj in inspect.getmembers(mod, inspect.isclass):
            if obj.__module__ == mod.__name__ and issubclass(obj, Exception):
                classes.append(obj)
    assert len(classes) >= 12
    assert [c.__qualname__ for c in classes if not issubclass(c, RapidSearchError)] == []
    valueish = [c for c in classes if c is not RapidSearchError and (c.__name__.endswith("Error") or c.__name__ == "UnreachableBudget")]
    # existing ``except ValueError`` clauses still catch them; a missing optional module stays an ImportError
    assert [c.__qualname__ for c in valueish if not issubclass(c, ImportError if c.__name__ == "MissingExtraError" else ValueError)] == []


def test_layers_import_downwards_only() -> None:
    """The runtime (what ships to inference machines) imports nothing of the tools, the study
    storage, the search or the command line; the tools import nothing of the storage, the search or
    the command line; the storage (as ``optuna.storages`` beside ``optuna.study``) imports nothing
    of the runtime, the tools, the search or the command line."""
    mods = _modules()
    known = set(mods)
    above = {
        "rapid_search.runtime": ("rapid_search.tools", "rapid_search.storage", "rapid_search.search", "rapid_search.cli"),
        "rapid_search.tools": ("rapid_search.storage", "rapid_search.search", "rapid_search.cli"),
        "rapid_search.storage": ("rapid_search.runtime", "rapid_search.tools", "rapid_search.search", "rapid_search.cli"),
    }
    bad = []
    for name, path in mods.items():
        for layer, forbidden in above.items():
            if name == layer or name.startswith(layer + "."):
                bad += [f"{name} -> {m}" for m in sorted(_imports(name, path, known)) if m.startswith(forbidden)]
    assert bad == []
    assert {"rapid_search.runtime.patch", "rapid_search.tools.bench", "rapid_search.storage", "rapid_search.search.runner"} <= known


def test_public_names_resolve_lazily() -> None:
    """``rapid_search``'s public names come from the runtime on first use: every name in
    ``__all__`` resolves to the object its module defines, and ``import rapid_search.cli`` starts
    without torch (so a Ctrl-C during start-up meets the CLI's own one-line handler)."""
    import subprocess
    import sys

    names = set(rapid_search.__all__) - {"__version__"}
    assert names == set(rapid_search._EXPORTS)
    for name in sorted(names):
        mod = importlib.import_module(rapid_search._EXPORTS[name])
        assert getattr(rapid_search, name) is getattr(mod, name), name
    code = "import sys, rapid_search.cli; print(sorted(m for m in ('torch', 'timm', 'optuna', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
