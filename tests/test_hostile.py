"""Hostile input and failing machines, beyond the README's bad-input table (issue 14).

One test (or a parametrised family) per class of failure, each through its mechanism: passwords
in any URL shape, torn or corrupted journals, disk full, outputs that would replace what they
must not, study names that are paths, YAML bombs, data folders with loops and odd names, set-up
values spelled differently, control characters on the terminal, and the remaining tracebacks.
Every fixture is built by the test that uses it.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image

import rapid_search as rs
from rapid_search.cli import main

SECRET = "s3cr3t-Zq"


def _search(ts, *extra: str, **change: str) -> list[str]:
    """A valid tiny search (storage and output under ./studies/), options replaced or added."""
    args = ["--model", "test_vit", "--checkpoint", str(ts.ckpt), "--data", str(ts.data), "--budget", "50%GFLOPs",
            "--trials", "2", "--calib-images", "16", "--batch-size", "8", "--threads", "1", "--progress", "quiet",
            "--study-name", "h"]
    for k, v in change.items():
        i = args.index("--" + k.replace("_", "-"))
        if v is None:
            del args[i : i + 2]
        else:
            args[i + 1] = v
    return ["search", *args, *extra]


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _one_line(code: int, err: str, expect: str, *, exit_code: int = 2) -> str:
    assert code == exit_code, err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line, got:\n{err}"
    assert lines[0].startswith("rapid-search: ") and "Traceback" not in err
    assert expect in lines[0], lines[0]
    return lines[0]


# ---- 1. passwords, whatever the URL's shape -------------------------------------------------------
URL_SHAPES = {
    "at-then-colon": (f"postgresql+psycopg2://user:p@ss:{SECRET}@127.0.0.1:1/db", ["p@ss", SECRET, "ss:"]),
    "at-then-colon-no-port": (f"postgresql+psycopg2://user:p@ss:{SECRET}@127.0.0.1/db", [SECRET, "ss:"]),
    "colons-and-ats": (f"postgresql+psycopg2://user:ab:cd@ef:{SECRET}@127.0.0.1:1/db", ["ab:cd", "cd@ef", SECRET, '"ef"']),
    "colon-in-password": (f"postgresql+psycopg2://user:x:{SECRET}@127.0.0.1:1/db", [SECRET]),
    "slash-in-password": (f"postgresql+psycopg2://user:a/{SECRET}@127.0.0.1:1/db", [SECRET]),
    "hash-in-password": (f"postgresql+psycopg2://user:a#{SECRET}@127.0.0.1:1/db", [SECRET]),
    "question-in-password": (f"postgresql+psycopg2://user:a?{SECRET}@127.0.0.1:1/db", [SECRET]),
}


@pytest.mark.parametrize("shape", list(URL_SHAPES))
def test_password_never_printed_whatever_the_url_shape(shape, tiny_search, tmp_path, monkeypatch, capsys) -> None:
    """search and export, before any connection: one line, no piece of the password."""
    spec, secrets = URL_SHAPES[shape]
    monkeypatch.chdir(tmp_path)
    for argv in (_search(tiny_search, "--storage", spec), ["export", "--study-name", "x", "--storage", spec]):
        line = _one_line(main(argv), capsys.readouterr().err, "— ")
        for s in secrets:
            assert s not in line, f"{s!r} leaked: {line}"
    assert _listing(tmp_path) == []


def test_scrub_removes_every_piece_of_the_password() -> None:
    from rapid_search.search.storage import scrub

    url = f"postgresql+psycopg2://user:p@ss:{SECRET}@127.0.0.1:1/db"
    text = f"invalid literal for int() with base 10: '{SECRET}@127.0.0.1:1' (host 'ss', user 'user')"
    out = scrub(text, url)
    assert SECRET not in out and SECRET[:6] not in out and "'ss'" not in out
    assert "127.0.0.1:1" in out and "user 'user'" in out and out.startswith("invalid literal for int()")


def test_any_error_line_is_scrubbed(tiny_search, tmp_path, monkeypatch, capsys) -> None:
    """A raw URL in an exception raised anywhere (not only by open_storage) is masked by main."""
    spec = f"postgresql+psycopg2://user:p@ss:{SECRET}@127.0.0.1:1/db"
    import rapid_search.search.runner as runner

    def boom(opts, **kw):
        raise ValueError(f"could not use {opts.storage} (port {SECRET}@127.0.0.1:1)")

    monkeypatch.setattr(runner, "run_search", boom)
    monkeypatch.chdir(tmp_path)
    line = _one_line(main(_search(tiny_search, "--storage", spec)), capsys.readouterr().err, "could not use")
    assert SECRET not in line and "p@ss" not in line


def test_postgresql_url_without_a_driver_names_the_installed_one() -> None:
    """``postgresql://`` makes SQLAlchemy look for psycopg (v3); the extra installs psycopg2."""
    pytest.importorskip("psycopg2")
    from rapid_search.search.storage import StorageError, open_storage

    try:
        import psycopg  # noqa: F401
    except ImportError:
        with pytest.raises(StorageError, match=r"'psycopg' that postgresql:// uses is not installed — .*postgresql\+psycopg2://u:\*\*\*@127"):
            open_storage(f"postgresql://u:{SECRET}@127.0.0.1:1/db", study_name="x")
    else:  # pragma: no cover - psycopg installed: the URL works as written
        pytest.skip("psycopg is installed")


# ---- 8. terminal output --------------------------------------------------------------------------
def _schedule_with(tmp_path: Path, **provenance) -> Path:
    s = rs.rapid_schedule(timm.create_model("test_vit"), 0.5).with_meta(provenance=provenance)
    return s.save(tmp_path / "s.yaml")


def test_show_makes_control_characters_visible(tmp_path, capsys) -> None:
    path = _schedule_with(tmp_path, tool="\x1b[2J\x1b]0;owned\x07evil\x9b31m\u202eok")
    assert main(["show", str(path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\x9b" not in out and "\u202e" not in out
    assert "\\x1b[2J" in out and "evil" in out and "\n" in out


def test_errors_make_control_characters_visible(tmp_path, capsys) -> None:
    bad = tmp_path / "bad\x1b[31m.yaml"
    assert main(["show", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\\x1b[31m" in err


def test_show_into_a_closed_pipe_is_quiet(tmp_path) -> None:
    """``show s.yaml | head -1``: no traceback, no "Broken pipe" error; exit 141 (as SIGPIPE)."""
    path = _schedule_with(tmp_path, note="x" * 200_000)  # more than a pipe buffer
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    p = subprocess.Popen([sys.executable, "-m", "rapid_search.cli", "show", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    p.stdout.read(10)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141, err
    assert err == ""


def test_ctrl_c_during_start_up(monkeypatch, capsys) -> None:
    """Ctrl-C while the parser is built (the sub-commands import torch, timm, ...): one line, 130."""
    import rapid_search.cli as cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    _one_line(main(["show", "x.yaml"]), capsys.readouterr().err, "interrupted", exit_code=130)
