"""How well the latency model predicts real forwards: predicted vs measured, op by op, per batch size.

For each batch size a :class:`~rapid_search.tools.latency.LatencyModel` is measured (as a latency
search does), then every schedule below is timed for real, round-robin in one process (one forward
of each per round, so load from other processes hits them alike), and its prediction compared.
As a latency search does, predictions are anchored to the unreduced model's measured time (here:
in the same rounds), so the errors are those of the predicted *ratios*; the error of the model's
own calibration on the unreduced forward is printed above each table. Schedules:

* the unreduced model and one schedule per reduction op at ``--ratio`` of the GFLOPs: redundancy
  pruning everywhere, importance merging everywhere, hand-set RAPID (prune, then merge), ToMe's
  bipartite merge (constant r), EViT-style importance pruning after three prune blocks;
* the fixed-count schedules shipped in ``studies/`` for the model.

Random weights (speed does not depend on them for fixed counts); threshold schedules are left out:
their counts depend on the images, and latency budgets search fixed counts only.
``--threads 1`` as the README's speed tables.

    python benchmarks/latency_model.py --threads 1 --batch-sizes 1,32
    python benchmarks/latency_model.py --threads 1 --batch-sizes 1 --compile   # as --compile searches predict
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
from pathlib import Path

import torch

from rapid_search import Schedule, apply, applied, rapid_schedule, tome_for_ratio
from rapid_search.runtime.flops import schedule_macs
from rapid_search.runtime.presets import _fit_two_level, make_schedule, model_info
from rapid_search.runtime.schedule import LayerSpec
from rapid_search.tools.latency import LatencyModel, _input_size
from rapid_search.tools.loading import load_model
from rapid_search.tools.measure import set_cpu_threads, time_rounds


def schedules(model: torch.nn.Module, ratio: float, studies: Path) -> dict[str, Schedule]:
    info = model_info(model)

    def fit(build) -> Schedule:
        return make_schedule(info, build(_fit_two_level(info, build, ratio * info.base_macs, info.num_tokens)), method="evit")

    out = {
        "unreduced": None,
        "prune (every block)": rapid_schedule(model, ratio, switch=info.depth, protect=0.0),
        "merge (every block)": rapid_schedule(model, ratio, switch=0),
        "hand-set RAPID": rapid_schedule(model, ratio),
        "ToMe (constant r)": tome_for_ratio(model, ratio),
        "prune x3, then EViT": fit(lambda r: [LayerSpec("prune" if i < 3 else "evit", int(x)) for i, x in enumerate(r)]),
    }
    for p in sorted(studies.glob(f"{info.name}-[0-9]*pct.yaml")):
        s = Schedule.load(p)
        if any(layer.threshold is not None for layer in s.layers):  # counts depend on weights and images (see above)
            print(f"(left out: {p}, a threshold schedule)")
            continue
        out[f"shipped {p.stem.split('-')[-1]}"] = s
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="deit_tiny_patch16_224")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--batch-sizes", default="1,32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=15, help="timed rounds at least")
    ap.add_argument("--seconds", type=float, default=60.0, help="more rounds until stable, at most this long")
    ap.add_argument("--studies", type=Path, default=Path("studies"))
    ap.add_argument("--model-repeats", type=int, default=None, help="rounds the latency model times its parts in (default: as a search does)")
    ap.add_argument("--compile", action="store_true", help="time every schedule compiled (torch.compile, dynamic=False), as --compile searches")
    args = ap.parse_args()
    set_cpu_threads(args.threads)
    model = load_model(args.model, pretrained=False)
    scheds = schedules(model, args.ratio, args.studies)
    info = model_info(model)
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        more = {} if args.model_repeats is None else {"repeats": args.model_repeats}
        lat = LatencyModel.measure(model, device="cpu", batch_size=bs, compile=args.compile, **more)
        img = torch.randn(bs, *_input_size(model))  # (B, 3, H, W)
        if args.compile:  # one compiled copy per schedule (each compiles in its warm-up run)
            torch._dynamo.config.recompile_limit = 4 * len(scheds)  # one forward code object, a copy per schedule
            copies = {k: copy.deepcopy(model) for k in scheds}
            for k, s in scheds.items():
                if s is not None:
                    apply(copies[k], s)
            compiled = {k: torch.compile(m, dynamic=False) for k, m in copies.items()}
            runs, around = {k: (lambda m=m: m(img)) for k, m in compiled.items()}, {}
        else:
            runs = {k: (lambda: model(img)) for k in scheds}
            around = {k: functools.partial(applied, model, s) for k, s in scheds.items() if s is not None}
        t = time_rounds(runs, device="cpu", repeats=args.repeats, warmup=2, batch_size=bs, time_limit=args.seconds, stable=0.02, around=around)
        own = lat.predict_ms(None)
        lat.anchor(t["unreduced"].median_ms)  # as a latency search anchors it
        print(f"\n{args.model}, batch {bs}, float32 {'compiled' if args.compile else 'eager'}, {args.threads} thread(s); the model's own calibration predicted the "
              f"unreduced forward at {own:.2f} ms, measured in the rounds {t['unreduced'].median_ms:.2f} ms ({own / t['unreduced'].median_ms - 1:+.1%})")
        print("| schedule | GFLOPs | predicted ms | measured ms (IQR) | prediction error |\n|---|---|---|---|---|")
        errors = []
        for k, s in scheds.items():
            pred, m = lat.predict_ms(s), t[k]
            err = pred / m.median_ms - 1
            if s is not None:
                errors.append(abs(err))
            g = (info.base_macs if s is None else schedule_macs(info, s.layers)) * 1e-9
            print(f"| {k} | {g:.3f} | {pred:.2f} | {m.median_ms:.2f} ({m.iqr_ms / m.median_ms:.0%}) | {err:+.1%} |")
        print(f"reduced schedules: median |error| {statistics.median(errors):.1%}, largest {max(errors):.1%}")


if __name__ == "__main__":
    main()
