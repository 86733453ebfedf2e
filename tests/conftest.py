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

# Pretrained weights come from ../shared's Hugging Face cache, offline. Set before anything
# imports huggingface_hub (it reads these once); `make test` exports the same values.
_SHARED = os.environ.get("RAPID_SHARED") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared")
if os.path.isdir(os.path.join(_SHARED, "hf-cache", "hub")):
    os.environ.setdefault("HF_HUB_CACHE", os.path.abspath(os.path.join(_SHARED, "hf-cache", "hub")))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
import signal
import uuid
from collections.abc import Iterator

# The interrupt tests send SIGINT to this process and to its workers. A shell without job control
# starts a background command (`make test &`, some job runners) with SIGINT ignored (POSIX), and
# Python keeps an ignored SIGINT ignored, as rapid-search deliberately does (nohup): the interrupt
# would be lost and a test would wait out its grace period. Run with the handler a terminal gives,
# set before any worker process starts so that they inherit it too.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

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


# ---- tiny search set-up and fast worker processes (distributed, interrupt, soak, CLI-error tests) ----
TINY_WNIDS = ("n01440764", "n01443537")


class TinySearch:
    """A fast search set-up on timm ``test_vit``: ``ckpt`` (its weights as a state dict; test_vit has
    no pretrained weights, so searches pass ``--checkpoint``) and ``data`` (16 labelled 160 px PNGs
    in two WordNet-id folders)."""

    def __init__(self, ckpt, data) -> None:
        self.ckpt, self.data = ckpt, data

    def args(self, storage: str, study: str, out, *, trials: int, extra=()) -> list[str]:
        """``rapid-search search`` arguments for a fast search (16 images, batch 8, 1 thread)."""
        return [
            "search", "--model", "test_vit", "--checkpoint", str(self.ckpt), "--data", str(self.data), "--budget", "50%GFLOPs",
            "--trials", str(trials), "--calib-images", "16", "--batch-size", "8", "--threads", "1", "--progress", "plain",
            "--storage", storage, "--study-name", study, "--out", str(out), *map(str, extra),
        ]


@pytest.fixture(scope="session")
def tiny_search(tmp_path_factory) -> TinySearch:
    """A :class:`TinySearch` (checkpoint and images made once per session)."""
    import numpy as np
    import timm
    import torch
    from PIL import Image

    root = tmp_path_factory.mktemp("tiny-search")
    torch.manual_seed(0)
    ckpt = root / "test_vit.pth"
    torch.save(timm.create_model("test_vit").state_dict(), ckpt)
    data = root / "data"
    rng = np.random.default_rng(0)
    for i in range(16):
        d = data / TINY_WNIDS[i % 2]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (160, 160, 3), dtype=np.uint8)).save(d / f"img{i:02d}.png")
    return TinySearch(ckpt, data)


def _cli_child(argv, log_path, env, cwd):  # runs in a forkserver child
    import os
    import sys

    os.environ.update(env)
    if cwd:
        os.chdir(cwd)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    from rapid_search.cli import main

    try:
        code = main(argv)
    except BaseException:  # noqa: BLE001 - a traceback is what the log should show then
        import traceback

        traceback.print_exc()
        code = 99
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class CliWorkers:
    """Starts ``rapid-search`` (``rapid_search.cli.main(argv)``) in worker processes forked from a
    forkserver that has torch, timm, optuna and rapid_search imported already: the same code as
    the console script in a separate process, without paying 5-15 s of imports per worker on a
    loaded machine. Output (stdout and stderr) goes to a log file per worker."""

    def __init__(self, ctx) -> None:
        self.ctx = ctx
        self.procs = []

    def start(self, argv, log_path, *, env=None, cwd=None):
        p = self.ctx.Process(target=_cli_child, args=(list(map(str, argv)), str(log_path), dict(env or {}), cwd and str(cwd)))
        p.start()
        p.log_path = log_path
        self.procs.append(p)
        return p

    def wait(self, p, timeout: float = 120) -> int:
        p.join(timeout)
        if p.exitcode is None:
            p.kill()
            p.join()
            raise AssertionError(f"worker did not finish in {timeout} s; log:\n{open(p.log_path).read()[-3000:]}")
        return p.exitcode

    def kill_all(self) -> None:
        for p in self.procs:
            if p.exitcode is None:
                p.kill()
                p.join(10)
        self.procs.clear()


@pytest.fixture(scope="session")
def _worker_ctx():
    import multiprocessing as mp

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "timm", "optuna", "PIL.Image", "rapid_search.cli", "rapid_search.search.runner", "rapid_search.tools.data"])
    return ctx


@pytest.fixture
def cli_workers(_worker_ctx) -> Iterator[CliWorkers]:
    """Start ``rapid-search`` worker processes fast (see :class:`CliWorkers`); all are killed after the test."""
    w = CliWorkers(_worker_ctx)
    try:
        yield w
    finally:
        w.kill_all()


# ---- tiny models ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    tiny models run several times faster on a shared machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    """timm's tiny ``test_vit`` with seeded random weights, in eval mode (modules may override)."""
    import timm
    import torch

    torch.manual_seed(0)
    return timm.create_model("test_vit").eval()

