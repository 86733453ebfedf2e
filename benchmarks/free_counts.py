"""Would a richer count space find better schedules? Free per-block counts, scored on one part of the
calibration images and checked on the rest (issue 12 lever "a richer space", calibration images only).

The search space gives a schedule's counts a linear profile over depth (``switch``, ``prune_weight``,
``decay``: ``rapid_search/search/spaces/default.yaml``). Here every block's count is free: starting
from a schedule (default: the shipped ``studies/MODEL-50pct.yaml``), a hill climb perturbs the
per-block weights (each multiplied by ``1 + N(0, sigma)``, and the protected fraction moved by
``N(0, 0.08)`` in 30% of the steps), projects them onto the budget as the search does
(``rapid_search.search.space.project`` with the shape's own ``weights``), and keeps a step when the
KL on the *search* part (two thirds of the images) falls. The *check* part (the other third, never
used to choose) shows whether what the climb found generalises or is noise picked by selection.

    python benchmarks/free_counts.py --model vit_tiny_patch16_224 --steps 60   # ~7 min on 2 threads
"""

from __future__ import annotations

import argparse
import random

from calib_kl import CalibKL, add_arguments  # benchmarks/ is on sys.path when run as a script

from rapid_search.runtime.presets import make_schedule
from rapid_search.runtime.schedule import Schedule
from rapid_search.search.space import project


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(ap)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--schedule", default=None, help="start (default studies/MODEL-PCTpct.yaml); its ops, protection and options are kept")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--sigma", type=float, default=0.25, help="relative perturbation of each block's weight per step")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the best schedule (chosen on the search part) to this YAML file")
    args = ap.parse_args()
    c = CalibKL.from_args(args)
    info = c.info

    def kl(layers) -> tuple[float, float, float]:
        sc = c.score(make_schedule(info, layers, method="free-counts"))
        return sc.search, sc.check, sc.all

    def counts(layers) -> list[int]:  # as applied: a merge block removes at most half its unprotected tokens
        return [l.r for l in make_schedule(info, layers, method="free-counts").layers]

    start = Schedule.load(args.schedule or f"studies/{args.model}-{round(args.ratio * 100)}pct.yaml")
    merges = [l for l in start.layers if l.op == "merge"]
    shape = {
        "switch": sum(l.op == "prune" for l in start.layers),
        "protect": float(merges[0].protect) if merges else 0.0,
        "merged_norm": merges[0].merged_norm if merges else "max",
        "similarity": start.layers[0].similarity,
        "weights": [float(l.r) for l in start.layers],
    }
    target = args.ratio * info.base_macs
    layers, _ = project(info, shape, target)
    best = kl(layers)
    print(f"{args.ratio:.0%} GFLOPs, {c.describe(args.data)}")
    print("| step | counts | protect | KL search part | KL check part | KL all |\n|---|---|---|---|---|---|")
    print(f"| start | {counts(layers)} | {shape['protect']:.2f} | {best[0]:.4f} | {best[1]:.4f} | {best[2]:.4f} |", flush=True)
    rng = random.Random(args.seed)
    for step in range(args.steps):
        cand = {**shape, "weights": [max(0.0, w * (1 + rng.gauss(0, args.sigma))) for w in shape["weights"]]}
        if rng.random() < 0.3:
            cand["protect"] = min(0.8, max(0.0, shape["protect"] + rng.gauss(0, 0.08)))
        res = project(info, cand, target)
        if res is None:
            continue
        s = kl(res[0])
        kept = s[0] < best[0]
        if kept:
            shape, layers, best = cand, res[0], s
        mark = " (kept)" if kept else ""
        print(f"| {step}{mark} | {counts(res[0])} | {cand['protect']:.2f} | {s[0]:.4f} | {s[1]:.4f} | {s[2]:.4f} |", flush=True)
    print(f"\nbest on the search part: {counts(layers)}, protect {shape['protect']:.3f}: KL {best[0]:.4f} (search) / {best[1]:.4f} (check) / {best[2]:.4f} (all)")
    if args.out:
        make_schedule(info, layers, method="free-counts", ratio=args.ratio, start=start.provenance.get("study", "?"), seed=args.seed).save(args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
