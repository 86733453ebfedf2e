"""ATen operator calls per forward: the unpatched model, the zero-cost oracle, hand-set RAPID and ToMe.

At batch 1 on a CPU a forward of a tiny ViT is bound by how many operators it dispatches as much as
by its FLOPs: every call pays Python argument parsing, the dispatcher and an allocation, whatever its
size. This counts them (a ``TorchDispatchMode`` that sees every ATen call, views included) for one
eager forward of each configuration, in total and per operator, so that a change to the reduction's
op count can be read off directly, without timing noise.

    python benchmarks/dispatches.py --model deit_tiny_patch16_224 --ratio 0.5 --top 12
"""

from __future__ import annotations

import argparse
import collections
import copy
from typing import Any

import timm
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import rapid_search as rs
from speed import _Oracle  # benchmarks/ is on sys.path when run as a script


class _Count(TorchDispatchMode):
    """Counts ATen operator calls by name."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.calls[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deit_tiny_patch16_224")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--top", type=int, default=12, help="operators listed per configuration (default 12)")
    args = ap.parse_args()
    base = timm.create_model(args.model).eval()  # random weights: the op count does not depend on them
    info = rs.model_info(base)
    rapid = rs.rapid_schedule(info, args.ratio)
    configs: dict[str, torch.nn.Module] = {"unpatched": base, "zero-cost reduction (oracle)": _Oracle(copy.deepcopy(base), rs.token_counts(info, rapid))}
    for name, sched in (
        (f"RAPID hand-set {args.ratio:.0%}", rapid),
        (f"RAPID hand-set {args.ratio:.0%}, merged_norm mean", rs.rapid_schedule(info, args.ratio, merged_norm="mean")),
        (f"ToMe for {args.ratio:.0%} (this project)", rs.tome_for_ratio(info, args.ratio)),
    ):
        m = copy.deepcopy(base)
        rs.apply(m, sched)
        configs[name] = m
    x = torch.randn(args.batch_size, *base.pretrained_cfg["input_size"])
    print(f"{args.model}, batch {args.batch_size}: ATen operator calls per eager forward (views included)")
    print("| configuration | calls | most called |\n|---|---|---|")
    for name, m in configs.items():
        with torch.inference_mode(), _Count() as c:
            m(x)
        top = ", ".join(f"{k} {v}" for k, v in c.calls.most_common(args.top))
        print(f"| {name} | {sum(c.calls.values())} | {top} |")


if __name__ == "__main__":
    main()
