"""Study storage: an embedded journal file by default, any Optuna RDB URL on request.

* default: ``studies/<study-name>.journal`` — Optuna's ``JournalStorage`` with a
  ``JournalFileBackend``, safe for several worker processes on one machine (SQLite is not, and
  is not offered for that);
* ``journal:PATH`` or a path ending in ``.journal``: a journal file of your choice;
* ``postgresql+psycopg2://user:password@host:port/db`` (or any SQLAlchemy URL Optuna accepts):
  an RDB study that workers on several machines join; dead workers' trials are failed by the
  heartbeat and retried.

Passwords never appear in messages: URLs are shown with the password masked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import optuna

__all__ = ["StorageError", "open_storage", "describe_storage", "mask_url", "HEARTBEAT_INTERVAL", "GRACE_PERIOD"]

HEARTBEAT_INTERVAL = 20
GRACE_PERIOD = 60


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


def open_storage(spec: Optional[str], *, study_name: str, studies_dir: Path = Path("studies")) -> Any:
    """Open the storage named by ``spec`` (see module docstring).

    Raises:
        StorageError: Unknown form, unreachable server, wrong credentials, unwritable path.
    """
    path = _journal_path(spec, study_name, studies_dir)
    if path is not None:
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(str(path)))
        except OSError as e:
            raise StorageError(f"cannot open journal file {path}: {e.strerror or e} — pass a writable path with --storage journal:PATH") from None
    assert spec is not None
    if "://" not in spec:
        raise StorageError(
            f"--storage {spec!r} is not a storage — use journal:PATH (several processes, one machine) "
            "or postgresql+psycopg2://user:password@host:port/db (several machines)"
        )
    if spec.startswith("sqlite"):
        optuna.logging.get_logger("optuna").warning(
            "SQLite storage is not safe for concurrent workers; use journal:PATH or PostgreSQL to run several"
        )
    from optuna.storages import RDBStorage, RetryFailedTrialCallback

    try:
        return RDBStorage(
            spec,
            engine_kwargs={"pool_pre_ping": True},
            heartbeat_interval=HEARTBEAT_INTERVAL,
            grace_period=GRACE_PERIOD,
            failed_trial_callback=RetryFailedTrialCallback(max_retry=3),
        )
    except ImportError as e:
        raise StorageError(f"the driver for {mask_url(spec)} is not installed ({e.name}) — pip install 'rapid-search[postgres]'") from None
    except Exception as e:
        raise StorageError(f"cannot open storage {mask_url(spec)}: {_reason(e, spec)} — check the URL, that the server runs and the credentials") from None


def _reason(e: BaseException, url: str) -> str:
    """A short, password-free reason for a storage failure."""
    text = str(getattr(e, "orig", None) or e).strip().splitlines()
    first = text[0] if text else e.__class__.__name__
    try:
        from sqlalchemy.engine import make_url

        pw = make_url(url).password
    except Exception:
        pw = None
    if pw:
        first = first.replace(str(pw), "***")
    return f"{e.__class__.__name__}: {first}"[:300]
