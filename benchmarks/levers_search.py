"""A full search with one of ``levers.py``'s runtime variants patched in: does the lever let the search
find a better schedule on the calibration images, not just re-score the shipped one?

Runs ``rapid-search search`` in this process with ``make studies``' settings (750 calibration images,
40 trials, seed 0, KL, 1 thread) after replacing the runtime function the lever changes. The study
and the schedule go to ``--storage`` / ``--out`` (never ``studies/``); compare the best calibration KL
it prints with the shipped study's (``scores.calib_kl`` in ``studies/MODEL-PCTpct.yaml``).

    python benchmarks/levers_search.py --model vit_tiny_patch16_224 --lever received --budget 50%GFLOPs \\
        --storage journal:/tmp/received.journal --out /tmp/received.yaml
"""

from __future__ import annotations

import argparse
import os
import sys

import levers  # benchmarks/ is on sys.path when run as a script

from rapid_search.cli import main as cli_main
from rapid_search.runtime import engine

LEVERS = {"received": ("_importance", levers._received), "head-max": ("_importance", levers._head_max)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_tiny_patch16_224")
    ap.add_argument("--lever", choices=sorted(LEVERS), required=True)
    ap.add_argument("--budget", default="50%GFLOPs")
    ap.add_argument("--data", default=os.path.join(os.environ.get("RAPID_SHARED", "../shared"), "data/imagenet-calib"))
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--storage", required=True, help="e.g. journal:/tmp/lever.journal (not the shipped studies)")
    ap.add_argument("--out", required=True, help="schedule YAML to write (outside studies/)")
    args = ap.parse_args()
    name, fn = LEVERS[args.lever]
    setattr(engine, name, fn)
    return cli_main([
        "search", "--model", args.model, "--data", args.data, "--budget", args.budget, "--trials", str(args.trials),
        "--calib-images", "750", "--seed", "0", "--metric", "kl", "--progress", "plain", "--threads", "1",
        "--study-name", f"{args.model}-{args.lever}", "--storage", args.storage, "--out", args.out,
    ])  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
