"""Report of a ``scripts/gpu_check.sh`` run: ``results.json`` and ``results.md`` from its parts.

Needs only the standard library (no torch), so the check script can write the report, or record a
failed step, in well under a second::

    python benchmarks/gpu/gpu_report.py report --dir benchmarks/gpu
    python benchmarks/gpu/gpu_report.py failed-step --out DIR/search-b1.json --status "search failed: ..." --log LOG

Parts read from the folder: ``env.json`` (gpu_bench.py env), ``steps.tsv`` (one line per step of
the check script: name, exit code, seconds, note), ``search-*.json`` (gpu_bench.py remeasure, or a
failed step) and ``speed.json`` (gpu_bench.py speed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

__all__ = ["FORMAT", "METHODS", "atomic_write_text", "build_report", "report_markdown", "rapid_vs_tome", "write_report", "failed_step", "main"]

FORMAT = "rapid-gpu-bench/v1"
METHODS = ("rapid", "tome")


def atomic_write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def _read_json(path: Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _read_steps(path: Path) -> list[dict[str, Any]]:
    """``steps.tsv`` written by scripts/gpu_check.sh: name, exit code, seconds, note."""
    steps = []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return steps
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) >= 3:
            try:
                rc = int(parts[1])
            except ValueError:
                rc = None
            steps.append({"step": parts[0], "rc": rc, "seconds": parts[2], "note": parts[3] if len(parts) > 3 else ""})
    return steps


def build_report(directory: Path) -> dict[str, Any]:
    """Gather ``env.json``, ``steps.tsv``, ``search-*.json`` and ``speed.json`` of ``directory`` into one result."""
    d = Path(directory)
    searches = {}
    for p in sorted(d.glob("search-*.json")):
        data = _read_json(p)
        if data is not None:
            searches[p.stem] = data
    return {
        "format": FORMAT,
        "kind": "report",
        "env": _read_json(d / "env.json"),
        "steps": _read_steps(d / "steps.tsv"),
        "search": searches,
        "speed": _read_json(d / "speed.json"),
    }


def _f(v: Any, fmt: str, dash: str = "—") -> str:
    return dash if v is None else format(v, fmt)


def _speed_cell(row: Optional[dict[str, Any]]) -> str:
    if row is None:
        return "—"
    if row.get("status") != "ok":
        status = str(row.get("status"))
        return f"*{status if len(status) <= 90 else status[:87] + '...'}*"  # the JSON has all of it
    if row["method"] == "unreduced":
        iqr = 100 * row["iqr_ms"] / row["median_ms"] if row["median_ms"] else 0
        return f"{row['median_ms']:.3f} ms (IQR {iqr:.0f}%)"
    return f"{_f(row.get('speedup'), '.2f')}x ({_f(None if row.get('of_ideal') is None else 100 * row['of_ideal'], '.0f')}%)"


def report_markdown(report: dict[str, Any]) -> str:
    """The report as markdown: environment, check steps, latency-budget search, speed tables."""
    env = report.get("env") or {}
    lines = ["# GPU check: rapid-search on CUDA", ""]
    if env.get("gpu"):
        lines.append(
            f"{env['gpu']} ({env.get('gpu_memory_gib')} GiB, compute capability {env.get('gpu_capability')}, "
            f"{env.get('gpu_multiprocessors')} SMs), driver {env.get('driver')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}; "
            f"torch {env.get('torch')}, timm {env.get('timm')}, triton {env.get('triton')}, optuna {env.get('optuna')}, "
            f"Python {env.get('python')}; rapid-search {env.get('rapid_search')} (git {env.get('git')}); {env.get('date')}."
        )
    else:
        lines.append(
            f"**No CUDA device: CPU smoke run only** (device {env.get('device')}); torch {env.get('torch')}, timm {env.get('timm')}, "
            f"Python {env.get('python')}; rapid-search {env.get('rapid_search')} (git {env.get('git')}); {env.get('date')}. "
            "These numbers say nothing about GPU speed."
        )
    if env:
        lines += ["", f"float32 matmul precision `{env.get('float32_matmul_precision')}`; TF32 matmul {env.get('tf32_matmul')}, TF32 cuDNN {env.get('tf32_cudnn')}."]
    steps = report.get("steps") or []
    if steps:
        lines += ["", "## Steps (scripts/gpu_check.sh)", "", "| step | exit | seconds | note |", "|---|---|---|---|"]
        for s in steps:
            lines.append(f"| {s['step']} | {s['rc']} | {s['seconds']} | {s['note']} |")
    searches = report.get("search") or {}
    if searches:
        lines += [
            "",
            "## Latency-budget search, re-measured",
            "",
            "`rapid-search --budget ... --device ...` (scripts/gpu_check.sh: `60%latency` on DeiT-Tiny on CUDA); the exported "
            "schedule is then timed again against the unreduced model, round-robin (median and IQR, ms per batch); 'met' = the "
            "re-measured median is within the latency target.",
            "",
            "| run | batch | budget | target ms | unreduced ms (IQR) | schedule ms (IQR) | of unreduced | GFLOPs (ratio) | met |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, s in searches.items():
            if s.get("kind") != "remeasure":
                lines.append(f"| {name} | {s.get('batch_size', '—')} | — | — | — | — | — | — | *{s.get('status', 'no result')}* |")
                continue
            spec = (s.get("budget") or {}).get("spec", "—")
            lines.append(
                f"| {name} | {s['batch_size']} | {spec} | {_f(s.get('target_ms'), '.3f')} | {s['unreduced_ms']:.3f} ({s['unreduced_iqr_ms']:.3f}) | "
                f"{s['schedule_ms']:.3f} ({s['schedule_iqr_ms']:.3f}) | {_f(s.get('ratio_to_unreduced'), '.1%')} | "
                f"{s['gflops']:.3f} ({s['ratio_gflops']:.0%}) | {'yes' if s.get('met') else ('no' if s.get('met') is False else '—')} |"
            )
    speed = report.get("speed")
    if speed:
        st = speed["setup"]
        lines += [
            "",
            "## Speed: unreduced, RAPID and ToMe",
            "",
            f"Device {st['device']}; {st['timing']}; warm-up {st['warmup']}, {st['min_rounds']}–{st['max_rounds']} timed rounds "
            f"within a {st['time_budget_s']:.0f} s budget ({speed.get('seconds', 0):.0f} s used). Dtypes by {st['dtype_mode']}. "
            f"Compiled: {st['compile']}" + (f" ({st['compile_note']})" if st.get("compile_note") else "")
            + ". Cells: unreduced = median ms per batch (IQR in % of the median); others = speed-up over the unreduced model "
            "(same dtype, batch and mode) and, in brackets, that speed-up as a % of the FLOPs-ideal (unreduced GFLOPs / schedule GFLOPs).",
        ]
        for note in speed.get("notes") or []:
            lines += ["", f"Note: {note}"]
        rows = speed["rows"]
        for name, m in speed["models"].items():
            mine = [r for r in rows if r["model"] == name]
            lines += ["", f"### {name} ({m.get('weights', '?')} weights)", ""]
            if "base_gflops" not in m:
                lines.append(f"*{m.get('status')}*")
                continue
            labels = list(dict.fromkeys(r["schedule"] for r in mine))
            g = {r["schedule"]: r.get("gflops") for r in mine}
            lines.append("GFLOPs: " + ", ".join(f"{lb} {_f(g.get(lb), '.3f')}" for lb in labels) + ".")
            lines += ["", "| dtype | mode | batch | " + " | ".join(labels) + " |", "|---" * (3 + len(labels)) + "|"]
            keys = list(dict.fromkeys((r["dtype"], r["mode"], r["batch"]) for r in mine))
            for key in keys:
                cell = {r["schedule"]: r for r in mine if (r["dtype"], r["mode"], r["batch"]) == key}
                lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(_speed_cell(cell.get(lb)) for lb in labels) + " |")
        summary = rapid_vs_tome(rows)
        if summary:
            lines += [
                "",
                "### RAPID against ToMe at the same GFLOPs ratio",
                "",
                "Counts of (model, dtype, mode) cells where both ran, by batch size; 'of ideal' = median over those cells.",
                "",
                "| batch | ratio | cells | RAPID faster | ToMe faster | RAPID of ideal | ToMe of ideal |",
                "|---|---|---|---|---|---|---|",
            ]
            for (batch, ratio), s in sorted(summary.items()):
                lines.append(
                    f"| {batch} | {ratio:.0%} | {s['cells']} | {s['rapid_faster']} | {s['tome_faster']} | "
                    f"{_f(s['rapid_of_ideal'], '.0%')} | {_f(s['tome_of_ideal'], '.0%')} |"
                )
    lines += ["", "Reproduce: `bash scripts/gpu_check.sh` (see README, section GPU).", ""]
    return "\n".join(lines)


def rapid_vs_tome(rows: Sequence[dict[str, Any]]) -> dict[tuple[int, float], dict[str, Any]]:
    """Per (batch, ratio): cells where RAPID / ToMe ran faster, and their median fraction of the FLOPs-ideal."""
    groups: dict[tuple[int, float], dict[str, list]] = {}
    by_key: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in rows:
        if r.get("status") == "ok" and r["method"] in METHODS:
            by_key.setdefault((r["model"], r["dtype"], r["mode"], r["batch"], r["target_ratio"]), {})[r["method"]] = r
    for (_m, _d, _mode, batch, ratio), pair in by_key.items():
        if len(pair) < 2:
            continue
        g = groups.setdefault((batch, ratio), {"rapid": [], "tome": [], "faster": []})
        g["rapid"].append(pair["rapid"].get("of_ideal"))
        g["tome"].append(pair["tome"].get("of_ideal"))
        g["faster"].append("rapid" if pair["rapid"]["median_ms"] < pair["tome"]["median_ms"] else "tome")
    out = {}
    for key, g in groups.items():
        med = lambda v: statistics.median([x for x in v if x is not None]) if any(x is not None for x in v) else None  # noqa: E731
        out[key] = {
            "cells": len(g["faster"]),
            "rapid_faster": g["faster"].count("rapid"),
            "tome_faster": g["faster"].count("tome"),
            "rapid_of_ideal": med(g["rapid"]),
            "tome_of_ideal": med(g["tome"]),
        }
    return out


def write_report(directory: Path) -> tuple[Path, Path]:
    """Write ``results.json`` and ``results.md`` into ``directory``."""
    rep = build_report(directory)
    j = atomic_write_text(Path(directory) / "results.json", json.dumps(rep, indent=1) + "\n")
    m = atomic_write_text(Path(directory) / "results.md", report_markdown(rep))
    return j, m


def failed_step(*, out: Path, status: str, batch_size: Optional[int] = None, log: Optional[Path] = None) -> Path:
    """Record a step that produced no result: its status and the last lines of its log."""
    tail: list[str] = []
    if log is not None and Path(log).is_file():
        tail = [ln.strip() for ln in Path(log).read_text(errors="replace").splitlines() if ln.strip()][-8:]
    data = {"format": FORMAT, "kind": "failed", "status": status, "batch_size": batch_size, "log_tail": tail}
    return atomic_write_text(out, json.dumps(data, indent=1) + "\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="gpu_report.py", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("report", help="write results.json and results.md of a folder")
    r.add_argument("--dir", type=Path, required=True)
    f = sub.add_parser("failed-step", help="record a step that produced no result")
    f.add_argument("--out", type=Path, required=True)
    f.add_argument("--status", required=True)
    f.add_argument("--batch-size", type=int, default=None)
    f.add_argument("--log", type=Path, default=None)
    args = p.parse_args(argv)
    try:
        if args.command == "report":
            j, m = write_report(args.dir)
            print(f"wrote {j} and {m}")
        else:
            failed_step(out=args.out, status=args.status, batch_size=args.batch_size, log=args.log)
    except OSError as e:
        sys.stderr.write(f"gpu_report: error: {e}\n")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
