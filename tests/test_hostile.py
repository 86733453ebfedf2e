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
from helpers import search_argv
from rapid_search.cli import main
from rapid_search.search.space import DEFAULT_SPACE

SECRET = "s3cr3t-Zq"


def _search(ts, *extra: str, **change: str) -> list[str]:
    """A valid tiny search (storage and output under ./studies/), options replaced or added."""
    return search_argv(ts, "h", *extra, **change)


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
    from rapid_search.redact import scrub

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
    from rapid_search.storage import StorageError, open_storage

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


# ---- 2. journals: torn or corrupted tails, damage inside, disk full ------------------------------
def _journal_study(tiny_search, tmp_path, monkeypatch, capsys, trials: str = "2") -> Path:
    monkeypatch.chdir(tmp_path)
    assert main(_search(tiny_search, trials=trials)) == 0, capsys.readouterr().err
    capsys.readouterr()
    journal = tmp_path / "studies" / "h.journal"
    assert journal.is_file()
    return journal


def _finished(journal: Path, name: str = "h") -> int:
    import optuna

    from rapid_search.storage import open_storage

    study = optuna.load_study(study_name=name, storage=open_storage(str(journal), study_name=name, create=False, log=lambda m: None))
    return sum(t.state.is_finished() and t.state.name in ("COMPLETE", "PRUNED") for t in study.trials)


@pytest.mark.parametrize("damage", ["torn-last-record", "garbage-appended", "torn-then-garbage"])
def test_damaged_journal_tail_is_repaired_with_a_backup(damage, tiny_search, tmp_path, monkeypatch, capsys) -> None:
    """A cut last record or garbage after the last record: the next search keeps a backup, cuts the
    tail back to the last complete record (one line saying so), and resumes; export reads it
    meanwhile without changing it."""
    journal = _journal_study(tiny_search, tmp_path, monkeypatch, capsys)
    good = journal.read_bytes()
    last = good[: -1].rfind(b"\n") + 1
    damaged = {
        "torn-last-record": good[: last + (len(good) - last) // 2],
        "garbage-appended": good + b"\x00\xff\xfegarbage\n{\"op_code\": \n",
        "torn-then-garbage": good[:-5] + b"\n\x1b[31m\xff not json",
    }[damage]
    journal.write_bytes(damaged)
    # export: read-only, reads a repaired copy, the file is left as it is
    assert main(["export", "--study-name", "h", "--out", str(tmp_path / "e.yaml")]) == 0
    assert "read without it" in capsys.readouterr().err
    assert journal.read_bytes() == damaged
    # search: repaired in place after a backup, then resumed
    assert main(_search(tiny_search, trials="3")) == 0
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if "back to its last complete record" in line]
    assert len(notes) == 1 and "journal file studies/h.journal " in notes[0], err
    backups = list(journal.parent.glob("h.journal.damaged-*"))
    assert len(backups) == 1 and backups[0].read_bytes() == damaged and f"studies/{backups[0].name}" in notes[0]
    assert _finished(journal) >= 3
    from rapid_search.storage import check_journal

    assert check_journal(journal, repair=False) is None  # clean now


@pytest.mark.parametrize("damage", ["unknown-op-code", "undecodable-record-inside"])
def test_damage_inside_a_journal_is_refused_unchanged(damage, tiny_search, tmp_path, monkeypatch, capsys) -> None:
    journal = _journal_study(tiny_search, tmp_path, monkeypatch, capsys)
    lines = journal.read_bytes().split(b"\n")
    mid = len(lines) // 2
    lines[mid] = b'{"op_code": 99, "worker_id": "x"}' if damage == "unknown-op-code" else lines[mid][: len(lines[mid]) // 2] + b"\xff"
    journal.write_bytes(b"\n".join(lines))
    before = journal.read_bytes()
    expect = "unknown op code 99" if damage == "unknown-op-code" else f"damaged at line {mid + 1}"
    for argv in (_search(tiny_search, trials="3"), ["export", "--study-name", "h"]):
        line = _one_line(main(argv), capsys.readouterr().err, expect)
        assert "journal file studies/h.journal " in line and "another --study-name" in line and "left unchanged" in line
    assert journal.read_bytes() == before
    assert not list(journal.parent.glob("*.damaged-*"))


def test_disk_full_during_a_search(tiny_search, tmp_path, monkeypatch, capsys) -> None:
    """The disk fills up after 2 finished trials, in the middle of a journal write: one line naming
    the journal and the fix, the best schedule so far written, the journal still ending with a
    complete record, and the same command resumes once there is space."""
    import rapid_search.storage as storage

    monkeypatch.chdir(tmp_path)
    real = storage._write_all
    state = {"complete": 0}

    def write_all(fd, data):
        if state["complete"] >= 2:
            real(fd, data[: len(data) // 2])  # part of the record reaches the disk, then it is full
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data)
        state["complete"] += data.count(b'"op_code":6') and data.count(b'"state":1')

    monkeypatch.setattr(storage, "_write_all", write_all)
    out = tmp_path / "best.yaml"
    line = _one_line(main(_search(tiny_search, "--out", str(out), trials="6")), capsys.readouterr().err, "No space left on device")
    journal = tmp_path / "studies" / "h.journal"
    assert "journal file studies/h.journal:" in line
    assert "free space" in line and "re-run the same command" in line and f"best schedule so far written to {out}" in line
    assert rs.Schedule.load(out).budget is not None
    from rapid_search.storage import check_journal

    assert journal.read_bytes().endswith(b"\n") and check_journal(journal, repair=False) is None
    monkeypatch.setattr(storage, "_write_all", real)
    assert _finished(journal) >= 2
    assert main(_search(tiny_search, "--out", str(out), trials="3")) == 0
    assert _finished(journal) >= 3


def test_storage_failing_mid_search_is_one_line(tiny_search, tmp_path, monkeypatch, capsys) -> None:
    """A database server that dies during the search (as Optuna reports it: StorageInternalError
    from an SQLAlchemy OperationalError): one line, the study kept, the best schedule so far."""
    import optuna
    import sqlalchemy.exc

    from optuna.storages.journal import JournalStorage

    monkeypatch.chdir(tmp_path)
    real = JournalStorage.set_trial_state_values
    calls = {"n": 0}

    def dying(self, trial_id, state, values=None):
        if state.is_finished():
            calls["n"] += 1
            if calls["n"] > 2:
                try:
                    raise sqlalchemy.exc.OperationalError("UPDATE trials", {}, Exception("server closed the connection unexpectedly"))
                except sqlalchemy.exc.OperationalError as e:
                    raise optuna.exceptions.StorageInternalError("An exception is raised during the commit.") from e
        return real(self, trial_id, state, values)

    monkeypatch.setattr(JournalStorage, "set_trial_state_values", dying)
    out = tmp_path / "best.yaml"
    line = _one_line(main(_search(tiny_search, "--out", str(out), trials="6")), capsys.readouterr().err, "failed during the search")
    assert "server closed the connection unexpectedly" in line and "re-run the same command to resume" in line
    assert "study 'h' kept" in line and f"best schedule so far written to {out}" in line
    assert out.is_file()


# ---- 3. outputs that must not be replaced --------------------------------------------------------
def _fixture_files(tmp_path: Path, tiny_search) -> dict[str, Path]:
    space = tmp_path / "space.yaml"
    space.write_text(DEFAULT_SPACE.read_text())
    schedule = _schedule_with(tmp_path)
    image = tmp_path / "img.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "studies").mkdir()
    journal = tmp_path / "studies" / "h.journal"
    journal.write_bytes(b'{"op_code":0,"worker_id":"w","study_name":"h","directions":[2]}\n')
    link = tmp_path / "link.yaml"
    link.symlink_to(space)
    # the character device, reached through a link: were the guard ever broken, the atomic rename
    # would replace this link, never /dev/null itself (which a test running as root would destroy)
    null = tmp_path / "null"
    null.symlink_to("/dev/null")
    return {"space": space, "schedule": schedule, "image": image, "fifo": fifo, "journal": journal, "link": link, "null": null}


OUTPUT_CASES = {
    # id -> (argv builder (files, tiny search), text of the one-line message)
    "search-out-is-the-journal": (lambda f, t: _search(t, "--out", "studies/h.journal"), "is the study's journal file"),
    "search-out-is-the-journal-spelled-otherwise": (lambda f, t: _search(t, "--out", "./studies/../studies/h.journal"), "is the study's journal file"),
    "search-out-is-the-space": (lambda f, t: _search(t, "--space", str(f["space"]), "--out", str(f["space"])), "is the --space file"),
    "search-out-links-to-the-space": (lambda f, t: _search(t, "--space", str(f["space"]), "--out", str(f["link"])), "is the --space file"),
    "search-out-is-the-checkpoint": (lambda f, t: _search(t, "--out", str(t.ckpt)), "is the --checkpoint file"),
    "search-out-is-dev-null": (lambda f, t: _search(t, "--out", str(f["null"])), "is a character device"),
    "search-out-is-a-fifo": (lambda f, t: _search(t, "--out", str(f["fifo"])), "is a named pipe"),
    "evaluate-json-is-the-schedule": (
        lambda f, t: ["evaluate", "--schedule", str(f["schedule"]), "--data", str(t.data), "--checkpoint", str(t.ckpt), "--json", str(f["schedule"])],
        "is the --schedule file",
    ),
    "evaluate-json-is-dev-null": (
        lambda f, t: ["evaluate", "--schedule", str(f["schedule"]), "--data", str(t.data), "--checkpoint", str(t.ckpt), "--json", str(f["null"])],
        "is a character device",
    ),
    "visualize-out-is-the-image": (
        lambda f, t: ["visualize", "--model", "test_vit", "--no-pretrained", "--schedule", "rapid@50", "--image", str(f["image"]), "--out", str(f["image"])],
        "is the --image file",
    ),
    "visualize-out-is-dev-null": (
        lambda f, t: ["visualize", "--model", "test_vit", "--no-pretrained", "--schedule", "rapid@50", "--image", str(f["image"]), "--out", str(f["null"])],
        "is a character device",
    ),
    "visualize-out-has-no-ending": (  # matplotlib would write patches.png and the command say it wrote patches
        lambda f, t: ["visualize", "--model", "test_vit", "--no-pretrained", "--schedule", "rapid@50", "--image", str(f["image"]), "--out", "patches"],
        "--out patches has no ending to name its format — end the name with one of: .png, .pdf",
    ),
    "visualize-out-ends-txt": (
        lambda f, t: ["visualize", "--model", "test_vit", "--no-pretrained", "--schedule", "rapid@50", "--image", str(f["image"]), "--out", "v.txt"],
        "ends with '.txt', not a format it can be written in",
    ),
    "bench-output-is-a-searched-schedule": (
        lambda f, t: ["bench", "--model", "test_vit", "--no-pretrained", "--data", str(t.data), "--searched", str(f["schedule"].parent / "table.md"),
                      "--out-dir", str(f["schedule"].parent), "--quiet"],
        "is a --searched schedule",
    ),
}


@pytest.mark.parametrize("case", list(OUTPUT_CASES))
def test_outputs_never_replace_inputs_the_study_or_devices(case, tiny_search, tmp_path, monkeypatch, capsys) -> None:
    files = _fixture_files(tmp_path, tiny_search)
    if case.startswith("bench"):
        files["schedule"].rename(tmp_path / "table.md")
    monkeypatch.chdir(tmp_path)
    build, expect = OUTPUT_CASES[case]
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink() and p.name not in ("fifo", "null")}
    listing = _listing(tmp_path)
    _one_line(main(build(files, tiny_search)), capsys.readouterr().err, expect)
    assert _listing(tmp_path) == listing
    assert {p: p.read_bytes() for p in before} == before
    assert files["null"].is_symlink() and files["null"].is_char_device()


def test_export_out_is_never_the_journal(tiny_search, tmp_path, monkeypatch, capsys) -> None:
    journal = _journal_study(tiny_search, tmp_path, monkeypatch, capsys)
    size = journal.stat().st_size
    for out in ("studies/h.journal", str(journal)):
        _one_line(main(["export", "--study-name", "h", "--out", out]), capsys.readouterr().err, "is the study's journal file")
    assert journal.stat().st_size == size and _finished(journal) >= 2


def test_atomic_write_never_replaces_a_device(tmp_path) -> None:
    from rapid_search.outputs import OutputError, atomic_write_text

    null = tmp_path / "null"
    null.symlink_to("/dev/null")  # never /dev/null itself: a broken guard run as root would replace it
    with pytest.raises(OutputError, match="character device"):
        atomic_write_text(null, "x")
    assert null.is_symlink() and null.is_char_device()
    assert atomic_write_text(tmp_path / "a.txt", "x").read_text() == "x"


# ---- 4. study names that are names --------------------------------------------------------------
BAD_NAMES = {
    "parent-path": "../../../x",
    "absolute": "{tmp}/abs-study",  # inside the test's folder (the listing below sees it if written)
    "separator": "a/b",
    "dot-dot": "..",
    "backslash": "a\\b",
    "control-chars": "x\x1b[31my",
    "newline": "x\ny",
    "too-long": "x" * 200,
    "empty": "",
}


@pytest.mark.parametrize("kind", list(BAD_NAMES))
def test_study_names_are_names(kind, tiny_search, tmp_path, monkeypatch, capsys) -> None:
    work = tmp_path / "a" / "b" / "c"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    name = BAD_NAMES[kind].replace("{tmp}", str(tmp_path))
    for argv in (_search(tiny_search, study_name=name), ["export", "--study-name", name]):
        line = _one_line(main(argv), capsys.readouterr().err, "is not a plain name")
        assert "use letters, digits" in line and "\x1b" not in line
    assert _listing(tmp_path) == ["a", "a/b", "a/b/c"]


# ---- 5. YAML: size, depth, alias expansion, duplicate keys, strings that are not booleans ---------
def _deep(levels: int) -> str:
    return "format: rapid-schedule/v1\nprovenance:\n" + "".join("  " * (i + 1) + f"k{i}:\n" for i in range(levels)) + "  " * (levels + 1) + "x: 1\n"


def _alias_bomb() -> str:
    """About 1.5 KB that expands to 9**12 strings."""
    lines = ['l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 12):
        lines.append(f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def _schedule_text(**extra: str) -> str:
    text = rs.rapid_schedule(timm.create_model("test_vit"), 0.5).to_yaml()
    return text + "".join(f"{k}: {v}\n" for k, v in extra.items())


YAML_CASES = {
    # id -> (file text, text of the one-line message)
    "500-deep": (lambda: _deep(500), "nested deeper than 64 levels"),
    "500-deep-flow": (lambda: "[" * 500 + "]" * 500, "nested deeper than 64 levels"),
    "alias-bomb": (lambda: _schedule_text().replace("provenance:", "provenance:\n  bomb: *l11\n  was:") .replace("format:", _alias_bomb() + "format:", 1), "aliases expand to more than"),
    "recursive-alias": (lambda: "a: &a [*a]\n", "recursive alias"),
    "duplicate-layers": (lambda: _schedule_text() + "layers: []\n", "duplicate key 'layers'"),
    "too-large": (lambda: _schedule_text() + "# " + "x" * (1 << 20) + "\n", "larger than 1024 KB"),
    # PyYAML's reader refuses these before parsing: a binary file, a control character mid-file
    "nul-bytes": (lambda: "\x00\x01\x02", "non-printable character U+0000"),
    "bell-in-line-2": (lambda: _schedule_text().replace("\n", "\n\n", 1).replace("\n\n", "\n\x07\n", 1), "non-printable character U+0007 (is it a text file?)"),
    "utf-16": (lambda: _schedule_text().encode("utf-16"), "not UTF-8 text"),
}


@pytest.mark.parametrize("case", list(YAML_CASES))
def test_yaml_limits_in_every_reader(case, tiny_search, tmp_path, monkeypatch, capsys) -> None:
    """The same file through show, evaluate --schedule, visualize --schedule and search --space:
    one line each, nothing expanded, nothing written."""
    make, expect = YAML_CASES[case]
    text = make()
    if case == "alias-bomb":
        assert len(_alias_bomb()) < 1600
    f = tmp_path / "in.yaml"
    f.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    image = tmp_path / "img.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    monkeypatch.chdir(tmp_path)
    listing = _listing(tmp_path)
    for argv in (
        ["show", str(f)],
        ["evaluate", "--schedule", str(f), "--data", str(tiny_search.data), "--checkpoint", str(tiny_search.ckpt)],
        ["visualize", "--model", "test_vit", "--no-pretrained", "--schedule", str(f), "--image", str(image), "--out", "v.png"],
        _search(tiny_search, "--space", str(f)),
    ):
        line = _one_line(main(argv), capsys.readouterr().err, expect)
        assert "in.yaml" in line and "— " in line
    assert _listing(tmp_path) == listing


def test_yaml_reader_errors_carry_their_line() -> None:
    """PyYAML's reader (which refuses non-printable characters before parsing) gives a position, not a
    line: the error names the character and its 1-based line; undecodable bytes are refused by read_yaml."""
    from rapid_search.yamlsafe import YAMLInputError, load_yaml, read_yaml

    with pytest.raises(YAMLInputError) as e:
        load_yaml("a: 1\nb: 2\nc: \x1b[31m\n")
    assert (e.value.line, e.value.syntax) == (3, True) and "U+001B" in e.value.reason
    assert load_yaml("a: 1\n") == {"a": 1}


def test_search_space_log_must_be_a_boolean(tiny_search, tmp_path, monkeypatch, capsys) -> None:
    from rapid_search.search.space import SearchSpace, SearchSpaceError

    full = DEFAULT_SPACE.read_text()
    assert "prune_weight: {low: 0.25, high: 4.0, log: true}" in full
    f = tmp_path / "space.yaml"
    f.write_text(full.replace("log: true}", "log: 'false'}"))
    with pytest.raises(SearchSpaceError, match=r"prune_weight.log = 'false' must be true or false"):
        SearchSpace.load(f)
    f.write_text(full.replace("log: true}", "log: false}"))
    assert SearchSpace.load(f).prune_weight.log is False


# ---- 9. remaining tracebacks: inputs that are directories, corrupt checkpoints, huge images ------
def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels (no pixel data): a decompression bomb's header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))  # noqa: E731
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_inputs_that_are_directories_say_so(tiny_search, tmp_path, monkeypatch, capsys) -> None:
    d = tmp_path / "folder.yaml"
    d.mkdir()
    monkeypatch.chdir(tmp_path)
    image = tmp_path / "img.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    for argv in (
        ["show", str(d)],
        _search(tiny_search, "--space", str(d)),
        _search(tiny_search, checkpoint=str(d)),
        ["visualize", "--model", "test_vit", "--no-pretrained", "--schedule", "rapid@50", "--image", str(d), "--out", "v.png"],
    ):
        line = _one_line(main(argv), capsys.readouterr().err, "is a directory, not a file")
        assert "does not exist" not in line


def test_corrupt_safetensors_checkpoint(tiny_search, tmp_path, monkeypatch, capsys) -> None:
    from safetensors.torch import save_file

    good = tmp_path / "w.safetensors"
    save_file(timm.create_model("test_vit").state_dict(), str(good))
    data = good.read_bytes()
    monkeypatch.chdir(tmp_path)
    for name, blob in (("truncated", data[: len(data) // 2]), ("garbage", os.urandom(256)), ("huge-header", struct.pack("<Q", 2**40) + b"{}")):
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(blob)
        line = _one_line(main(_search(tiny_search, checkpoint=str(bad))), capsys.readouterr().err, f"cannot read checkpoint {bad}")
        assert ".safetensors" in line
    assert not (tmp_path / "studies").exists()


def test_900_megapixel_image_in_visualize(tmp_path, monkeypatch, capsys) -> None:
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header(30_000, 30_000))
    assert bomb.stat().st_size < 100
    monkeypatch.chdir(tmp_path)
    argv = ["visualize", "--model", "test_vit", "--no-pretrained", "--schedule", "rapid@50", "--image", str(bomb), "--out", "v.png"]
    _one_line(main(argv), capsys.readouterr().err, "pixels (PIL's limit against decompression bombs)")
    assert not (tmp_path / "v.png").exists()


# ---- 6. data folders: loops, odd names, duplicates -----------------------------------------------
def _hostile_folder(root: Path, n: int = 10) -> Path:
    """``n`` real 64 px PNGs (one with a non-UTF-8 name) in a flat tree, plus a symbolic link to
    itself, a directory link back to the root (a loop), a link and a hard link to an image, and a
    dangling link."""
    rng = np.random.default_rng(1)
    sub = root / "sub"
    sub.mkdir(parents=True)
    for i in range(n - 1):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save((root if i % 2 else sub) / f"img{i}.png")
    odd = os.path.join(os.fsencode(root), b"caf\xe9-\xff.png")  # Latin-1 bytes: not UTF-8
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(os.fsdecode(odd), format="PNG")
    (root / "self.png").symlink_to("self.png")
    (sub / "loop").symlink_to("..", target_is_directory=True)
    (sub / "again").symlink_to(sub, target_is_directory=True)
    (root / "dup.png").symlink_to(root / "img1.png")
    os.link(root / "img3.png", root / "hard.png")
    (root / "gone.png").symlink_to(root / "nowhere.png")
    return root


def test_data_walk_counts_each_real_image_once(tmp_path) -> None:
    from rapid_search.tools.data import list_images

    root = _hostile_folder(tmp_path / "data")
    paths, labels = list_images(root)
    assert labels is None and len(paths) == 10, [str(p) for p in paths]
    assert len({os.stat(p).st_ino for p in paths}) == 10
    assert any(b"\xff" in os.fsencode(p) for p in paths)


def test_search_on_a_hostile_folder(tiny_search, tmp_path, monkeypatch, capsys) -> None:
    root = _hostile_folder(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    code = main(_search(tiny_search, data=str(root), trials="1", calib_images="16", progress="plain"))
    err = capsys.readouterr().err
    assert code == 0, err
    assert "10 calibration images" in err and "Traceback" not in err


# ---- 7. set-up values compared after normalisation ----------------------------------------------
def test_budget_and_device_spellings_are_one_study(tiny_search, tmp_path, monkeypatch, capsys) -> None:
    """'50%gflops', ' 50% GFLOPs ' and 'CPU ' are the canonical 50%GFLOPs on cpu: the same
    default study name, and accepted when resuming a study recorded either way."""
    monkeypatch.chdir(tmp_path)
    assert main(_search(tiny_search, budget="50%gflops", study_name=None, trials="1")) == 0, capsys.readouterr().err
    capsys.readouterr()
    journals = sorted(p.name for p in (tmp_path / "studies").glob("*.journal"))
    assert journals == ["test_vit-50pctGFLOPs-cpu-n16-s0.journal"]
    for budget, device in ((" 50% GFLOPs ", "CPU "), ("50.0%GFLOPs", "cpu")):
        code = main(_search(tiny_search, "--device", device, budget=budget, study_name=None, trials="2"))
        assert code == 0, capsys.readouterr().err
        capsys.readouterr()
    assert sorted(p.name for p in (tmp_path / "studies").glob("*.journal")) == journals
    import yaml as _yaml

    assert _yaml.safe_load((tmp_path / "studies" / "test_vit-50pctGFLOPs-cpu-n16-s0.yaml").read_text())["budget"]["spec"] == "50%GFLOPs"


def test_a_study_recorded_with_another_spelling_is_resumed(tmp_path) -> None:
    from rapid_search.search.runner import _check_setup

    class Study:
        study_name = "x"
        user_attrs = {"setup": {"budget": " 50% gflops", "model": "m"}}

    _check_setup(Study(), {"budget": "50%GFLOPs", "model": "m"})  # an older study recorded the raw text
    from rapid_search.search.study import SearchError

    with pytest.raises(SearchError, match="was started with budget"):
        _check_setup(Study(), {"budget": "60%GFLOPs", "model": "m"})


# ---- 9. the rest: NaN weights, bench --repeats 0 -----------------------------------------------
def test_nan_weights_blame_the_weights(tiny_search, tmp_path, monkeypatch, capsys) -> None:
    state = torch.load(tiny_search.ckpt, weights_only=True)
    state["head.weight"] = torch.full_like(state["head.weight"], float("nan"))
    ckpt = tmp_path / "nan.pth"
    torch.save(state, ckpt)
    monkeypatch.chdir(tmp_path)
    line = _one_line(main(_search(tiny_search, checkpoint=str(ckpt))), capsys.readouterr().err, "non-finite outputs")
    assert "--checkpoint" in line and "--budget" not in line
    assert not (tmp_path / "studies").exists()


def test_bench_without_timing(tiny_search, tmp_path, monkeypatch, capsys) -> None:
    """``bench --repeats 0`` skips timing: the table shows no speed, and nothing raises."""
    monkeypatch.chdir(tmp_path)
    argv = ["bench", "--model", "test_vit", "--checkpoint", str(tiny_search.ckpt), "--data", str(tiny_search.data), "--repeats", "0",
            "--n-boot", "10", "--ratios", "50", "--threads", "1", "--out-dir", "out", "--quiet"]
    assert main(argv) == 0, capsys.readouterr().err
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| —x |" in table and json.loads((tmp_path / "out" / "results.json").read_text())


def test_data_that_is_a_file_is_not_reported_missing(tiny_search, tmp_path, monkeypatch, capsys) -> None:
    f = tmp_path / "notes.txt"
    f.write_text("x")
    schedule = _schedule_with(tmp_path)
    monkeypatch.chdir(tmp_path)
    for argv in (
        ["evaluate", "--schedule", str(schedule), "--data", str(f), "--checkpoint", str(tiny_search.ckpt)],
        ["bench", "--model", "test_vit", "--checkpoint", str(tiny_search.ckpt), "--data", str(f), "--quiet"],
        _search(tiny_search, data=str(f)),
    ):
        line = _one_line(main(argv), capsys.readouterr().err, "is not a directory")
        assert "does not exist" not in line


@pytest.mark.parametrize("text", ["37.123456789%GFLOPs", "0.00001GFLOPs", "7%latency", "12.5 ms", "50.000%gflops"])
def test_canonical_budget_reads_back_to_the_same_value(text) -> None:
    from rapid_search.search.budget import parse_budget

    spec = parse_budget(text)
    again = parse_budget(spec.canonical)
    assert again.canonical == spec.canonical and abs(again.value - spec.value) <= 1e-12 * max(1.0, spec.value)
