"""Which calibration score should rank trials? Measured, not assumed.

Samples random schedules from the default search space (projected onto each budget), scores
each on calibration images with every metric (top-1, agreement with the unreduced model, KL to
the unreduced model) and on held-out evaluation images with top-1. A good metric ranks schedules
the way held-out top-1 does (Spearman rho) and its pick does well on held-out images.

    HF_HUB_CACHE=../shared/hf-cache/hub HF_HUB_OFFLINE=1 python benchmarks/metric_choice.py \
        --model deit_tiny_patch16_224 --calib ../shared/data/imagenet-calib \
        --eval ../shared/data/imagenet-eval --out benchmarks/metric_choice.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import optuna
import torch

from rapid_search.data import load_images
from rapid_search.evaluate import fidelity, metric_value, predict
from rapid_search.flops import ModelInfo
from rapid_search.loading import load_model
from rapid_search.presets import make_schedule
from rapid_search.search.space import SearchSpace, project


def _rank(x: np.ndarray) -> np.ndarray:
    order = x.argsort(kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x))
    for v in np.unique(x):  # average ranks of ties
        m = x == v
        r[m] = r[m].mean()
    return r


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = _rank(np.asarray(a, float)), _rank(np.asarray(b, float))
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deit_tiny_patch16_224")
    ap.add_argument("--calib", type=Path, required=True)
    ap.add_argument("--eval", type=Path, required=True)
    ap.add_argument("--ratios", default="0.5,0.35")
    ap.add_argument("--samples", type=int, default=30)
    ap.add_argument("--calib-images", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/metric_choice.json"))
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    model = load_model(args.model)
    info = ModelInfo.from_model(model)
    calib = load_images(args.calib, model=model, limit=args.calib_images, seed=args.seed)
    ev = load_images(args.eval, model=model)
    base_c = predict(model, calib.images, None, info=info).logits
    base_e = predict(model, ev.images, None, info=info).logits
    space = SearchSpace.load()
    results: dict = {"model": args.model, "calib_images": len(calib), "eval_images": len(ev), "samples": args.samples, "ratios": {}}
    for ratio in [float(r) for r in args.ratios.split(",")]:
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=args.seed))
        rows = []
        while len(rows) < args.samples:
            trial = study.ask()
            shape = space.suggest(trial, info.depth)
            res = project(info, shape, ratio * info.base_macs)
            study.tell(trial, 0.0)
            if res is None:
                continue
            sched = make_schedule(info, res[0], method="random")
            pc = predict(model, calib.images, sched, info=info)
            if sched.has_threshold and float(pc.macs.mean()) > ratio * info.base_macs:
                continue  # measured cost over budget: the search would reject it too
            pe = predict(model, ev.images, sched, info=info)
            c = fidelity(pc.logits, base_c, calib.labels)
            e = fidelity(pe.logits, base_e, ev.labels)
            rows.append({"shape": {k: v for k, v in shape.items()}, "calib": c, "eval_top1": e["top1"]})
            print(f"{ratio:.2f} #{len(rows)} calib top1 {c['top1']:.3f} agree {c['agreement']:.3f} kl {c['kl']:.4f} -> eval top1 {e['top1']:.3f}", flush=True)
        ev_top1 = [r["eval_top1"] for r in rows]
        summary = {}
        for metric in ("top1", "agreement", "kl"):
            vals = [metric_value(r["calib"], metric) for r in rows]
            order = np.argsort(vals)[::-1]
            summary[metric] = {
                "spearman_vs_eval_top1": round(spearman(vals, ev_top1), 3),
                "eval_top1_of_pick": ev_top1[int(order[0])],
                "eval_top1_mean_top3": round(float(np.mean([ev_top1[i] for i in order[:3]])), 4),
            }
        summary["oracle_eval_top1"] = max(ev_top1)
        summary["median_eval_top1"] = float(np.median(ev_top1))
        results["ratios"][str(ratio)] = {"summary": summary, "rows": rows}
        print(json.dumps({ratio: summary}, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
