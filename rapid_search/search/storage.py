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

import os
import re
import time
from pathlib import Path
from typing import Any, Optional
from ..errors import RapidSearchError

__all__ = [
    "StorageError",
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


def scrub(text: str, url: Optional[str]) -> str:
    """``text`` (e.g. a driver's error message) without any password from ``url``.

    Replaces ``url`` itself by its masked form, every secret of :func:`_secrets`, and the rest of
    a password that a driver took for part of the host name (``ss@host`` from ``user:p@ss@host``).
    Fragments shorter than 4 characters are never replaced blindly (that would garble the text).
    """
    if not url:
        return text
    text = text.replace(url, mask_url(url))
    for secret in _secrets(url):
        text = text.replace(secret, "***")
    pw = _userinfo_password(url) or ""
    # a parser that splits at the first @ takes the tail after each inner @ for the host
    for i in [i for i, c in enumerate(pw) if c == "@"]:
        tail = pw[i + 1 :]
        if tail:
            text = text.replace(tail + "@", "***@")
    return text


def describe_spec(spec: str) -> str:
    """``spec`` for a message: the masked URL, or a generic description when it has no scheme."""
    return mask_url(spec) if has_scheme(spec) else "the --storage value (not shown: it is neither a journal path nor a URL)"


def journal_path(spec: Optional[str], study_name: str, studies_dir: Path = Path("studies")) -> Optional[Path]:
    """The journal file ``spec`` names (None for an RDB URL)."""
    return _journal_path(spec, study_name, studies_dir)


def _journal_path(spec: Optional[str], study_name: str, studies_dir: Path) -> Optional[Path]:
    if spec is None:
        return studies_dir / f"{study_name}.journal"
    if spec.startswith("journal:"):
        return Path(spec[len("journal:") :])
    if "://" not in spec and spec.endswith(".journal"):
        return Path(spec)
    return None


def describe_storage(spec: Optional[str], study_name: str, studies_dir: Path) -> str:
    """Human-readable storage location (password masked)."""
    path = _journal_path(spec, study_name, studies_dir)
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


def writable_ancestor(path: Path) -> Optional[str]:
    """None when files can be created next to ``path`` (in its folder, or in the nearest existing
    ancestor of a folder still to be made), else the reason. Probes with a temporary file that is
    removed at once (permission bits alone say nothing for root or on /proc-like file systems)."""
    import tempfile

    parent = path.parent
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


def open_storage(
    spec: Optional[str],
    *,
    study_name: str,
    studies_dir: Path = Path("studies"),
    create: bool = True,
    allow_sqlite: bool = False,
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

    Raises:
        StorageError: Unknown form, SQLite for a search, unreachable server, wrong credentials,
            unwritable or missing path, nothing to read. The message never contains the password.
    """
    path = _journal_path(spec, study_name, studies_dir)
    if path is not None:
        from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

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
            return HeartbeatJournalStorage(JournalFileBackend(str(path), lock_obj=lock))
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
            raise StorageError(f"the driver for {mask_url(spec)} is not installed ({e.name}) — pip install 'rapid-search[postgres]'") from None
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
