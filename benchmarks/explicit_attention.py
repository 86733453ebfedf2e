"""Paired timing of hand-set RAPID with its attention explicit (the default on CPU in float32 for small
attentions, ``EXPLICIT_ATTENTION_MAX``) against the same model forced onto the fused kernel (limit 0).

Both copies, the unpatched model, the zero-cost oracle and (with ``--tome``) official ToMe are timed
round-robin in one process; the limit is set before each call, so the compiled models keep one graph
each. Prints medians, the fraction of the FLOPs ideal with its IQR, and each row's per-round time ratio
to the fused-kernel copy.

    python benchmarks/explicit_attention.py --mode eager --tome PATH/TO/facebookresearch-ToMe
    python benchmarks/explicit_attention.py --mode compiled --tome PATH/TO/facebookresearch-ToMe
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import timm
import torch

import rapid_search as rs
from rapid_search.runtime import engine
from speed import _Oracle, _official_tome, _table  # benchmarks/ is on sys.path when run as a script


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deit_tiny_patch16_224")
    ap.add_argument("--mode", choices=("eager", "compiled"), default="eager")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=90.0)
    ap.add_argument("--min-rounds", type=int, default=60)
    ap.add_argument("--tome", type=Path, default=None, help="checkout of facebookresearch/ToMe (work tree or git dir)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    base = timm.create_model(args.model).eval()
    info = rs.model_info(base)
    sched = rs.rapid_schedule(info, 0.5)
    ideal = info.base_gflops / (rs.schedule_macs(info, sched) / 1e9)
    limit = engine.EXPLICIT_ATTENTION_MAX
    configs = {
        "unpatched": (copy.deepcopy(base), limit),
        "RAPID, fused kernel": (rs.apply(copy.deepcopy(base), sched), 0),
        "RAPID, explicit (default)": (rs.apply(copy.deepcopy(base), sched), limit),
        "zero-cost oracle": (_Oracle(copy.deepcopy(base), rs.token_counts(info, sched)), limit),
    }
    if args.tome:
        import tempfile

        tome = _official_tome(args.tome, tempfile.mkdtemp())
        m = copy.deepcopy(base)
        tome.patch.timm(m)
        m.r = rs.tome_for_ratio(info, 0.5).layers[0].r
        configs["official ToMe"] = (m, limit)
    if args.mode == "compiled":
        configs = {k: (torch.compile(m, dynamic=False), lim) for k, (m, lim) in configs.items()}
    x = torch.randn(args.batch_size, *base.pretrained_cfg["input_size"])

    def call(m: torch.nn.Module, lim: int) -> torch.Tensor:
        engine.EXPLICIT_ATTENTION_MAX = lim
        return m(x)

    fns = {k: ((lambda m=m, lim=lim: call(m, lim)), 0.0) for k, (m, lim) in configs.items()}
    times = _table(fns, min_rounds=args.min_rounds, seconds=args.seconds, stable=0.002, clock=time.process_time)
    engine.EXPLICIT_ATTENTION_MAX = limit
    b, ref = np.asarray(times["unpatched"]), np.asarray(times["RAPID, fused kernel"])
    print(f"{args.model}, hand-set RAPID 50%, batch {args.batch_size}, {args.mode}, float32, 1 thread, CPU clock: {len(b)} rounds")
    print("| configuration | ms (median) | of ideal, median [IQR] | time / fused-kernel copy |\n|---|---|---|---|")
    for k, v in times.items():
        v = np.asarray(v)
        q = b / v / ideal
        print(f"| {k} | {np.median(v):.2f} | {np.median(q):.3f} [{np.percentile(q, 25):.3f}, {np.percentile(q, 75):.3f}] | {np.median(v / ref):.3f} |")


if __name__ == "__main__":
    main()
