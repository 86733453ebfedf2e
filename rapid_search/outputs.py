"""One guard for every file a command writes: :func:`check_output`.

Every output (``search --out``, ``export --out``, ``evaluate --json``, ``visualize --out``, the
files ``bench`` writes) is written by replacing the path atomically, so the guard refuses, before
any work, a path that must not be replaced:

* anything that is not a regular file (a directory, ``/dev/null`` or another device, a fifo, a
  socket; a symbolic link is judged by what it points to) — the rename would put a regular file
  in its place;
* a file the same command reads (``--space``, ``--schedule``, ``--image``, ``--checkpoint``), or
  the study's storage (the journal file, an SQLite database), also when reached by another
  spelling of the path or a link; an image file inside a ``--data`` folder;
* a place where no file can be created;
* for a figure (``formats=FIGURE_FORMATS``), a name whose ending names no format it can be drawn in.

:func:`atomic_write_text` checks the target again right before replacing it; :func:`save_figure`
draws a figure in the format its name ends with, in memory, then writes it the same way. Needs
only the standard library.
"""

from __future__ import annotations

import io
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

from .errors import RapidSearchError

__all__ = ["OutputError", "FIGURE_FORMATS", "check_output", "input_problem", "writable_ancestor", "atomic_write_text", "save_figure"]

PathLike = Union[str, "os.PathLike[str]"]

#: Image endings that a data folder's listing picks up (kept in step with rapid_search.tools.data).
_IMAGE_ENDINGS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


#: Formats a figure (``front``, ``visualize``, ``bench``) is written in, named by the file's ending:
#: matplotlib's Agg formats that need neither LaTeX nor a backend beyond Pillow.
FIGURE_FORMATS = ("png", "pdf", "svg", "jpg", "jpeg", "webp", "tif", "tiff", "eps", "ps")


class OutputError(RapidSearchError, ValueError):
    """An output path that must not be written; the message names the option and the fix."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a named pipe"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a regular file"


def _same(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` are the same file (existing: same device and inode; else the same
    resolved path)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        try:
            return a.resolve() == b.resolve()
        except (OSError, RuntimeError):
            return os.path.abspath(a) == os.path.abspath(b)


def _inside(path: Path, folder: Path) -> bool:
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except (OSError, RuntimeError):
        return False


def input_problem(path: PathLike) -> Optional[str]:
    """Why ``path`` cannot be read as an input file — ``"does not exist"``, ``"is a directory"``,
    ``"is a character device, not a regular file"``, ... — or None when it is a regular file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "does not exist"
    except OSError as e:
        return f"cannot be read ({e.strerror or e.__class__.__name__})"
    if stat.S_ISDIR(st.st_mode):
        return "is a directory, not a file"
    if not stat.S_ISREG(st.st_mode):
        return f"is {_kind(st.st_mode)}, not a regular file"
    return None


def writable_ancestor(path: Path) -> Optional[str]:
    """None when files can be created next to ``path`` (in its folder, or in the nearest existing
    ancestor of a folder still to be made), else the reason. Probes with a temporary file that is
    removed at once (permission bits alone say nothing for root or on /proc-like file systems)."""
    parent = Path(path).parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is not a directory"
    try:
        with tempfile.TemporaryFile(dir=parent, prefix=".rapid-write-check-"):
            pass
    except OSError as e:
        return f"{parent} is not writable ({e.strerror or e.__class__.__name__})"
    return None


def check_output(
    path: PathLike,
    *,
    option: str,
    reads: Iterable[tuple[str, Optional[PathLike]]] = (),
    data: Iterable[Optional[PathLike]] = (),
    example: str = "out.yaml",
    formats: Optional[Sequence[str]] = None,
) -> Path:
    """Refuse an output path that must not be replaced (see the module docstring).

    Args:
        path: The output file.
        option: How the user gave it (``--out``, ``--json``, ``bench --out-dir``), for messages.
        reads: ``(what, path)`` of every file the command reads or the study lives in, e.g.
            ``("the --space file", space)``, ``("the study's journal", journal)``; None entries
            are ignored.
        data: Image folders the command reads: an image file inside one is refused.
        example: A file name for the message about a directory.
        formats: The endings (without the dot, any case) the file may have, e.g. :data:`FIGURE_FORMATS`;
            None: any.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        OutputError: Not a regular file, one of ``reads``, an image inside ``data``, not
            creatable, or an ending not in ``formats``.
    """
    p = Path(path)
    try:
        st: Optional[os.stat_result] = os.stat(p)
    except FileNotFoundError:
        st = None
    except OSError as e:  # a symlink loop, a path through a file, no permission
        raise OutputError(f"{option} {p} cannot be used ({e.strerror or e.__class__.__name__}) — pass another file path") from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise OutputError(f"{option} {p} is a directory — pass {option} with a file path such as {p / example}")
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise OutputError(f"{option} {p} is {_kind(st.st_mode)}, not a regular file — pass {option} with a path to a regular file (it is replaced)")
    for what, other in reads:
        if other is not None and _same(p, Path(other)):
            raise OutputError(f"{option} {p} is {what}: writing there would replace it — pass another {option}")
    if p.suffix.lower() in _IMAGE_ENDINGS:
        for folder in data:
            if folder is not None and _inside(p, Path(folder)):
                raise OutputError(f"{option} {p} is inside the data folder {folder}: it would become one of its images — pass another {option}")
    if formats is not None and p.suffix[1:].lower() not in formats:
        what = f"ends with {p.suffix!r}, not a format it can be written in" if p.suffix else "has no ending to name its format"
        raise OutputError(f"{option} {p} {what} — end the name with one of: {', '.join('.' + f for f in formats)} (e.g. {p.stem or 'out'}.png)")
    where = writable_ancestor(p)
    if where is not None:
        raise OutputError(f"cannot write {option} {p}: {where} — pass {option} with a writable path")
    return p


def atomic_write_text(path: PathLike, text: Union[str, bytes]) -> Path:
    """Write ``text`` (UTF-8) or bytes (a PNG) to ``path`` atomically: readers see the old file or the new one, never half.

    Raises:
        OutputError: ``path`` exists and is not a regular file (a device, a fifo, a directory):
            it is never replaced.
    """
    p = Path(path)
    try:
        mode: Optional[int] = os.stat(p).st_mode
    except OSError:
        mode = None
    if mode is not None and not stat.S_ISREG(mode):
        raise OutputError(f"{p} is {_kind(mode)}, not a regular file — write to a path of a regular file (it is replaced)")
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode("utf-8") if isinstance(text, str) else text)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide the file from other users
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return p


def save_figure(fig: Any, path: PathLike, *, dpi: int = 150) -> Path:
    """Draw a matplotlib figure in the format ``path`` ends with (one of :data:`FIGURE_FORMATS`) and
    write it atomically to exactly ``path``: a figure that fails to draw leaves the old file as it was.

    Raises:
        OutputError: An ending not in :data:`FIGURE_FORMATS`, or ``path`` is not a regular file.
    """
    p = Path(path)
    fmt = p.suffix[1:].lower()
    if fmt not in FIGURE_FORMATS:
        raise OutputError(f"{p}: a figure is written as one of {', '.join('.' + f for f in FIGURE_FORMATS)} — name the file with one of those endings")
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=dpi)
    return atomic_write_text(p, buf.getvalue())
