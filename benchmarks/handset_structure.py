"""Where should the hand-set schedule prune, and where merge? Measured on calibration images only.

The hand-set RAPID schedule (``rapid_schedule``) prunes in its first ``prune_blocks`` blocks, merges
from block ``switch`` on and leaves the blocks between alone; every reducing block removes the same
count, fitted to the GFLOPs ratio. This script scores a grid of ``(prune_blocks, switch)`` at each
ratio by the search's own score, the KL divergence from the unreduced model's predictions on
``imagenet-calib`` (lower is better), also split into two parts (two thirds / every third image) to
show how much of a difference is noise. ``(3, 3)`` is the structure before ``DEFAULT_PRUNE_BLOCKS``
(every block before the switch prunes); ``(1, 3)`` is the default now.

    HF_HUB_CACHE=../shared/hf-cache/hub HF_HUB_OFFLINE=1 python benchmarks/handset_structure.py --model vit_tiny_patch16_224   # ~3 min on 2 threads
"""

from __future__ import annotations

import argparse

from calib_kl import CalibKL, add_arguments  # benchmarks/ is on sys.path when run as a script

from rapid_search.runtime.presets import UnreachableBudget, rapid_schedule

#: (prune_blocks, switch): prune in the first blocks, merge from the switch, nothing between.
GRID = [(3, 3), (2, 3), (1, 3), (2, 2), (1, 2), (1, 1), (0, 1), (0, 2), (0, 3)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(ap)
    ap.add_argument("--ratios", default="0.35,0.5,0.7")
    args = ap.parse_args()
    c = CalibKL.from_args(args)
    print(f"{c.describe(args.data)}; KL from the unreduced model (all / two thirds / every third), calibration top-1\n")
    for ratio in [float(r) for r in args.ratios.split(",")]:
        print(f"### {ratio:.0%} GFLOPs\n")
        print("| prune blocks | merge from | counts | KL (all) | two thirds | every third | top-1 |")
        print("|---|---|---|---|---|---|---|")
        for prune_blocks, switch in GRID:
            try:
                s = rapid_schedule(c.model, ratio, switch=switch, prune_blocks=prune_blocks)
            except UnreachableBudget:
                print(f"| {prune_blocks} | {switch} | unreachable | | | | |")
                continue
            sc = c.score(s)
            counts = " ".join(str(l.r) if l.op != "none" else "-" for l in s.layers)
            print(f"| {prune_blocks} | {switch} | {counts} | {sc.all:.4f} | {sc.search:.4f} | {sc.check:.4f} | {sc.top1:.3f} |", flush=True)
        print()


if __name__ == "__main__":
    main()
