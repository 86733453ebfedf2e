"""Every row of the bad-input table (README, "Bad inputs and what they get"), run for real.

Each bad input gets exactly one stderr line starting ``rapid-search: error:`` that names the fix,
exit code 2, no traceback, and no output written (the working directory, where the default
``studies/`` journal and schedule would go, is left exactly as it was). Most rows run
``rapid_search.cli.main`` in-process; two run the console code in a real subprocess.
Also: loading never executes code from files, and storage passwords never leak.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
import timm
import torch
import yaml
from PIL import Image

import rapid_search as rs
from helpers import search_argv
from rapid_search.cli import main
from rapid_search.search.space import DEFAULT_SPACE

FULL_SPACE = DEFAULT_SPACE.read_text()
SECRET = "s3cret-Pw-4711"


@pytest.fixture(scope="module")
def bad(tmp_path_factory, tiny_search):
    """A folder of hostile inputs, made once."""
    d = tmp_path_factory.mktemp("bad-inputs")
    good = rs.rapid_schedule(timm.create_model("test_vit"), 0.5)
    good.save(d / "good.yaml")

    def variant(name: str, change) -> None:
        data = yaml.safe_load((d / "good.yaml").read_text())
        change(data)
        (d / name).write_text(yaml.safe_dump(data))

    (d / "malformed.yaml").write_text("format: [unclosed\n  layers: {")
    text = (d / "good.yaml").read_text()
    (d / "truncated.yaml").write_text(text[: len(text) // 3])
    (d / "code.yaml").write_text(f"!!python/object/apply:os.system ['touch {d / 'PWNED'}']\n")
    (d / "empty.yaml").write_text("")
    variant("r_negative.yaml", lambda s: s["layers"][0].update(r=-3))
    variant("r_float.yaml", lambda s: s["layers"][0].update(r=2.5))
    variant("r_huge.yaml", lambda s: s["layers"][0].update(r=10**12))
    variant("threshold.yaml", lambda s: s["layers"][4].update(threshold=1.5))
    variant("op.yaml", lambda s: s["layers"][0].update(op="squash"))
    with torch.device("meta"):  # architecture only
        rs.rapid_schedule(timm.create_model("deit_tiny_patch16_224"), 0.5).save(d / "deit_tiny.yaml")
    (d / "space_malformed.yaml").write_text("format: rapid-search-space/v1\nswitch: {low: 0.0, high: [\n")
    (d / "space_truncated.yaml").write_text(FULL_SPACE[: FULL_SPACE.rindex("\n", 0, len(FULL_SPACE) // 2) + 1])  # cut at a line end: valid YAML, keys missing
    (d / "space_threshold.yaml").write_text(FULL_SPACE.replace("low: 0.3, high: 0.95", "low: 0.3, high: 1.5"))
    (d / "space_narrow.yaml").write_text(FULL_SPACE.replace("protect: {low: 0.0, high: 0.6}", "protect: {low: 0.1, high: 0.5}"))
    (d / "empty_dir").mkdir()
    (d / "a_file").write_text("not a folder")
    for name, make in (("corrupt", lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))),
                       ("tiny_images", lambda p: Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(p))):
        (d / name / "n01440764").mkdir(parents=True)
        for i in range(4):
            make(d / name / "n01440764" / f"x{i}.png")
    (d / "unreadable" / "n01440764").mkdir(parents=True)
    (d / "pickle.pth").write_bytes(f"cos\nsystem\n(S'touch {d / 'PWNED'}'\ntR.".encode())
    torch.save(timm.create_model("test_vit2").state_dict(), d / "other_arch.pth")
    return d


def _search(ts, *extra: str, **change: str) -> list[str]:
    """A valid tiny search (default storage and output: ./studies/), with options replaced/added."""
    return search_argv(ts, "bad", *extra, **change)


# id -> (argv builder (bad folder, tiny search) -> argv, text the one-line message must contain)
ROWS = {
    "schedule-malformed-yaml": (lambda b, t: ["show", str(b / "malformed.yaml")], "not valid YAML at line"),
    "schedule-truncated-yaml": (lambda b, t: ["show", str(b / "truncated.yaml")], "re-export it"),
    "schedule-empty-file": (lambda b, t: ["show", str(b / "empty.yaml")], "file is empty"),
    "schedule-code-tag": (lambda b, t: ["show", str(b / "code.yaml")], "not valid YAML"),
    "schedule-missing": (lambda b, t: ["show", str(b / "nope.yaml")], "does not exist"),
    "schedule-negative-r": (lambda b, t: ["show", str(b / "r_negative.yaml")], "use 0 or more tokens"),
    "schedule-non-integer-r": (lambda b, t: ["show", str(b / "r_float.yaml")], "must be a whole number"),
    "schedule-huge-r": (lambda b, t: ["show", str(b / "r_huge.yaml")], "lower r"),
    "schedule-threshold-out-of-range": (lambda b, t: ["show", str(b / "threshold.yaml")], "in [-1, 1]"),
    "schedule-unknown-op": (lambda b, t: ["show", str(b / "op.yaml")], "use one of: none, prune, merge"),
    "schedule-for-another-model": (
        lambda b, t: ["evaluate", "--schedule", str(b / "deit_tiny.yaml"), "--data", str(t.data), "--model", "test_vit",
                      "--checkpoint", str(t.ckpt), "--threads", "1"],
        "make a schedule for this model",
    ),
    "space-malformed-yaml": (lambda b, t: _search(t, "--space", str(b / "space_malformed.yaml")), "not valid YAML"),
    "space-truncated-yaml": (lambda b, t: _search(t, "--space", str(b / "space_truncated.yaml")), "copy them from " + str(DEFAULT_SPACE)),
    "space-threshold-out-of-range": (lambda b, t: _search(t, "--space", str(b / "space_threshold.yaml")), "<= 1.0"),
    "space-code-tag": (lambda b, t: _search(t, "--space", str(b / "code.yaml")), "not valid YAML"),
    "trials-negative": (lambda b, t: _search(t, "--trials=-3"), "must be at least 1"),
    "trials-zero": (lambda b, t: _search(t, trials="0"), "must be at least 1"),
    "trials-non-integer": (lambda b, t: _search(t, trials="2.5"), "is not a whole number"),
    "trials-huge": (lambda b, t: _search(t, trials="99999999999"), "at most 1000000"),
    "batch-size-zero": (lambda b, t: _search(t, batch_size="0"), "must be at least 1"),
    "batch-size-huge": (lambda b, t: _search(t, batch_size="100000000"), "at most 65536"),
    "calib-images-too-few": (lambda b, t: _search(t, calib_images="4"), "too few"),
    "threads-huge": (lambda b, t: _search(t, threads="1000000"), "at most 1024"),
    "seed-negative": (lambda b, t: _search(t, "--seed=-1"), "at least 0"),
    "negative-value-as-option": (lambda b, t: _search(t, "--budget", "-50%GFLOPs"), "--option=VALUE"),
    "budget-malformed": (lambda b, t: _search(t, budget="banana"), "use one of: 50%GFLOPs"),
    "budget-missing-unit": (lambda b, t: _search(t, budget="50%"), "use one of"),
    "budget-negative": (lambda b, t: _search(t, "--budget=-50%GFLOPs"), "must be positive"),
    "budget-zero": (lambda b, t: _search(t, budget="0GFLOPs"), "must be positive"),
    "budget-100-percent-or-more": (lambda b, t: _search(t, budget="150%GFLOPs"), "reduces nothing"),
    "budget-above-model": (lambda b, t: _search(t, budget="5GFLOPs"), "reduces nothing"),
    "budget-impossible-flops": (lambda b, t: _search(t, budget="1%GFLOPs"), "raise the budget"),
    "budget-range-reversed": (lambda b, t: _search(t, budget="70%..35%GFLOPs"), "must go from low to high — use e.g. 35%..70%GFLOPs"),
    "budget-range-mixed-units": (lambda b, t: _search(t, budget="35%..0.9GFLOPs"), "mixes units (35%GFLOPs and 0.9GFLOPs)"),
    "budget-range-impossible": (lambda b, t: _search(t, budget="1%..50%GFLOPs"), "budget 1%..50%GFLOPs (0.000 GFLOPs) is below the cheapest schedule"),
    "budget-impossible-latency": (lambda b, t: _search(t, budget="0.0001ms", batch_size="1"), "raise the budget"),
    "data-missing": (lambda b, t: _search(t, data=str(b / "nope")), "does not exist"),
    "data-not-a-folder": (lambda b, t: _search(t, data=str(b / "a_file")), "is not a directory"),
    "data-empty": (lambda b, t: _search(t, data=str(b / "empty_dir")), "no image files"),
    "data-unreadable": (lambda b, t: _search(t, data=str(b / "unreadable")), "check its permissions"),
    "data-all-corrupt": (lambda b, t: _search(t, data=str(b / "corrupt")), "could be read"),
    "data-all-below-16px": (lambda b, t: _search(t, data=str(b / "tiny_images")), "too small"),
    "model-not-a-vit": (lambda b, t: _search(t, model="resnet18", checkpoint=None), "ResNet is not a timm VisionTransformer, Eva, Beit or VisionTransformerRelPos — rapid-search supports vit_*, deit*"),
    "model-unknown": (lambda b, t: _search(t, model="vit_nonexistent_xyz", checkpoint=None), "timm.list_models"),
    "checkpoint-missing": (lambda b, t: _search(t, checkpoint=str(b / "nope.pth")), "check the path"),
    "checkpoint-other-architecture": (lambda b, t: _search(t, checkpoint=str(b / "other_arch.pth")), "pass weights for this architecture"),
    "checkpoint-pickle-with-code": (lambda b, t: _search(t, checkpoint=str(b / "pickle.pth")), "state dict"),
    "device-cuda-absent": (lambda b, t: _search(t, "--device", "cuda"), "use --device cpu"),
    "storage-not-a-storage": (lambda b, t: _search(t, "--storage", "notastorage"), "use journal:PATH"),
    "storage-sqlite": (lambda b, t: _search(t, "--storage", "sqlite:///x.db"), "not safe for concurrent workers"),
    "storage-unreachable": (lambda b, t: _search(t, "--storage", f"postgresql+psycopg2://u:{SECRET}@127.0.0.1:1/db"), "that the server runs"),
    "storage-malformed-url": (lambda b, t: _search(t, "--storage", f"postgresql+psycopg2://u:{SECRET}@host:notaport/db"), "check the URL"),
    "grace-period-too-short-for-journal": (lambda b, t: _search(t, "--grace-period", "20"), "use --grace-period 51 or more"),
    "heartbeat-interval-not-below-grace": (lambda b, t: _search(t, "--heartbeat-interval", "70", "--grace-period", "60"), "must be at least 1 and below --grace-period 60"),
    "storage-journal-unwritable": (lambda b, t: _search(t, "--storage", "journal:/proc/rapid/x.journal"), "journal:PATH"),
    "out-unwritable": (lambda b, t: _search(t, "--out", "/proc/rapid/x.yaml"), "writable path"),
    "out-is-a-directory": (lambda b, t: _search(t, "--out", str(b)), "is a directory"),
    "export-no-study": (lambda b, t: ["export", "--study-name", "nope"], "run rapid-search search first"),
    "export-missing-journal": (lambda b, t: ["export", "--study-name", "nope", "--storage", str(b / "nope.journal")], "does not exist"),
    # export only reads: a mistyped storage is reported, never created (the listing check below)
    "export-missing-journal-relative": (lambda b, t: ["export", "--study-name", "nope", "--storage", "journal:typo.journal"], "does not exist"),
    "export-missing-sqlite": (lambda b, t: ["export", "--study-name", "nope", "--storage", "sqlite:///typo.db"], "SQLite file typo.db does not exist"),
    "export-sqlite-in-memory": (lambda b, t: ["export", "--study-name", "nope", "--storage", "sqlite://"], "names no SQLite file"),
    "evaluate-json-unwritable": (
        lambda b, t: ["evaluate", "--schedule", str(b / "good.yaml"), "--data", str(t.data), "--checkpoint", str(t.ckpt),
                      "--json", "/proc/rapid/x.json"],
        "pass --json with a writable path",
    ),
    "unknown-option": (lambda b, t: _search(t, "--frobnicate"), "unrecognized arguments"),
    "unknown-command": (lambda b, t: ["frobnicate"], "invalid choice"),
}


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _one_error_line(code: int, err: str, expect: str) -> str:
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line, got:\n{err}"
    assert lines[0].startswith("rapid-search: error: ") and "Traceback" not in err
    assert expect in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("row", list(ROWS))
def test_bad_input(row, bad, tiny_search, tmp_path, monkeypatch, capsys) -> None:
    build, expect = ROWS[row]
    argv = build(bad, tiny_search)
    if row == "data-unreadable":
        target = str(bad / "unreadable")
        if os.geteuid() == 0:  # root reads mode-000 folders: make the listing fail as it would for a user
            real = os.scandir
            monkeypatch.setattr(os, "scandir", lambda p=".": (_ for _ in ()).throw(PermissionError(13, "Permission denied", str(p))) if str(p) == target else real(p))
        else:
            os.chmod(target, 0)
    monkeypatch.chdir(tmp_path)
    before = _listing(tmp_path)
    try:
        code = main(argv)
    finally:
        if row == "data-unreadable" and os.geteuid() != 0:
            os.chmod(bad / "unreadable", 0o755)
    out, err = capsys.readouterr()
    line = _one_error_line(code, err, expect)
    assert out == ""
    assert SECRET not in line
    assert _listing(tmp_path) == before, "a failed command left output behind"
    assert not (bad / "PWNED").exists(), "a file's content was executed"


def test_corrupt_and_small_images_are_skipped_and_counted(bad, tiny_search, tmp_path, monkeypatch, capsys) -> None:
    """Corrupt files and images below 16 px among good ones are not errors: they are skipped and
    counted; images smaller than the model's input (but >= 16 px) are resized by timm's eval
    transform like any other."""
    data = tmp_path / "mixed"
    for src in tiny_search.data.rglob("*.png"):
        dst = data / src.parent.name / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(src.read_bytes())
    (data / "n01440764" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 32)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(data / "n01440764" / "dot.png")
    Image.fromarray(np.full((40, 30, 3), 128, np.uint8)).save(data / "n01440764" / "small.png")  # smaller than 160 px input
    monkeypatch.chdir(tmp_path)
    code = main(_search(tiny_search, data=str(data), calib_images="19", progress="plain", trials="1"))
    err = capsys.readouterr().err
    assert code == 0, err
    assert "skipped 2 unreadable image(s)" in err and "17 calibration images" in err


def test_study_with_another_setup_is_refused(bad, tiny_search, tmp_path, monkeypatch, capsys) -> None:
    """An existing study name with a different model or search space: one line, before any
    weights are loaded, and the study is left as it was."""
    monkeypatch.chdir(tmp_path)
    assert main(_search(tiny_search, trials="1")) == 0
    capsys.readouterr()
    journal = tmp_path / "studies" / "bad.journal"
    size = journal.stat().st_size
    for argv, expect in (
        (_search(tiny_search, model="vit_tiny_patch16_224", checkpoint=None), "was started with model = 'test_vit'"),
        (_search(tiny_search, "--space", str(bad / "space_narrow.yaml")), "was started with space = "),
        (_search(tiny_search, "--fixed-counts"), "(the search space's fingerprint: --space or --fixed-counts differ)"),
        (_search(tiny_search, budget="60%GFLOPs"), "was started with budget = '50%GFLOPs'"),
    ):
        line = _one_error_line(main(argv), capsys.readouterr().err, expect)
        assert "use another --study-name or the original settings" in line
    assert journal.stat().st_size == size


def test_loading_never_runs_code(bad) -> None:
    """yaml.safe_load and torch.load(weights_only=True) only: hostile files are refused unexecuted."""
    with pytest.raises(rs.ScheduleError):
        rs.Schedule.load(bad / "code.yaml")
    from rapid_search.tools.loading import ModelLoadError, load_model

    with pytest.raises(ModelLoadError):
        load_model("test_vit", checkpoint=bad / "pickle.pth")
    assert not (bad / "PWNED").exists()
    src = "\n".join(p.read_text() for p in (Path(rs.__file__).parent).rglob("*.py"))
    assert "yaml.load(" not in src and "yaml.unsafe_load" not in src and "pickle.load" not in src
    for call in [line for line in src.splitlines() if "torch.load(" in line and not line.strip().startswith((">>>", "#"))]:
        assert "weights_only=True" in call, call


def test_grace_period_for_journal_files() -> None:
    """A journal file's lock, left by a killed worker, blocks heartbeats for 30 s: with a journal
    the grace period must exceed 2 x interval + 30 s. The default is raised (with a note), a value
    set by --grace-period is refused; PostgreSQL has no such lock."""
    from rapid_search.search.runner import SearchOptions, heartbeat_timing
    from rapid_search.search.study import SearchError

    assert heartbeat_timing(SearchOptions()) == (10, 60, None)
    interval, grace, note = heartbeat_timing(SearchOptions(heartbeat_interval=20))
    assert (interval, grace) == (20, 71) and "journal file" in note
    for storage in (None, "journal:x.journal", "x.journal"):
        with pytest.raises(SearchError, match=r"--grace-period 60 is too short for a journal file.*use --grace-period 71 or more"):
            heartbeat_timing(SearchOptions(storage=storage, heartbeat_interval=20, grace_period=60))
    assert heartbeat_timing(SearchOptions(heartbeat_interval=1, grace_period=33)) == (1, 33, None)
    assert heartbeat_timing(SearchOptions(storage="postgresql+psycopg2://u@h/db", heartbeat_interval=1, grace_period=3)) == (1, 3, None)


# ---- storage passwords ------------------------------------------------------------------------------
# A password with an unescaped "@": a parser that splits at the first "@" takes "t-Pw-4711@host"
# for the host, and the driver's error repeats that.
AT_SECRET = "s3cr@t-Pw-4711"
# Every way a password can sit in a --storage value (id -> (value, texts that must never show)).
LEAKY_SPECS = {
    "userinfo": (f"postgresql+psycopg2://u:{SECRET}@127.0.0.1:1/db", [SECRET]),
    "userinfo-bad-port": (f"postgresql+psycopg2://u:{SECRET}@h:x/db", [SECRET]),
    "userinfo-no-host": (f"mysql://u:{SECRET}@/db", [SECRET]),
    "query-password": (f"postgresql+psycopg2://u@127.0.0.1:1/db?password={SECRET}", [SECRET]),
    "query-password-among-others": (f"postgresql+psycopg2://u@127.0.0.1:1/db?sslmode=disable&password={SECRET}&application_name=x", [SECRET]),
    "unescaped-at": (f"postgresql+psycopg2://u:{AT_SECRET}@127.0.0.1:1/db", [AT_SECRET, "t-Pw-4711", "s3cr"]),
    "unescaped-at-unknown-host": (f"postgresql+psycopg2://u:{AT_SECRET}@nohost.invalid/db", [AT_SECRET, "t-Pw-4711", "s3cr"]),
    "percent-encoded": ("postgresql+psycopg2://u:s3cret%40Pw-4711@127.0.0.1:1/db", ["s3cret%40Pw-4711", "s3cret@Pw-4711", "Pw-4711"]),
    "no-scheme": (f"u:{SECRET}@127.0.0.1/db", [SECRET]),
    "malformed-scheme": (f"postgresql+psycopg2:/u:{SECRET}@127.0.0.1:1/db", [SECRET]),
    "three-slashes": (f"postgresql+psycopg2:///u:{SECRET}@127.0.0.1:1/db", [SECRET]),
}


def _no_leak(text: str, secrets: list[str]) -> None:
    for secret in secrets:
        assert secret not in text, f"{secret!r} leaked: {text}"


@pytest.mark.parametrize("form", list(LEAKY_SPECS))
def test_password_masked_in_storage_errors(form, tmp_path) -> None:
    """Whatever form the password takes (user:pw@, ?password=, an unescaped @ in it, no scheme or a
    malformed one), it is in no message, no masked URL and no storage description (the progress
    header's), and the message stays readable (no fragment replaced blindly)."""
    from rapid_search.redact import mask_url
    from rapid_search.storage import StorageError, describe_storage, open_storage

    spec, secrets = LEAKY_SPECS[form]
    for create in (True, False):
        with pytest.raises(StorageError) as e:
            open_storage(spec, study_name="x", create=create)
        msg = str(e.value)
        _no_leak(msg, secrets)
        assert "— " in msg and ("***" in msg or "not shown" in msg), msg
    _no_leak(mask_url(spec), secrets)
    _no_leak(describe_storage(spec, "x", tmp_path), secrets)
    if "://" in spec and not spec.startswith("postgresql+psycopg2:/u"):
        assert "***" in mask_url(spec)


def test_password_masked_in_search_errors(tiny_search, tmp_path, monkeypatch, capsys) -> None:
    """The same forms through the command line: one line, exit 2, the password nowhere, nothing written."""
    monkeypatch.chdir(tmp_path)
    for form, (spec, secrets) in LEAKY_SPECS.items():
        line = _one_error_line(main(_search(tiny_search, "--storage", spec)), capsys.readouterr().err, "— ")
        _no_leak(line, secrets)
        line = _one_error_line(main(["export", "--study-name", "x", "--storage", spec]), capsys.readouterr().err, "— ")
        _no_leak(line, secrets)
    assert _listing(tmp_path) == []


def test_scrub_keeps_messages_readable() -> None:
    """Only the password (whole, URL-decoded, or the part a driver took for the host) is replaced:
    a short fragment of it elsewhere in a message is left alone."""
    from rapid_search.redact import scrub

    url = "postgresql+psycopg2://user:p@ss@host/db"
    text = 'could not translate host name "ss@host" to address: please check the postgres pool'
    assert scrub(text, url) == 'could not translate host name "***@host" to address: please check the postgres pool'


def test_export_reads_an_existing_sqlite_study_without_writing(tmp_path, monkeypatch, capsys) -> None:
    """export may read an SQLite study; an SQLite file without Optuna's tables is refused unchanged."""
    monkeypatch.chdir(tmp_path)
    empty = tmp_path / "empty.db"
    import sqlite3

    sqlite3.connect(empty).close()
    assert empty.stat().st_size == 0
    _one_error_line(main(["export", "--study-name", "x", "--storage", "sqlite:///empty.db"]), capsys.readouterr().err, "holds no Optuna studies")
    assert empty.stat().st_size == 0, "export created tables"


@pytest.mark.postgres
def test_export_never_creates_tables(pg_fresh_url, tmp_path, monkeypatch, capsys) -> None:
    """export on an empty PostgreSQL database: one line, and the database is left empty (no Optuna schema)."""
    import sqlalchemy as sa

    from conftest import pg_engine

    monkeypatch.chdir(tmp_path)
    line = _one_error_line(main(["export", "--study-name", "x", "--storage", pg_fresh_url]), capsys.readouterr().err, "holds no Optuna studies")
    assert sa.engine.make_url(pg_fresh_url).password not in line
    engine = pg_engine(pg_fresh_url)
    try:
        assert sa.inspect(engine).get_table_names() == []
    finally:
        engine.dispose()
    assert _listing(tmp_path) == []


@pytest.mark.postgres
def test_wrong_password_one_line_no_leak(pg_url, tmp_path, monkeypatch, capsys, tiny_search) -> None:
    import sqlalchemy as sa

    wrong = sa.engine.make_url(pg_url).set(password=SECRET).render_as_string(hide_password=False)
    monkeypatch.chdir(tmp_path)
    line = _one_error_line(main(_search(tiny_search, "--storage", wrong)), capsys.readouterr().err, "password authentication failed")
    assert SECRET not in line and "check the URL, that the server runs and the credentials" in line
    assert _listing(tmp_path) == []


@pytest.mark.postgres
@pytest.mark.parametrize("form", ["userinfo", "query"])
def test_password_never_printed_or_stored(form, pg_fresh_url, tiny_search, tmp_path, monkeypatch, capsys) -> None:
    """A search with the password in the URL (``user:pw@host`` or ``?password=pw``): not in the
    output (the progress header names the storage masked), the schedule, or anything stored."""
    import sqlalchemy as sa

    url = sa.engine.make_url(pg_fresh_url)
    password = url.password
    assert password
    if form == "query":
        url = url.set(password=None).update_query_dict({"password": password})
    spec = url.render_as_string(hide_password=False)
    assert password in spec
    monkeypatch.chdir(tmp_path)
    out_yaml = tmp_path / "s.yaml"
    code = main(_search(tiny_search, "--storage", spec, "--out", str(out_yaml), progress="plain", trials="1"))
    out, err = capsys.readouterr()
    assert code == 0, err
    header = [line for line in err.splitlines() if "storage " in line]
    assert header and all("***" in line for line in header), err  # the storage is named, masked
    assert main(["export", "--study-name", "bad", "--storage", spec, "--out", str(tmp_path / "e.yaml")]) == 0
    out2, err2 = capsys.readouterr()
    from rapid_search.storage import open_storage

    study = optuna.load_study(study_name="bad", storage=open_storage(spec, study_name="bad"))
    stored = json.dumps([study.user_attrs] + [[t.user_attrs, t.system_attrs] for t in study.trials], default=str)
    for text in (out, err, out2, err2, out_yaml.read_text(), (tmp_path / "e.yaml").read_text(), stored):
        assert password not in text


@pytest.fixture(scope="module", autouse=True)
def real_processes(bad, tmp_path_factory):
    """Started when this module starts, checked by its last test: the interpreter start (5-15 s
    on a loaded machine) overlaps with the in-process rows."""
    tmp = tmp_path_factory.mktemp("real-process")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp / "empty-cache"), HF_HOME=str(tmp / "hf-home"))
    cwd = tmp / "cwd"
    cwd.mkdir()
    runs = {
        "offline": (["search", "--model", "deit_tiny_patch16_224", "--data", str(bad / "corrupt"), "--quiet"], "not in the Hugging Face cache"),
        "truncated": (["show", str(bad / "truncated.yaml")], "re-export it"),
    }
    procs = {k: subprocess.Popen([sys.executable, "-m", "rapid_search.cli", *argv], cwd=cwd, env=env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE) for k, (argv, _) in runs.items()}
    yield cwd, runs, procs
    for p in procs.values():
        if p.poll() is None:
            p.kill()
            p.communicate()


def test_bad_inputs_in_a_real_process(real_processes) -> None:
    """Through the real interpreter and console code: one line, exit 2, no traceback, nothing
    written. Offline with an empty Hugging Face cache (HF_HUB_OFFLINE=1, HF_HUB_CACHE empty), and a
    truncated schedule."""
    cwd, runs, procs = real_processes
    for k, p in procs.items():
        out, err = p.communicate(timeout=120)
        _one_error_line(p.returncode, err, runs[k][1])
        assert out == ""
    assert _listing(cwd) == []
