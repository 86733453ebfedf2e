"""Shared pytest fixtures.

PostgreSQL (tests marked ``postgres``)
--------------------------------------
The server comes from outside the test run: ``RAPID_PG_URL`` holds a SQLAlchemy URL such as
``postgresql+psycopg2://rapid:PASSWORD@127.0.0.1:55432/rapid``. ``.ci/run`` starts a throwaway
server with ``scripts/postgres.sh start`` (which prints that URL) and exports it; locally::

    export RAPID_PG_URL=$(bash scripts/postgres.sh start)
    .venv/bin/python -m pytest -m postgres
    bash scripts/postgres.sh stop

* ``pg_url`` (session): the URL, checked to accept a connection. Without ``RAPID_PG_URL`` the
  test is skipped, except under ``CI=true``, where it fails: CI must never skip these silently.
* ``pg_fresh_url`` (per test): isolation by a fresh, empty database per test (``CREATE DATABASE``,
  so the role needs CREATEDB, which ``scripts/postgres.sh`` grants), dropped afterwards. Every
  test thus gets its own Optuna schema and can run in any order or in parallel with others.

The URL contains the password: SQLAlchemy masks it (``***``) in its URL/engine reprs and the
driver's connection errors do not repeat it, but ``pytest -l`` (showlocals) prints it; this
is a throwaway CI credential, never a real one.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

SKIP_NO_PG = "no PostgreSQL: set RAPID_PG_URL (.ci/run starts one with scripts/postgres.sh start)"


def pg_engine(url: str, **kwargs):
    """A SQLAlchemy engine that gives up on an unreachable server after 5 s (not libpq's default of forever)."""
    import sqlalchemy as sa

    if sa.engine.make_url(url).get_driver_name() == "psycopg2":
        kwargs.setdefault("connect_args", {"connect_timeout": 5})
    return sa.create_engine(url, **kwargs)


def _masked(url: str) -> str:
    import sqlalchemy as sa

    return sa.engine.make_url(url).render_as_string(hide_password=True)


@pytest.fixture(scope="session")
def pg_url() -> str:
    """SQLAlchemy URL of a reachable PostgreSQL server (skip without one; fail instead when CI=true)."""
    url = os.environ.get("RAPID_PG_URL", "").strip()
    if not url:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but RAPID_PG_URL is not set; refusing to skip. {SKIP_NO_PG}", pytrace=False)
        pytest.skip(SKIP_NO_PG)
    engine = pg_engine(url)
    try:
        with engine.connect():
            pass
    except Exception as exc:  # noqa: BLE001 - any failure here means "no usable server"
        pytest.fail(f"RAPID_PG_URL={_masked(url)} is set but cannot connect: {exc}", pytrace=False)
    finally:
        engine.dispose()
    return url


@pytest.fixture
def pg_fresh_url(pg_url: str) -> Iterator[str]:
    """URL of a new empty database, private to this test and dropped after it."""
    import sqlalchemy as sa

    name = f"rapid_t_{uuid.uuid4().hex[:16]}"
    admin = pg_engine(pg_url, isolation_level="AUTOCOMMIT")  # CREATE/DROP DATABASE can't run in a transaction
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.DBAPIError as exc:
        admin.dispose()
        pytest.fail(f"cannot CREATE DATABASE (does the role have CREATEDB?): {exc}", pytrace=False)
    try:
        yield sa.engine.make_url(pg_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:  # FORCE (PostgreSQL 13+) ends sessions a test left open
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
