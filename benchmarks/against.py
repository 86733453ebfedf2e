"""This checkout's runtime against another git revision's, on the same model and schedule, paired per round.

The other revision's ``rapid_search`` package is extracted (``git archive``) into a temporary folder
under another name and imported from there, so both runtimes live in one process. Its modules are
imported by their own paths (``<name>.runtime.patch``): the package's lazy top-level names resolve to
``rapid_search.*``, which is this checkout. Each round times the unpatched model, the revision's
runtime and this checkout's, one forward each, in an order that rotates from round to round
(``speed.py``'s round-robin loop, CPU clock). Reported: medians, and the median per-round ratio this /
revision with a bootstrap 95 % interval. The two outputs must agree; the largest difference is printed.

    python benchmarks/against.py --rev HEAD~1 --batch-sizes 1,32 --rounds 400,30 --threads 1 [--compiled] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import copy
import importlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch

import rapid_search as rs
from speed import _cpu_name, _median_ci, _table  # benchmarks/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]


def _import_revision(rev: str, folder: str) -> tuple[object, object]:
    """``(patch, presets)`` modules of ``rev``'s runtime, imported as package ``rapid_search_rev``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "rapid_search"], capture_output=True)
    if archive.returncode != 0:
        sys.exit(f"against.py: error: git archive {rev} failed: {archive.stderr.decode().strip()} — pass --rev with a commit of this repository")
    subprocess.run(["tar", "-x", "-C", folder], input=archive.stdout, check=True)
    (Path(folder) / "rapid_search").rename(Path(folder) / "rapid_search_rev")
    sys.path.insert(0, folder)
    return importlib.import_module("rapid_search_rev.runtime.patch"), importlib.import_module("rapid_search_rev.runtime.presets")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", required=True, help="git revision to compare against (e.g. HEAD~1, main)")
    ap.add_argument("--model", default="deit_tiny_patch16_224")
    ap.add_argument("--ratio", type=float, default=0.5, help="hand-set RAPID at this GFLOPs ratio (default 0.5)")
    ap.add_argument("--batch-sizes", default="1,32")
    ap.add_argument("--rounds", default="400,30", help="rounds per batch size (comma-separated, one per batch size)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--compiled", action="store_true", help="time every model under torch.compile (inductor, dynamic=False)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32", help="the models' and inputs' dtype")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    rounds = [int(r) for r in args.rounds.split(",")]
    if len(rounds) != len(sizes):
        sys.exit("against.py: error: give one --rounds value per --batch-sizes value, e.g. --batch-sizes 1,32 --rounds 400,30")
    tmp = tempfile.TemporaryDirectory()
    patch_rev, presets_rev = _import_revision(args.rev, tmp.name)
    dtype = getattr(torch, args.dtype)
    base = timm.create_model(args.model).eval().to(dtype)  # random weights: speed does not depend on them
    models = {"unpatched": base, args.rev: copy.deepcopy(base), "this checkout": copy.deepcopy(base)}
    patch_rev.apply(models[args.rev], presets_rev.rapid_schedule(base, args.ratio))
    rs.apply(models["this checkout"], rs.rapid_schedule(base, args.ratio))
    if args.compiled:
        models = {k: torch.compile(m, dynamic=False) for k, m in models.items()}
    rng = np.random.default_rng(0)
    print(f"{args.model}, hand-set RAPID {args.ratio:.0%}, CPU {_cpu_name()}, threads {torch.get_num_threads()}, torch {torch.__version__}, "
          f"CPU clock, {'compiled' if args.compiled else 'eager'}, {args.dtype}; this checkout against {args.rev}, rotating round-robin")
    for B, n in zip(sizes, rounds):
        x = torch.randn(B, 3, *base.pretrained_cfg["input_size"][1:], generator=torch.Generator().manual_seed(0)).to(dtype)
        with torch.inference_mode():
            out = {k: m(x) for k, m in models.items()}
        runs = {k: ((lambda m=m: m(x)), 0.0) for k, m in models.items()}
        times = _table(runs, min_rounds=n, seconds=0.0, stable=0.0, clock=time.thread_time)  # exactly n rounds
        t = {k: np.asarray(v) for k, v in times.items()}
        ratio = t["this checkout"] / t[args.rev]
        lo, hi = _median_ci(ratio, 2000, rng)
        diff = float((out["this checkout"].float() - out[args.rev].float()).abs().max())
        print(f"batch {B}, {n} rounds: " + ", ".join(f"{k} {np.median(v):.2f} ms" for k, v in t.items()) + f"; outputs differ by at most {diff:.3g}")
        print(f"  this checkout / {args.rev}: median per-round ratio {np.median(ratio):.4f} [{lo:.4f}, {hi:.4f}]; speed-up over unpatched "
              f"{args.rev} {np.median(t['unpatched'] / t[args.rev]):.3f}x, this checkout {np.median(t['unpatched'] / t['this checkout']):.3f}x")


if __name__ == "__main__":
    main()
