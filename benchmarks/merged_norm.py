"""What norm should a merged token have? Measured on calibration images only (issue 12).

A merge layer replaces its members by their size-weighted average, whose norm is smaller than
theirs whenever they point in different directions. Two choices, each scored by the search's
own score, the KL divergence from the unreduced model's predictions on ``imagenet-calib`` (lower
is better), with calibration top-1 and agreement alongside:

* ``mean``: the average as it is (ToMe's merge; ``merged_norm: mean``);
* ``max``: the average's direction with the largest norm among the members (MLERP, from ToFu,
  Kim et al., WACV 2024; ``merged_norm: max``, the default since this measurement).

Each is applied to the hand-set schedule and to the shipped searched schedule (fixed counts: its
thresholds dropped) at the same per-block counts, so the GFLOPs are the same within a row group.

    python benchmarks/merged_norm.py > benchmarks/merged_norm.md     # ~10 min on 2 cores
    # the first-generation schedules (searched with plain averages):
    mkdir -p /tmp/gen1 && for f in studies/*_tiny_patch16_224-{50,35}pct.yaml; do git show 97f644f:$f > /tmp/gen1/${f#studies/}; done
    python benchmarks/merged_norm.py --searched-dir /tmp/gen1 > benchmarks/merged_norm-gen1.md
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import torch
import torch.nn.functional as F

from rapid_search import apply, remove
from rapid_search.runtime.flops import schedule_macs
from rapid_search.runtime.presets import make_schedule, model_info, rapid_schedule
from rapid_search.runtime.schedule import Schedule
from rapid_search.tools.data import load_images
from rapid_search.tools.loading import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="deit_tiny_patch16_224,vit_tiny_patch16_224")
    ap.add_argument("--ratios", default="0.5,0.35")
    ap.add_argument("--data", default=os.path.join(os.environ.get("RAPID_SHARED", "../shared"), "data/imagenet-calib"))
    ap.add_argument("--images", type=int, default=750)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--searched-dir", default="studies", help="folder of the searched MODEL-XXpct.yaml schedules")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.images} calibration images from {args.data} (seed 0); searched schedules from {args.searched_dir}/, their thresholds dropped\n")
    print("| model | GFLOPs | schedule | merged norm | GFLOPs ratio | KL | calib top-1 | agreement |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        model = load_model(name)
        info = model_info(model)
        X = load_images(args.data, model=model, limit=args.images, seed=0)
        Y = torch.as_tensor(X.labels)

        def forward() -> torch.Tensor:
            with torch.no_grad():
                return torch.cat([model(X.images[i : i + 50]) for i in range(0, len(X.images), 50)])  # (N, 1000)

        base = forward()
        lp = F.log_softmax(base, -1)
        for ratio in map(float, args.ratios.split(",")):
            pct = round(ratio * 100)
            shipped = Schedule.load(os.path.join(args.searched_dir, f"{name}-{pct}pct.yaml"))
            fixed = [dataclasses.replace(l, threshold=None) for l in shipped.layers]
            groups = {"hand-set": list(rapid_schedule(model, ratio).layers), "searched (fixed counts)": fixed}
            for label, layers in groups.items():
                for norm in ("mean", "max"):
                    s = make_schedule(info, [dataclasses.replace(l, merged_norm=norm) if l.op == "merge" else l for l in layers], method="variant")
                    apply(model, s)
                    try:
                        out = forward()
                    finally:
                        remove(model)
                    kl = (lp.exp() * (lp - F.log_softmax(out, -1))).sum(-1).mean()
                    top1, agree = (out.argmax(-1) == Y).float().mean(), (out.argmax(-1) == base.argmax(-1)).float().mean()
                    ratio_s = schedule_macs(info, s.layers) / info.base_macs
                    print(f"| {name} | {pct}% | {label} | {norm} | {ratio_s:.4f} | {kl:.4f} | {top1:.1%} | {agree:.1%} |", flush=True)


if __name__ == "__main__":
    main()
