"""The project's shell scripts (CI entry point, PostgreSQL, wheel and GPU checks): they parse, and
none pipes into a reader that may stop early under ``pipefail``.

Under ``set -o pipefail`` a pipeline fails when its writer is killed by SIGPIPE, which happens
whenever the reader exits before the writer is done (``grep -q`` on its first match, ``head``).
``unzip -l WHEEL | grep -q FILE`` failed 12 of 200 runs that way and once failed CI's wheel check.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*REPO.glob("scripts/*.sh"), *REPO.glob("benchmarks/**/*.sh"), REPO / ".ci" / "run"])

#: A pipe into a command that may exit before reading all of its input.
_EARLY_READER = re.compile(r"\|\s*(head\b|grep\s+(-\w*[qm]\w*|--quiet|--max-count)|sed\s+[^|]*\dq\b|awk\s+[^|]*\bexit\b)")


def early_readers(text: str) -> list[str]:
    """Lines of a ``pipefail`` script that pipe into an early-exiting reader (none without ``pipefail``)."""
    if "pipefail" not in text:
        return []
    code = [line.split(" #", 1)[0] for line in text.splitlines() if not line.lstrip().startswith("#")]
    return [line.strip() for line in code if _EARLY_READER.search(line)]


def test_scripts_are_found() -> None:
    names = {p.name for p in SCRIPTS}
    assert {"run", "postgres.sh", "wheel_check.sh"} <= names, names


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_script_parses(path: Path) -> None:
    bash = shutil.which("bash")
    assert bash is not None
    out = subprocess.run([bash, "-n", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_no_pipe_into_an_early_reader_under_pipefail(path: Path) -> None:
    assert early_readers(path.read_text()) == [], "read the writer's output into a file or variable first"


def test_the_finder_finds_early_readers() -> None:
    script = "set -euo pipefail\nunzip -l x.whl | grep -q ' a/py.typed$' || exit 1\nv=$(postgres --version | head -n 1)\n"
    assert len(early_readers(script)) == 2
    assert early_readers(script.replace("set -euo pipefail\n", "")) == []  # without pipefail SIGPIPE is harmless
    assert early_readers("set -o pipefail\nunzip -l x > f; grep -q a f\nls | sort | tee out\n") == []


def test_the_race_is_real() -> None:
    """Without the fix the pipeline fails: ``yes`` is killed by SIGPIPE once ``grep -q`` has its match."""
    bash = shutil.which("bash")
    assert bash is not None
    out = subprocess.run([bash, "-c", "set -o pipefail; yes | grep -q y"], capture_output=True)
    assert out.returncode != 0  # 141 = 128 + SIGPIPE
