"""What norm should a merged token have, and what should tokens be compared by? Two per-layer levers,
measured on calibration images only (issue 12).

``--lever merged_norm`` (the default):

A merge layer replaces its members by their size-weighted average, whose norm is smaller than
theirs whenever they point in different directions. Two choices, each scored by the search's
own score, the KL divergence from the unreduced model's predictions on ``imagenet-calib`` (lower
is better), with calibration top-1 and agreement alongside:

* ``mean``: the average as it is (ToMe's merge; ``merged_norm: mean``);
* ``max``: the average's direction with the largest norm among the members (MLERP, from ToFu,
  Kim et al., WACV 2024; ``merged_norm: max``, the default since this measurement).

Each is applied to the hand-set schedule (``similarity: keys``, and every block before the switch
pruning, ``prune_blocks=info.depth``, as when this was measured) and to the
shipped searched schedule (fixed counts: its thresholds dropped) at the same per-block counts, so the
GFLOPs are the same within a row group.

``--lever similarity``: what prune and merge layers compare tokens by (cosine similarity), with
merged tokens at their members' largest norm (MLERP) throughout:

* ``keys``: the attention's head-averaged keys (ToMe's metric; ``similarity: keys``);
* ``tokens``: the residual stream the block reduces (``similarity: tokens``, the default since this
  measurement).

``--lever similarity_per_op``: the same two choices made separately for prune and merge layers
(``prune keys / merge tokens`` and the reverse, against both ``tokens`` and both ``keys``), on the
hand-set schedule (fitted with ``tokens``) and the shipped searched schedule (``--searched-dir
studies``: the third generation, searched with ``tokens``), at the same counts.

The hand-set rows are each fitted to the budget (the wider similarity matmul of ``tokens`` costs a
little, so its counts may be a token lower somewhere); the searched rows keep the shipped schedule's
counts (``tokens`` then costs slightly more GFLOPs: the ratio column shows it).

    # the schedules searched with MLERP and keys, shipped at git d352438:
    mkdir -p /tmp/mlerp && for f in studies/*_tiny_patch16_224-{50,35}pct.yaml; do git show d352438:$f > /tmp/mlerp/${f#studies/}; done
    python benchmarks/merged_norm.py --searched-dir /tmp/mlerp > benchmarks/merged_norm.md     # ~10 min on 2 cores
    python benchmarks/merged_norm.py --lever similarity --searched-dir /tmp/mlerp > benchmarks/similarity.md
    python benchmarks/merged_norm.py --lever similarity_per_op > benchmarks/similarity-per-op.md
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
    ap.add_argument("--lever", choices=("merged_norm", "similarity", "similarity_per_op"), default="merged_norm")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.images} calibration images from {args.data} (seed 0); searched schedules from {args.searched_dir}/, their thresholds dropped\n")
    column = "similarity (prune / merge)" if args.lever == "similarity_per_op" else args.lever.replace("_", " ")
    print(f"| model | GFLOPs | schedule | {column} | GFLOPs ratio | KL | calib top-1 | agreement |")
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
            if args.lever == "similarity_per_op":
                pairs = [("tokens", "tokens"), ("keys", "tokens"), ("tokens", "keys"), ("keys", "keys")]
                per_op = lambda ls, p, m: [dataclasses.replace(l, similarity={"prune": p, "merge": m}[l.op]) if l.op in ("prune", "merge") else l for l in ls]  # noqa: E731
                hand = list(rapid_schedule(model, ratio, prune_blocks=info.depth).layers)
                rows = [(label, f"{p} / {m}", per_op(ls, p, m)) for label, ls in (("hand-set", hand), ("searched (fixed counts)", fixed)) for p, m in pairs]
            else:
                if args.lever == "merged_norm":
                    hand = list(rapid_schedule(model, ratio, similarity="keys", prune_blocks=info.depth).layers)
                    rows = [("hand-set", n, [dataclasses.replace(l, merged_norm=n) if l.op == "merge" else l for l in hand]) for n in ("mean", "max")]
                else:
                    rows = [("hand-set", v, list(rapid_schedule(model, ratio, similarity=v, prune_blocks=info.depth).layers)) for v in ("keys", "tokens")]
                values = ("mean", "max") if args.lever == "merged_norm" else ("keys", "tokens")
                ops = ("merge",) if args.lever == "merged_norm" else ("prune", "merge")
                rows += [("searched (fixed counts)", v, [dataclasses.replace(l, **{args.lever: v}) if l.op in ops else l for l in fixed]) for v in values]
            for label, value, layers in rows:
                s = make_schedule(info, layers, method="variant")
                apply(model, s)
                try:
                    out = forward()
                finally:
                    remove(model)
                kl = (lp.exp() * (lp - F.log_softmax(out, -1))).sum(-1).mean()
                top1, agree = (out.argmax(-1) == Y).float().mean(), (out.argmax(-1) == base.argmax(-1)).float().mean()
                ratio_s = schedule_macs(info, s.layers) / info.base_macs
                print(f"| {name} | {pct}% | {label} | {value} | {ratio_s:.4f} | {kl:.4f} | {top1:.1%} | {agree:.1%} |", flush=True)


if __name__ == "__main__":
    main()
