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

Dead workers' trials are found by rapid_search's own heartbeat (``rapid_search.search.workers``),
the same for every storage, so the RDB storage is opened without Optuna's (experimental)
heartbeat options. Passwords never appear in messages: URLs are shown with the password masked.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Optional

__all__ = ["StorageError", "open_storage", "describe_storage", "journal_path", "writable_ancestor", "mask_url", "HEARTBEAT_INTERVAL", "GRACE_PERIOD"]

#: Default seconds between heartbeats of a running trial (``--heartbeat-interval``).
HEARTBEAT_INTERVAL = 20
#: Default seconds without a heartbeat after which a running trial's worker is presumed dead (``--grace-period``).
GRACE_PERIOD = 60
#: Seconds libpq waits for a PostgreSQL server before giving up (unless the URL sets connect_timeout).
CONNECT_TIMEOUT = 10


class StorageError(ValueError):
    """The storage could not be opened; the message (password masked) says what to do."""


def mask_url(url: str) -> str:
    """``url`` with any password replaced by ``***``."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        import re

        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def _password(url: str) -> Optional[str]:
    try:
        from sqlalchemy.engine import make_url

        pw = make_url(url).password
        return None if pw is None else str(pw)
    except Exception:
        import re

        m = re.search(r"://[^:/@]*:([^@]*)@", url)
        return m.group(1) if m else None


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
    return f"journal file {path}" if path is not None else mask_url(str(spec))


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
        create: Create a missing journal file (False: a missing one is an error, as for export).
        allow_sqlite: Accept SQLite URLs (read-only uses such as export; never for searches).

    Raises:
        StorageError: Unknown form, SQLite for a search, unreachable server, wrong credentials,
            unwritable or missing path. The message never contains the password.
    """
    path = _journal_path(spec, study_name, studies_dir)
    if path is not None:
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        if not create and not path.is_file():
            raise StorageError(f"journal file {path} does not exist — pass --storage where the study lives")
        check_journal_path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(str(path)))
        except OSError as e:
            raise StorageError(f"cannot open journal file {path}: {e.strerror or e} — pass a writable path with --storage journal:PATH") from None
    assert spec is not None
    if "://" not in spec:
        raise StorageError(
            f"--storage {mask_url(spec)!r} is not a storage — use journal:PATH (several processes, one machine) "
            "or postgresql+psycopg2://user@host:port/db (several machines)"
        )
    if spec.lower().startswith("sqlite") and not allow_sqlite:
        raise StorageError(
            "SQLite storage is not safe for concurrent workers and is not offered for searches — "
            "use journal:PATH (several processes, one machine) or postgresql+psycopg2://user@host:port/db (several machines)"
        )
    from optuna.storages import RDBStorage

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
            return RDBStorage(spec, engine_kwargs=engine_kwargs)
        except ImportError as e:
            raise StorageError(f"the driver for {mask_url(spec)} is not installed ({e.name}) — pip install 'rapid-search[postgres]'") from None
        except Exception as e:
            # workers starting together on an empty database race to create Optuna's tables:
            # the losers see a duplicate table/type; the tables exist now, so try again
            if attempt < 2 and e.__class__.__name__ in ("IntegrityError", "ProgrammingError"):
                time.sleep(0.5 * (attempt + 1))
                continue
            raise StorageError(
                f"cannot open storage {mask_url(spec)}: {_reason(e, spec)} — check the URL, that the server runs and the credentials"
            ) from None
    raise AssertionError("unreachable")  # pragma: no cover


def _reason(e: BaseException, url: str) -> str:
    """A short, password-free reason for a storage failure."""
    text = str(getattr(e, "orig", None) or e).strip().splitlines()
    first = text[0] if text else e.__class__.__name__
    first = first.replace(url, mask_url(url))
    pw = _password(url)
    if pw:
        first = first.replace(pw, "***")
        from urllib.parse import unquote

        first = first.replace(unquote(pw), "***")
    return f"{e.__class__.__name__}: {first}"[:300]
