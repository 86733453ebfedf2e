"""Throughput of the runtime: unreduced vs RAPID and ToMe at a GFLOPs ratio.

Configurations are timed round-robin (one batch each, repeated), so load from other processes
on a shared machine hits every configuration alike; medians are reported. "of ideal" is the
measured speedup divided by the ideal speedup (unreduced GFLOPs / schedule GFLOPs).

    python benchmarks/speed.py --model deit_tiny_patch16_224 --batch-size 32 --ratio 0.5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import timm
import torch

import rapid_search as rs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deit_tiny_patch16_224")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--schedule", type=Path, action="append", default=[], help="extra schedule YAMLs to time")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = timm.create_model(args.model).eval().to(device)  # weights do not change the speed
    info = rs.model_info(model)
    x = torch.randn(args.batch_size, *model.pretrained_cfg["input_size"], device=device)
    configs = {
        "unreduced (unpatched)": None,
        "empty schedule (patched)": rs.empty_schedule(info),
        f"RAPID hand-set {args.ratio:.0%}": rs.rapid_schedule(info, args.ratio),
        f"ToMe {args.ratio:.0%}": rs.tome_for_ratio(info, args.ratio),
        f"ToMe decreasing {args.ratio:.0%}": rs.tome_for_ratio(info, args.ratio, decreasing=True),
    }
    for p in args.schedule:
        configs[p.stem] = rs.Schedule.load(p)
    times: dict[str, list[float]] = {k: [] for k in configs}

    def run(name: str) -> float:
        sched = configs[name]
        if sched is not None:
            rs.apply(model, sched)
        try:
            with torch.inference_mode():
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                model(x)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                return time.perf_counter() - t0
        finally:
            rs.remove(model)

    for name in configs:  # warm-up
        run(name), run(name)
    for _ in range(args.repeats):
        for name in configs:
            times[name].append(run(name))
    base = statistics.median(times["unreduced (unpatched)"])
    rows = []
    print(f"{args.model}, batch {args.batch_size}, {device}, threads {torch.get_num_threads()}, {args.repeats} round-robin repeats (medians)")
    print(f"| schedule | GFLOPs | images/s | speedup | ideal | of ideal |\n|---|---|---|---|---|---|")
    for name, sched in configs.items():
        t = statistics.median(times[name])
        g = info.base_gflops if sched is None else rs.schedule_macs(info, sched) / 1e9
        speed, ideal = base / t, info.base_gflops / g
        rows.append({"schedule": name, "gflops": g, "images_per_s": args.batch_size / t, "speedup": speed, "ideal": ideal, "of_ideal": speed / ideal})
        print(f"| {name} | {g:.3f} | {args.batch_size / t:.1f} | {speed:.2f}x | {ideal:.2f}x | {speed / ideal:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "batch_size": args.batch_size, "device": str(device), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
