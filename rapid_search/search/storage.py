"""Study storage: an embedded journal file by default, any Optuna RDB URL on request.

* default: ``studies/<study-name>.journal`` — Optuna's ``JournalStorage`` with a
  ``JournalFileBackend``, safe for several worker processes on one machine (SQLite is not, and
  is not offered for that);
* ``journal:PATH`` or a path ending in ``.journal``: a journal file of your choice;
* ``postgresql+psycopg2://user:password@host:port/db`` (or any SQLAlchemy URL Optuna accepts):
  an RDB study that workers on several machines join. Leave the password out of the URL
  (``postgresql+psycopg2://user@host/db``) and libpq takes it from ``PGPASSWORD`` or
  ``~/.pgpass``, so it never shows in ``ps``.
* SQLite URLs are refused for searches: SQLite is not safe for concurrent workers (use a
  journal file on one machine). ``export`` may read an existing SQLite study.

Both kinds are opened as Optuna storages with the ``BaseHeartbeat`` seam
(``rapid_search.search.workers.HeartbeatMixin``), off until a search switches it on, so dead
workers' trials are found the same way for every storage. Passwords never appear in messages: URLs are shown with the password masked.
"""

from __future__ import annotations

import errno
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

from ..errors import RapidSearchError
from ..outputs import writable_ancestor

__all__ = [
    "StorageError",
    "JournalWriteError",
    "check_journal",
    "check_study_name",
    "MAX_STUDY_NAME",
    "open_storage",
    "describe_storage",
    "journal_path",
    "writable_ancestor",
    "mask_url",
    "scrub",
    "safe_reason",
    "HEARTBEAT_INTERVAL",
    "GRACE_PERIOD",
    "JOURNAL_LOCK_GRACE",
]

#: Default seconds between heartbeats of a running trial (``--heartbeat-interval``).
HEARTBEAT_INTERVAL = 10
#: Default seconds without a heartbeat after which a running trial's worker is presumed dead
#: (``--grace-period``). For a journal file it must exceed ``2 * interval + JOURNAL_LOCK_GRACE``
#: (as the defaults do), see ``rapid_search.search.runner.heartbeat_timing``.
GRACE_PERIOD = 60
#: Seconds after which a journal file's lock is taken over from its holder (a worker killed while
#: appending leaves it behind; heartbeats of live trials wait that long meanwhile).
JOURNAL_LOCK_GRACE = 30
#: Seconds libpq waits for a PostgreSQL server before giving up (unless the URL sets connect_timeout).
CONNECT_TIMEOUT = 10


class StorageError(RapidSearchError, ValueError):
    """The storage could not be opened; the message (password masked) says what to do."""


class JournalWriteError(StorageError, OSError):
    """Appending to a journal file failed (disk full, I/O error): the bytes of that append were
    taken back, so the journal still ends with its last complete record, and this backend
    refuses further appends (each would be a torn record)."""


#: A URL's scheme (``postgresql+psycopg2://``, ``sqlite:///``): a ``--storage`` value without one
#: is not shown in messages at all (it may be a password pasted in the wrong place).
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
#: Query parameters whose values are secrets (``?password=...``, ``?sslpassword=...``).
_SECRET_PARAM = re.compile(r"([?&;][^=&#;]*(?:pass|pwd|secret|token)[^=&#;]*=)([^&#;]*)", re.IGNORECASE)


def has_scheme(spec: str) -> bool:
    """Whether ``spec`` starts with a URL scheme (``name://``)."""
    return _SCHEME.match(spec) is not None


def mask_url(url: str) -> str:
    """``url`` with every password replaced by ``***``.

    Masked: secret query parameters (``?password=...``) and everything between the scheme (or the
    start of the string) and the *last* ``@`` except the user name, so a password with an
    unescaped ``@`` (``user:p@ss@host``) is masked whole. Works on strings that do not parse as
    URLs too (it never needs to parse them).
    """
    m = _SCHEME.match(url)
    head, rest = (url[: m.end()], url[m.end() :]) if m else ("", url)
    rest = _SECRET_PARAM.sub(r"\1***", rest)
    at = rest.rfind("@")
    if at >= 0:
        userinfo = rest[:at]
        if ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":***"
        elif "@" in userinfo:  # several @ and no ':' — no telling user from password
            userinfo = "***"
        rest = userinfo + rest[at:]
    return head + rest


def _userinfo_password(url: str) -> Optional[str]:
    """The password in ``url``'s user info: what lies between the first ``:`` after the scheme
    and the last ``@`` (secret query parameters set aside), or None."""
    m = _SCHEME.match(url)
    rest = _SECRET_PARAM.sub(lambda pm: pm.group(1), url[m.end() :] if m else url)
    at = rest.rfind("@")
    return rest[:at].split(":", 1)[1] if at >= 0 and ":" in rest[:at] else None


def _secrets(url: str) -> list[str]:
    """The secret strings in ``url`` (as written and URL-decoded), longest first.

    The password of :func:`_userinfo_password` and secret query parameters. Pieces of a password
    split at ``@`` (a driver that split the URL at the first ``@`` sees them as password and
    host) are included when at least 4 characters long.
    """
    from urllib.parse import unquote, unquote_plus

    m = _SCHEME.match(url)
    found = [pm.group(2) for pm in _SECRET_PARAM.finditer(url[m.end() :] if m else url)]
    pw = _userinfo_password(url)
    if pw is not None:
        found.append(pw)
        found.extend(piece for piece in pw.split("@") if len(piece) >= 4)
    out: set[str] = set()
    for f in found:
        out.update(x for x in (f, unquote(f), unquote_plus(f)) if x)
    return sorted(out, key=len, reverse=True)


#: Shortest piece of a password replaced wherever it appears in a message (shorter ones would
#: garble ordinary words; a whole password shorter than this is still replaced).
_MIN_PIECE = 4


def scrub(text: str, url: Optional[str], *, pieces: bool = True) -> str:
    """``text`` (e.g. a driver's error message) without any part of a password from ``url``.

    Replaces ``url`` itself by its masked form, every secret of :func:`_secrets`, and then every
    remaining piece of a password (as written or URL-decoded) of at least 4 characters, longest
    first, wherever it appears: however a parser split the URL (at the first ``@``, at a ``:``
    in the password taken for a port, ...), whatever part of the password it put in its message
    is gone. A password shorter than 4 characters is replaced only whole. A piece that is also
    part of what the masked URL shows (the user name, the host, the database) is kept.

    Args:
        text: The message.
        url: The storage URL (None or empty: ``text`` is returned as is).
        pieces: Also replace pieces of the password (for a driver's or parser's text); False
            replaces the URL, the whole password and what a parser glued to the host only (for
            rapid-search's own lines, whose wording must stay intact).
    """
    if not url:
        return text
    from urllib.parse import unquote, unquote_plus

    text = text.replace(url, mask_url(url))
    secrets = _secrets(url)
    for secret in secrets:
        text = text.replace(secret, "***")
    pw = _userinfo_password(url) or ""
    # a parser that splits at the first @ takes the tail after each inner @ for the host
    for i in [i for i, c in enumerate(pw) if c == "@"]:
        tail = pw[i + 1 :]
        if tail:
            text = text.replace(tail + "@", "***@")
    # every piece (substring) of every secret still in the text
    public = mask_url(url)
    for secret in secrets if pieces else ():
        for form in {secret, unquote(secret), unquote_plus(secret)}:
            text = _cut_pieces(text, form, public)
    # short pieces: what a parser split off at a URL delimiter and reported on its own (a host,
    # a port), replaced where they stand as a whole token; and any tail of the password it
    # glued to the real host (``gh@127.0.0.1`` from ``user:ab:cd@ef:gh@127.0.0.1``)
    host = re.split(r"[:/?#\[\]]", url[url.rfind("@") + 1 :], maxsplit=1)[0] if "@" in url else ""
    for secret in secrets:
        for piece in sorted({p for p in re.split(r"[@:/?#\[\]]", secret) if p}, key=len, reverse=True) if pieces else ():
            if piece not in public:
                text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(piece)}(?![A-Za-z0-9])", "***", text)
        if host:
            for i in range(len(secret)):
                tail = secret[i:]
                if "*" not in tail:
                    text = text.replace(f"{tail}@{host}", f"***@{host}")
    return text


def _cut_pieces(text: str, secret: str, public: str) -> str:
    """``text`` with every run of at least ``min(4, len(secret))`` characters that is a piece of
    ``secret`` (and not of ``public``) replaced by ``***`` (scanning left to right, each run as
    long as it goes)."""
    least = min(_MIN_PIECE, len(secret))
    if not least:
        return text
    out: list[str] = []
    i = 0
    while i < len(text):
        j = i
        while j < len(text) and text[i : j + 1] in secret:
            j += 1
        if j - i >= least and text[i:j].strip("*") and text[i:j] not in public:
            out.append("***")
            i = j
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


#: The longest study name (it names files: ``<name>.journal``, ``<name>.yaml``).
MAX_STUDY_NAME = 128


def check_study_name(name: str) -> str:
    """Refuse a study name that is not a plain name: it names files under ``studies/``, so it
    must not hold path separators, be ``.`` or ``..``, hold control characters, or be longer
    than :data:`MAX_STUDY_NAME` characters. Returns ``name``.

    Raises:
        StorageError: The name, with the reason and the fix.
    """
    from ..termsafe import printable

    if not name:
        why = "it is empty"
    elif len(name) > MAX_STUDY_NAME:
        why = f"it is {len(name)} characters long (at most {MAX_STUDY_NAME})"
    elif any(sep in name for sep in ("/", "\\", os.sep, os.altsep or "/")):
        why = "it holds a path separator"
    elif name in (".", ".."):
        why = "it is a folder name"
    elif any(ord(c) < 32 or 0x7F <= ord(c) <= 0x9F for c in name):
        why = "it holds control characters"
    else:
        return name
    shown = printable(repr(name if len(name) <= 60 else name[:60] + "..."))
    raise StorageError(
        f"--study-name {shown} is not a plain name: {why} — use letters, digits and . _ - (e.g. deit-s-50); "
        "to keep the study elsewhere pass --storage journal:PATH"
    )


def describe_spec(spec: str) -> str:
    """``spec`` for a message: the masked URL, or a generic description when it has no scheme."""
    return mask_url(spec) if has_scheme(spec) else "the --storage value (not shown: it is neither a journal path nor a URL)"


def journal_path(spec: Optional[str], study_name: str, studies_dir: Path = Path("studies")) -> Optional[Path]:
    """The journal file ``spec`` names (None for an RDB URL)."""
    if spec is None:
        return studies_dir / f"{study_name}.journal"
    if spec.startswith("journal:"):
        return Path(spec[len("journal:") :])
    if "://" not in spec and spec.endswith(".journal"):
        return Path(spec)
    return None


def describe_storage(spec: Optional[str], study_name: str, studies_dir: Path) -> str:
    """Human-readable storage location (password masked)."""
    path = journal_path(spec, study_name, studies_dir)
    return f"journal file {path}" if path is not None else describe_spec(str(spec))


def check_journal_path(path: Path) -> None:
    """Raise :class:`StorageError` unless a journal file can be created or written at ``path``
    (checked without creating anything)."""
    hint = "pass a writable file path with --storage journal:PATH"
    if path.exists():
        if not path.is_file():
            raise StorageError(f"journal file {path} is not a regular file — {hint}")
        if not os.access(path, os.R_OK | os.W_OK):
            raise StorageError(f"journal file {path} is not readable and writable — {hint}")
    where = writable_ancestor(path)
    if where is not None:
        raise StorageError(f"cannot create journal file {path}: {where} — {hint}")


def open_storage(
    spec: Optional[str],
    *,
    study_name: str,
    studies_dir: Path = Path("studies"),
    create: bool = True,
    allow_sqlite: bool = False,
    log: Optional[Callable[[str], None]] = None,
) -> Any:
    """Open the storage named by ``spec`` (see module docstring).

    Args:
        spec: ``None`` (``studies_dir/<study_name>.journal``), ``journal:PATH``, ``PATH.journal`` or
            an RDB URL.
        study_name: The study (names the default journal file).
        studies_dir: Folder of default journal files.
        create: Create what is missing: a journal file, Optuna's tables in a database. False opens
            for reading (as export does) and creates nothing: a missing journal file, a missing
            SQLite file or a database without Optuna's tables is an error.
        allow_sqlite: Accept SQLite URLs (read-only uses such as export; never for searches).
        log: Where the one-line note about a repaired journal goes (default: stderr).

    Raises:
        StorageError: Unknown form, SQLite for a search, unreachable server, wrong credentials,
            unwritable or missing path, nothing to read, a journal damaged before its last
            record. The message never contains the password.
    """
    path = journal_path(spec, study_name, studies_dir)
    if path is not None:
        from optuna.storages.journal import JournalFileSymlinkLock

        from .workers import HeartbeatJournalStorage

        if not create:
            if not path.is_file():
                raise StorageError(f"journal file {path} does not exist — pass --storage where the study lives")
            if not os.access(path, os.R_OK):
                raise StorageError(f"journal file {path} is not readable — check its permissions or pass --storage where the study lives")
        else:
            check_journal_path(path)
        try:
            if create:
                path.parent.mkdir(parents=True, exist_ok=True)
            lock = JournalFileSymlinkLock(str(path), grace_period=JOURNAL_LOCK_GRACE)
            read_from = path
            if path.is_file():
                # before Optuna reads or appends: a torn or garbage tail is cut off (after a
                # backup; read-only uses read a repaired copy instead), damage inside refused
                fixed = check_journal(path, repair=create, lock=lock if create else None, log=log)
                if fixed is not None and not create:
                    read_from = fixed
            return HeartbeatJournalStorage(_JournalBackend(str(read_from), lock_obj=lock, shown=path))
        except OSError as e:
            raise StorageError(f"cannot open journal file {path}: {e.strerror or e} — pass a writable path with --storage journal:PATH") from None
    assert spec is not None
    if not has_scheme(spec):  # not shown: it may hold a password (user:pw@host/db without its scheme)
        raise StorageError(
            "--storage is neither a journal file (journal:PATH, PATH.journal) nor a URL with a scheme (value not shown) — "
            "use journal:PATH (several processes, one machine) or postgresql+psycopg2://user@host:port/db (several machines)"
        )
    sqlite = spec.lower().startswith("sqlite")
    if sqlite and not allow_sqlite:
        raise StorageError(
            "SQLite storage is not safe for concurrent workers and is not offered for searches — "
            "use journal:PATH (several processes, one machine) or postgresql+psycopg2://user@host:port/db (several machines)"
        )
    if sqlite and not create:
        _check_sqlite_file(spec)
    from .workers import HeartbeatRDBStorage

    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    try:
        from sqlalchemy.engine import make_url

        url = make_url(spec)
        if url.get_driver_name() == "psycopg2" and "connect_timeout" not in url.query:
            engine_kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT}
    except Exception:
        pass  # RDBStorage reports the malformed URL below
    for attempt in range(3):
        try:
            if not create and not _has_optuna_tables(spec, engine_kwargs):
                raise StorageError(
                    f"{mask_url(spec)} holds no Optuna studies (no Optuna tables) — pass --storage where the study lives"
                )
            # read-only: never create tables (RDBStorage would add Optuna's schema to any database)
            return HeartbeatRDBStorage(spec, engine_kwargs=engine_kwargs, skip_table_creation=not create)
        except StorageError:
            raise
        except ImportError as e:
            raise StorageError(_missing_driver(e, spec)) from None
        except Exception as e:
            # workers starting together on an empty database race to create Optuna's tables:
            # the losers see a duplicate table/type; the tables exist now, so try again
            if create and attempt < 2 and e.__class__.__name__ in ("IntegrityError", "ProgrammingError"):
                time.sleep(0.5 * (attempt + 1))
                continue
            raise StorageError(
                f"cannot open storage {mask_url(spec)}: {_reason(e, spec)} — check the URL, that the server runs and the credentials"
            ) from None
    raise AssertionError("unreachable")  # pragma: no cover


def _missing_driver(e: ImportError, spec: str) -> str:
    """The message for a URL whose database driver is not installed: names the module SQLAlchemy
    looked for (Optuna re-raises without it) and, when the URL names no driver and the one this
    package installs (psycopg2) is there, the URL that uses it."""
    import importlib.util

    missing, cause = None, e  # type: Optional[str], Optional[BaseException]
    while cause is not None and missing is None:
        missing = getattr(cause, "name", None)
        cause = cause.__cause__ or cause.__context__
    scheme = spec.split("://", 1)[0]
    what = f"the database driver {missing!r}" if missing else "the database driver"
    if scheme.split("+", 1)[0].lower() in ("postgresql", "postgres") and missing != "psycopg2" and importlib.util.find_spec("psycopg2"):
        fixed = "postgresql+psycopg2://" + spec.split("://", 1)[1]
        return f"{what} that {scheme}:// uses is not installed — name the installed one in the URL: {mask_url(fixed)}"
    return f"{what} for {mask_url(spec)} is not installed — pip install 'rapid-search[postgres]' and use postgresql+psycopg2://..."


# ---- journal files: detection, repair, all-or-nothing appends ---------------------------------------
def _journal_ops() -> set[int]:
    from optuna.storages.journal._storage import JournalOperation

    return {int(op) for op in JournalOperation}


def _bad_record(line: bytes, ops: set[int]) -> Optional[str]:
    """Why ``line`` (without its newline) is not a journal record, or None when it is one."""
    import json

    try:
        rec = json.loads(line)
    except (ValueError, RecursionError):
        return "not a JSON record"
    if not isinstance(rec, dict) or not isinstance(rec.get("op_code"), int) or isinstance(rec.get("op_code"), bool):
        return "not a journal record (no op_code)"
    if rec["op_code"] not in ops:
        return f"unknown op code {rec['op_code']} (written by another Optuna version?)"
    return None


def check_journal(
    path: Path,
    *,
    repair: bool,
    lock: Any = None,
    log: Optional[Callable[[str], None]] = None,
) -> Optional[Path]:
    """Check a journal file before Optuna reads or appends to it.

    A damaged *tail* — a last record cut short (a crash or a full disk mid-write, a copy in
    progress) or garbage after the last record — is what Optuna would append after, making
    every later record unreadable. With ``repair`` the file is copied whole to
    ``PATH.damaged-<time>`` and cut back to its last complete record (under the journal's lock,
    so no worker is appending meanwhile), and one line says so; without it (read-only uses) a
    repaired copy is made in a temporary folder and returned, the file left alone. Damage
    *before* the last record (an undecodable record, an unknown op code anywhere) cannot be cut
    off without losing what follows: it is refused, nothing changed.

    Returns:
        None when nothing was wrong or the file was repaired in place; the repaired temporary
        copy to read instead when ``repair`` is False.

    Raises:
        StorageError: Damage before the last record, or an unknown op code.
    """
    ops = _journal_ops()
    say = log or (lambda msg: sys.stderr.write(f"rapid-search: {msg}\n"))
    if lock is not None:
        lock.acquire()
    try:
        data = path.read_bytes()
        lines = data.split(b"\n")
        tail = lines.pop()  # after the last newline: b"" when the file ends with a complete record
        end = 0  # byte offset just past the last good record
        offset = 0
        first_bad: Optional[tuple[int, str]] = None
        for number, line in enumerate(lines, start=1):
            offset += len(line) + 1
            why = _bad_record(line, ops)
            if why is None:
                if first_bad is not None:
                    raise StorageError(
                        f"journal file {path} is damaged at line {first_bad[0]} ({first_bad[1]}) with records after it — "
                        "restore the file from a copy, or start a new study with another --study-name (the file was left unchanged)"
                    )
                end = offset
            elif why.startswith("unknown op code"):
                raise StorageError(
                    f"journal file {path} has a record with an {why} at line {number} — read it with the Optuna version that "
                    "wrote it, or start a new study with another --study-name (the file was left unchanged)"
                )
            elif first_bad is None:
                first_bad = (number, why)
        if end == len(data):
            return None
        if end == 0:  # nothing to keep: not a journal (a file given by mistake), or a first record torn
            raise StorageError(
                f"journal file {path} holds no complete journal record (is it a journal file?) — pass --storage journal:PATH "
                "of a study's journal or a new path; if it is a new study's journal, cut short at its first write, remove it "
                "(the file was left unchanged)"
            )
        cut = len(data) - end
        what = "a torn last record" if first_bad is None else f"garbage after the last record (from line {first_bad[0]})"
        if not repair:
            import tempfile

            import atexit
            import shutil

            folder = tempfile.mkdtemp(prefix="rapid-journal-")
            atexit.register(shutil.rmtree, folder, ignore_errors=True)
            copy = Path(folder) / path.name
            copy.write_bytes(data[:end])
            say(f"journal file {path} ends with {what} ({cut} bytes): read without it; the next search repairs the file")
            return copy
        backup = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
        import shutil

        shutil.copyfile(path, backup)
        with open(path, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
        say(f"journal file {path} ended with {what}: cut {cut} bytes back to its last complete record; the original is kept as {backup}")
        return None
    finally:
        if lock is not None:
            lock.release()


def _write_all(fd: int, data: bytes) -> None:
    """``os.write`` until all of ``data`` is written (raises OSError when the disk is full)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _journal_backend_class() -> type:
    from optuna.storages.journal import JournalFileBackend
    from optuna.storages.journal._file import get_lock_file

    class _Backend(JournalFileBackend):
        """Optuna's journal file with all-or-nothing appends: when a write fails (disk full, I/O
        error) the bytes written of it are cut off again, so the file still ends with a complete
        record, and every later append is refused (this process must stop writing)."""

        def __init__(self, file_path: str, lock_obj: Any = None, *, shown: Path) -> None:
            super().__init__(file_path, lock_obj=lock_obj)
            self._shown = shown
            self._failed: Optional[str] = None

        def append_logs(self, logs: list[dict[str, Any]]) -> None:
            import json

            if self._failed is not None:
                raise JournalWriteError(self._failed)
            data = ("\n".join(json.dumps(log, separators=(",", ":")) for log in logs) + "\n").encode("utf-8")
            with get_lock_file(self._lock):
                fd = os.open(self._file_path, os.O_WRONLY | os.O_APPEND)
                try:
                    start = os.fstat(fd).st_size
                    try:
                        _write_all(fd, data)
                        os.fsync(fd)
                    except OSError as e:
                        try:
                            os.ftruncate(fd, start)
                        except OSError:
                            pass  # the next open repairs the tail
                        reason = e.strerror or e.__class__.__name__
                        fix = "free space on its file system" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "fix the file system"
                        self._failed = (
                            f"cannot write to journal file {self._shown}: {reason} — {fix} and re-run the same command to resume "
                            "(every finished trial is kept)"
                        )
                        raise JournalWriteError(self._failed) from None
                finally:
                    os.close(fd)

    return _Backend


def _JournalBackend(file_path: str, *, lock_obj: Any, shown: Path) -> Any:
    global _BACKEND
    if _BACKEND is None:
        _BACKEND = _journal_backend_class()
    return _BACKEND(file_path, lock_obj, shown=shown)


_BACKEND: Optional[type] = None


def _check_sqlite_file(spec: str) -> None:
    """Raise :class:`StorageError` unless the SQLite URL names an existing file (connecting to a
    missing one would create it)."""
    try:
        from sqlalchemy.engine import make_url

        db = make_url(spec).database
    except Exception:
        db = None
    if db and db.startswith("file:"):  # an SQLite URI filename (sqlite:///file:PATH?mode=ro&uri=true)
        db = db[len("file:") :].split("?", 1)[0]
    if not db or db == ":memory:":
        raise StorageError(f"{mask_url(spec)} names no SQLite file to read — pass --storage sqlite:///PATH of an existing study database")
    if not Path(db).is_file():
        raise StorageError(f"SQLite file {db} does not exist — pass --storage where the study lives")


def _has_optuna_tables(spec: str, engine_kwargs: dict[str, Any]) -> bool:
    """Whether the database at ``spec`` has Optuna's tables (looked at without writing anything)."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(spec, **engine_kwargs)
    try:
        inspector = sqlalchemy.inspect(engine)
        return all(inspector.has_table(t) for t in ("studies", "trials", "version_info"))
    finally:
        engine.dispose()


def _reason(e: BaseException, url: str) -> str:
    """A short, password-free reason for a storage failure (the exception's first line)."""
    text = str(getattr(e, "orig", None) or e).strip().splitlines()
    first = text[0] if text else e.__class__.__name__
    return scrub(f"{e.__class__.__name__}: {first}", url)[:300]


def safe_reason(e: BaseException, spec: Optional[str]) -> str:
    """``ExceptionClass: first line`` of ``e`` with any password of ``spec`` removed (for logs)."""
    return _reason(e, spec or "")
