"""The one YAML reader of rapid-search: safe, bounded, strict.

Every YAML file the package reads (schedules, search spaces; ``show``, ``evaluate``,
``visualize --schedule``, ``bench --searched``, ``search --space``) goes through
:func:`read_yaml` / :func:`load_yaml`, which

* build plain data only (``yaml.SafeLoader``: no tags that run code);
* refuse files larger than :data:`MAX_BYTES`, nesting deeper than :data:`MAX_DEPTH` and
  aliases that expand to more than :data:`MAX_NODES` nodes (a 1.5 KB "billion laughs" file
  would otherwise expand to hundreds of millions of nodes when printed or walked), and
  recursive aliases;
* refuse duplicate keys in a mapping (YAML says keys are unique; PyYAML keeps the last one, so
  a second ``layers:`` would silently replace the schedule).

Errors are :class:`YAMLInputError` (a ``ValueError``) with a short reason; callers add the file
and the fix. Needs only PyYAML and the standard library.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Union

import yaml
from yaml.nodes import MappingNode, Node, SequenceNode

from .errors import RapidSearchError

__all__ = ["YAMLInputError", "MAX_BYTES", "MAX_DEPTH", "MAX_NODES", "read_yaml", "load_yaml"]

#: Largest YAML file read (a schedule of a 200-block model is about 20 KB).
MAX_BYTES = 1 << 20
#: Deepest nesting of mappings and sequences, aliases expanded (schedules need 3).
MAX_DEPTH = 64
#: Most nodes (scalars, sequences, mappings), aliases expanded.
MAX_NODES = 100_000

_MERGE_TAG = "tag:yaml.org,2002:merge"


class YAMLInputError(RapidSearchError, ValueError):
    """A YAML text that is malformed, too large, too deep, an alias bomb, or has a duplicate key.

    Attributes:
        line: The 1-based line of the problem when known, else None.
        syntax: True for malformed YAML (the parser's error), False for a refused limit or key.
    """

    def __init__(self, reason: str, *, line: Union[int, None] = None, syntax: bool = False) -> None:
        super().__init__(reason)
        self.reason, self.line, self.syntax = reason, line, syntax


class _Loader(yaml.SafeLoader):
    """SafeLoader with a nesting limit while composing and duplicate keys refused."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:  # noqa: D102 - PyYAML hook
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise YAMLInputError(f"nested deeper than {MAX_DEPTH} levels", line=mark.line + 1)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:  # noqa: D102 - PyYAML hook
        if isinstance(node, MappingNode):
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == _MERGE_TAG:
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:  # unhashable: PyYAML reports it below
                    continue
                if duplicate:
                    raise YAMLInputError(f"duplicate key {key!r}", line=key_node.start_mark.line + 1)
        return super().construct_mapping(node, deep=deep)


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_expansion(root: Node) -> None:
    """Refuse a node graph whose aliases expand past :data:`MAX_NODES` nodes or :data:`MAX_DEPTH`
    levels, or loop (iterative: the graph may be deeper than Python's stack)."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            kids = _children(node)
            size[key] = 1 + sum(size[id(k)] for k in kids)
            depth[key] = 1 + max((depth[id(k)] for k in kids), default=0)
            if size[key] > MAX_NODES:
                raise YAMLInputError(f"aliases expand to more than {MAX_NODES} nodes (an alias bomb?)", line=node.start_mark.line + 1)
            if depth[key] > MAX_DEPTH:
                raise YAMLInputError(f"aliases expand to deeper than {MAX_DEPTH} levels", line=node.start_mark.line + 1)
            continue
        if key in size:
            continue
        if key in on_path:
            raise YAMLInputError("an alias refers to a node that contains it (recursive alias)", line=node.start_mark.line + 1)
        on_path.add(key)
        stack.append((node, True))
        stack.extend((k, False) for k in _children(node) if id(k) not in size)


def load_yaml(text: str) -> Any:
    """Parse one YAML document into plain data, within the limits (see the module docstring).

    Returns:
        The data (None for an empty document).

    Raises:
        YAMLInputError: Malformed YAML (``syntax`` True, with the line), more than
            :data:`MAX_BYTES`, too deep, too many nodes once aliases are expanded, a recursive
            alias, or a duplicate key.
    """
    if len(text) > MAX_BYTES:
        raise YAMLInputError(f"larger than {MAX_BYTES // 1024} KB")
    loader = None
    try:
        loader = _Loader(text)  # PyYAML's reader refuses non-printable characters here, before any parsing
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node)
        return loader.construct_document(node)
    except yaml.reader.ReaderError as e:
        line = text.count("\n", 0, e.position) + 1  # the reader gives a character offset (and, for text, the code point)
        raise YAMLInputError(f"not valid YAML: it holds the non-printable character U+{e.character:04X} (is it a text file?)", line=line, syntax=True) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise YAMLInputError("not valid YAML", line=mark.line + 1 if mark is not None else None, syntax=True) from None
    except RecursionError:  # pragma: no cover - the depth limit comes first
        raise YAMLInputError(f"nested deeper than {MAX_DEPTH} levels") from None
    finally:
        if loader is not None:
            loader.dispose()


def read_yaml(path: Union[str, "os.PathLike[str]"]) -> str:
    """The text of a YAML file, read up to :data:`MAX_BYTES` (UTF-8).

    Raises:
        FileNotFoundError: No such file.
        IsADirectoryError: A directory.
        OSError: Not readable.
        YAMLInputError: Larger than :data:`MAX_BYTES`, or not UTF-8 text.
    """
    p = Path(path)
    if p.is_dir():
        raise IsADirectoryError(21, "Is a directory", str(p))
    with open(p, "rb") as f:
        data = f.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise YAMLInputError(f"larger than {MAX_BYTES // 1024} KB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise YAMLInputError(f"not UTF-8 text (byte {e.start} cannot be decoded; is it a text file?)") from None
