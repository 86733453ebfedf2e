"""The runtime works with only its own dependencies installed (``pip install rapid-search``).

A fresh interpreter blocks the optional modules (optuna, rich, matplotlib, sqlalchemy, psycopg2)
from importing, as if the extras were not installed, then uses the runtime API and every
sub-command: the runtime must work, and each sub-command that needs an extra must say which one
to install, in one line, with exit code 2.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

BLOCKED = ("optuna", "rich", "matplotlib", "sqlalchemy", "psycopg2")

_BLOCKER = f"""
import importlib.abc, sys
BLOCKED = {BLOCKED!r}
class _Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, _Blocker())
"""


def _run(code: str, tmp_path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _BLOCKER + textwrap.dedent(code)], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_blocker_blocks(tmp_path):
    out = _run(
        """
        import json
        res = {}
        for m in BLOCKED:
            try:
                __import__(m)
                res[m] = "imported"
            except ModuleNotFoundError as e:
                res[m] = e.name
        print(json.dumps(res))
        """,
        tmp_path,
    )
    assert out == {m: m for m in BLOCKED}


def test_runtime_without_extras(tmp_path):
    out = _run(
        """
        import json, sys
        import timm, torch
        import rapid_search as rs
        import rapid_search.runtime.schedule, rapid_search.runtime.ops, rapid_search.runtime.flops, rapid_search.runtime.patch, rapid_search.runtime.presets
        import rapid_search.tools.data, rapid_search.tools.evaluate, rapid_search.tools.loading, rapid_search.tools.measure, rapid_search.tools.stats
        import rapid_search.tools.bench, rapid_search.tools.visualize, rapid_search.cli
        torch.manual_seed(0)
        model = timm.create_model("test_vit").eval()
        x = torch.randn(2, 3, 160, 160)
        with torch.no_grad():
            ref = model(x)
            s = rs.rapid_schedule(model, 0.5)
            path = s.save("s.yaml")
            loaded = rs.Schedule.load(path)
            rs.apply(model, loaded)
            red = model(x)
            counts = rs.last_token_counts(model)[0].tolist()
            rs.remove(model)
            back = model(x)
        print(json.dumps({
            "same_schedule": loaded == s,
            "reduced": counts[-1] < counts[0],
            "finite": bool(torch.isfinite(red).all()),
            "restored": bool(torch.equal(back, ref)),
            "loaded_optional": sorted(m for m in BLOCKED if m in sys.modules),
        }))
        """,
        tmp_path,
    )
    assert out == {"same_schedule": True, "reduced": True, "finite": True, "restored": True, "loaded_optional": []}


def test_commands_name_the_extra_they_need(tmp_path):
    out = _run(
        """
        import contextlib, io, json
        import timm
        import rapid_search as rs
        from rapid_search.cli import main
        rs.rapid_schedule(timm.create_model("test_vit"), 0.5).save("s.yaml")
        res = {}
        for name, argv in {
            "search": ["--model", "test_vit", "--budget", "50%GFLOPs", "--trials", "2"],
            "export": ["export", "--study-name", "x"],
            "bench": ["bench", "--model", "test_vit", "--data", "."],
            "visualize": ["visualize", "--model", "test_vit", "--schedule", "s.yaml", "--image", "i.png", "--out", "o.png"],
            "show": ["show", "s.yaml"],
        }.items():
            err, so = io.StringIO(), io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(so):
                code = main(argv)
            res[name] = [code, err.getvalue()]
        print(json.dumps(res))
        """,
        tmp_path,
    )
    for cmd, module in (("search", "optuna"), ("export", "optuna"), ("bench", "matplotlib"), ("visualize", "matplotlib")):
        code, err = out[cmd]
        assert code == 2, (cmd, err)
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert err == f"rapid-search: error: 'rapid-search {cmd}' needs {module}, which is not installed — pip install 'rapid-search[search]'\n"
    assert out["show"][0] == 0 and out["show"][1] == ""
    assert not (tmp_path / "o.png").exists() and not list(tmp_path.glob("studies"))
