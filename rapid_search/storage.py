"""Study storage: an embedded journal file by default, any Optuna RDB URL on request.

* default: ``studies/<study-name>.journal``, Optuna's ``JournalStorage`` on a journal file, safe
  for several worker processes on one machine; ``journal:PATH`` or ``PATH.journal``: another file;
* ``postgresql+psycopg2://user@host:port/db`` (any SQLAlchemy URL Optuna accepts): a study workers
  on several machines join. Without a password in the URL libpq reads ``PGPASSWORD`` or
  ``~/.pgpass``, so it never shows in ``ps``;
* SQLite is refused for searches (not safe for concurrent workers); ``export`` may read it.

Both kinds come with Optuna's heartbeat seam (:class:`HeartbeatMixin`), off until a
:class:`~rapid_search.search.workers.Worker` is attached.
Messages never show a password (:mod:`rapid_search.redact`).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import sqlalchemy
from optuna.storages import RDBStorage
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock, JournalStorage
from optuna.storages.journal._file import get_lock_file
from optuna.storages.journal._storage import JournalOperation
from optuna.trial import FrozenTrial
from sqlalchemy.engine import make_url

from .errors import RapidSearchError
from .outputs import writable_ancestor
from .redact import has_scheme, mask_url, safe_reason
from .termsafe import printable

__all__ = [
    "StorageError", "JournalWriteError", "HeartbeatMixin", "check_journal", "check_journal_path", "check_study_name", "open_storage",
    "describe_storage", "journal_path", "HEARTBEAT_INTERVAL", "GRACE_PERIOD", "JOURNAL_LOCK_GRACE",
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
    """Appending to a journal file failed (disk full, I/O error): that append was taken back and later ones are refused."""


class HeartbeatMixin(BaseHeartbeat):
    """Optuna's ``BaseHeartbeat`` for any storage (beats are a trial system attribute), off until a
    :class:`~rapid_search.search.workers.Worker` is attached as ``liveness``: it keeps the policy."""

    liveness: Any = None

    def record_heartbeat(self, trial_id: int) -> None:
        if self.liveness is not None:
            self.liveness.beat(trial_id)

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        return [] if self.liveness is None else self.liveness.stale_trial_ids(self, study_id)

    def get_heartbeat_interval(self) -> Optional[int]:
        return None if self.liveness is None else self.liveness.interval

    def get_heartbeat_stale_trial_callback(self) -> Optional[Callable[[Any, FrozenTrial], None]]:
        return None if self.liveness is None else self.liveness.requeue


class HeartbeatJournalStorage(HeartbeatMixin, JournalStorage):
    """Optuna's ``JournalStorage`` with the heartbeat seam (Optuna has none for journal files)."""


class HeartbeatRDBStorage(HeartbeatMixin, RDBStorage):
    """Optuna's ``RDBStorage`` whose heartbeat follows the same rules as the journal's."""


#: The longest study name (it names files: ``<name>.journal``, ``<name>.yaml``).
MAX_STUDY_NAME = 128


def check_study_name(name: str) -> str:
    """``name``, unless it is no plain name for files under ``studies/`` (path separators, ``.``/``..``,
    control characters, over :data:`MAX_STUDY_NAME` characters): :class:`StorageError` with the reason and fix."""
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
    if path is not None:
        return f"journal file {path}"
    return mask_url(str(spec)) if has_scheme(str(spec)) else "the --storage value (not shown: it is neither a journal path nor a URL)"


def check_journal_path(path: Path) -> None:
    """Raise :class:`StorageError` unless a journal file can be created or written at ``path`` (creating nothing)."""
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
    """Open the storage named by ``spec`` (see the module docstring).

    Args:
        spec: ``None`` (``studies_dir/<study_name>.journal``), ``journal:PATH``, ``PATH.journal`` or an RDB URL.
        study_name: The study (names the default journal file).
        studies_dir: Folder of default journal files.
        create: Create what is missing (journal file, Optuna's tables); False opens for reading, as export does.
        allow_sqlite: Accept SQLite URLs (read-only uses such as export; never for searches).
        log: Where the one-line note about a repaired journal goes (default: stderr).

    Raises:
        StorageError: Unknown form, SQLite for a search, unreachable server, wrong credentials,
            unwritable or missing path, nothing to read, a journal damaged before its last record.
    """
    path = journal_path(spec, study_name, studies_dir)
    if path is not None:
        return _open_journal(path, create=create, log=log)
    assert spec is not None
    return _open_rdb(spec, create=create, allow_sqlite=allow_sqlite)


def _open_journal(path: Path, *, create: bool, log: Optional[Callable[[str], None]]) -> Any:
    """A journal file's storage (see :func:`check_journal` for a damaged tail)."""
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
        # a damaged tail is cut off before Optuna reads or appends (read-only: a repaired copy is read)
        fixed = check_journal(path, repair=create, lock=lock if create else None, log=log) if path.is_file() else None
        return HeartbeatJournalStorage(_AtomicJournalFile(str(fixed or path), lock, shown=path))
    except OSError as e:
        raise StorageError(f"cannot open journal file {path}: {e.strerror or e} — pass a writable path with --storage journal:PATH") from None


def _open_rdb(spec: str, *, create: bool, allow_sqlite: bool) -> Any:
    """An RDB URL's storage (for reading: only a database that has Optuna's tables, none created)."""
    forms = "use journal:PATH (several processes, one machine) or postgresql+psycopg2://user@host:port/db (several machines)"
    if not has_scheme(spec):  # not shown: it may hold a password (user:pw@host/db without its scheme)
        raise StorageError(f"--storage is neither a journal file (journal:PATH, PATH.journal) nor a URL with a scheme (value not shown) — {forms}")
    sqlite = spec.lower().startswith("sqlite")
    if sqlite and not allow_sqlite:
        raise StorageError(f"SQLite storage is not safe for concurrent workers and is not offered for searches — {forms}")
    if sqlite and not create:
        _check_sqlite_file(spec)
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    try:
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
                f"cannot open storage {mask_url(spec)}: {safe_reason(e, spec)} — check the URL, that the server runs and the credentials"
            ) from None
    raise AssertionError("unreachable")  # pragma: no cover


def _missing_driver(e: ImportError, spec: str) -> str:
    """The message for a URL whose driver is missing: the module SQLAlchemy looked for and, for a PostgreSQL
    URL with psycopg2 installed, the URL that uses it."""
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
def _bad_record(line: bytes, ops: set[int]) -> Optional[str]:
    """Why ``line`` (without its newline) is not a journal record, or None when it is one."""
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
    """Check a journal file before Optuna reads or appends to it (Optuna would append after a damaged tail).

    A damaged *tail* (a last record cut short by a crash or full disk, or garbage after it) is cut
    off: with ``repair`` the file is copied whole to ``PATH.damaged-<time>`` and cut back to its last
    complete record under the journal's lock, one line saying so; without, a repaired temporary copy
    is returned, the file left alone.

    Returns:
        The repaired copy to read instead (``repair`` False), else None.

    Raises:
        StorageError: Damage before the last record, or an unknown op code (nothing changed).
    """
    ops = {int(op) for op in JournalOperation}
    say = log or (lambda msg: sys.stderr.write(f"rapid-search: {msg}\n"))
    with get_lock_file(lock) if lock is not None else contextlib.nullcontext():
        data = path.read_bytes()
        end = 0  # byte offset just past the last good record
        first_bad: Optional[tuple[int, str]] = None
        for number, line in enumerate(data.split(b"\n")[:-1], start=1):  # what follows the last newline is no record
            why = _bad_record(line, ops)
            if why is None:
                if first_bad is not None:
                    raise StorageError(
                        f"journal file {path} is damaged at line {first_bad[0]} ({first_bad[1]}) with records after it — "
                        "restore the file from a copy, or start a new study with another --study-name (the file was left unchanged)"
                    )
                end += len(line) + 1
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
            folder = tempfile.mkdtemp(prefix="rapid-journal-")
            atexit.register(shutil.rmtree, folder, ignore_errors=True)
            copy = Path(folder) / path.name
            copy.write_bytes(data[:end])
            say(f"journal file {path} ends with {what} ({cut} bytes): read without it; the next search repairs the file")
            return copy
        backup = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.copyfile(path, backup)
        with open(path, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
        say(f"journal file {path} ended with {what}: cut {cut} bytes back to its last complete record; the original is kept as {backup}")
        return None


def _write_all(fd: int, data: bytes) -> None:
    """``os.write`` until all of ``data`` is written (raises OSError when the disk is full)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class _AtomicJournalFile(JournalFileBackend):
    """Optuna's journal file with all-or-nothing appends: a failed write (disk full, I/O error) is cut off
    again, so the file still ends with a complete record, and every later append is refused."""

    def __init__(self, file_path: str, lock_obj: Any = None, *, shown: Path) -> None:
        super().__init__(file_path, lock_obj=lock_obj)
        self._shown = shown
        self._failed: Optional[str] = None

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
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


def _check_sqlite_file(spec: str) -> None:
    """Raise :class:`StorageError` unless the SQLite URL names an existing file (connecting would create it)."""
    try:
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
    engine = sqlalchemy.create_engine(spec, **engine_kwargs)
    try:
        inspector = sqlalchemy.inspect(engine)
        return all(inspector.has_table(t) for t in ("studies", "trials", "version_info"))
    finally:
        engine.dispose()
