"""Which calibration score should rank trials? Measured, not assumed.

Candidates: random schedules from the default search space (projected onto each budget, the
way the search draws them) plus the two warm-start schedules (hand-set RAPID, ToMe). Each is run
once on the whole calibration pool and once on the held-out evaluation images, keeping per-image
results. Then, for each metric (``top1`` needs labels; ``agreement`` and ``kl`` compare with the
unreduced model and need none), many calibration subsets of the size a search uses are drawn;
on each, the metric picks its best candidate, and we record that pick's held-out top-1. A good
metric's picks do well on held-out images on average. Also reported: Spearman rho between the
metric on the whole pool and held-out top-1. Random schedules are mostly far from the best; with
``--study`` the candidates include every completed trial of a real search at that budget, the
near-best schedules among which a search actually has to choose.

    HF_HUB_CACHE=../shared/hf-cache/hub HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/metric_choice/metric_choice.py \
        --model deit_tiny_patch16_224 --calib ../shared/data/imagenet-calib \
        --eval ../shared/data/imagenet-eval --ratios 0.5 --out benchmarks/metric_choice-50.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import optuna
import torch

from rapid_search.tools.data import load_images
from rapid_search.tools.evaluate import per_image_scores, predict
from rapid_search.runtime.flops import ModelInfo
from rapid_search.tools.loading import load_model
from rapid_search.tools.measure import set_cpu_threads
from rapid_search.runtime.presets import make_schedule, rapid_schedule, tome_for_ratio
from rapid_search.search.space import SearchSpace, project
from rapid_search.storage import open_storage
from rapid_search.search.study import trial_schedule

METRICS = ("top1", "agreement", "kl")


def _rank(x: np.ndarray) -> np.ndarray:
    order = x.argsort(kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x))
    for v in np.unique(x):  # average ranks of ties
        m = x == v
        r[m] = r[m].mean()
    return r


def spearman(a, b) -> float:
    ra, rb = _rank(np.asarray(a, float)), _rank(np.asarray(b, float))
    return float(np.corrcoef(ra, rb)[0, 1])


def per_image(logits: torch.Tensor, base_logits: torch.Tensor, labels: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-image value of each metric, larger is better (KL negated), as the search ranks them."""
    scores = per_image_scores(logits, base_logits, labels)
    return {m: (-scores[m] if m == "kl" else scores[m]).numpy() for m in METRICS}


def pick_quality(calib: dict[str, np.ndarray], eval_top1: np.ndarray, subset: int, draws: int, rng: np.random.Generator) -> dict:
    """Held-out top-1 of each metric's pick over ``draws`` calibration subsets of size ``subset``.

    Args:
        calib: metric -> ``(S, N)`` per-image values of S candidates on N calibration images.
        eval_top1: ``(S,)`` held-out top-1 of each candidate.
    """
    n = next(iter(calib.values())).shape[1]
    idx = [rng.choice(n, size=subset, replace=False) for _ in range(draws)] if subset < n else [np.arange(n)]
    out = {}
    for metric, vals in calib.items():
        picks = []
        for ix in idx:
            score = vals[:, ix].mean(1)  # (S,)
            best = np.flatnonzero(score == score.max())
            picks.append(eval_top1[best].mean())  # ties: the expected value of a random tie-break
        picks = np.asarray(picks)
        out[metric] = {"mean": round(float(picks.mean()), 4), "p10": round(float(np.percentile(picks, 10)), 4)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deit_tiny_patch16_224")
    ap.add_argument("--calib", type=Path, required=True)
    ap.add_argument("--eval", type=Path, required=True)
    ap.add_argument("--ratios", default="0.5,0.35")
    ap.add_argument("--samples", type=int, default=30, help="random schedules per ratio (plus hand-set RAPID and ToMe)")
    ap.add_argument("--study", nargs=2, metavar=("STORAGE", "NAME"),
                    help="also take every completed trial of this study as a candidate (one ratio only)")
    ap.add_argument("--subsets", default="128,256,512", help="calibration subset sizes to draw")
    ap.add_argument("--draws", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/metric_choice.json"))
    args = ap.parse_args()
    if args.study and "," in args.ratios:
        ap.error("--study takes one --ratios value (the study's budget)")
    set_cpu_threads(args.threads)
    torch.manual_seed(args.seed)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    t0 = time.time()
    model = load_model(args.model)
    info = ModelInfo.from_model(model)
    calib = load_images(args.calib, model=model)
    ev = load_images(args.eval, model=model)
    base_c = predict(model, calib.images, None, info=info).logits
    base_e = predict(model, ev.images, None, info=info).logits
    space = SearchSpace.load()
    subsets = [int(s) for s in args.subsets.split(",")] + [len(calib)]
    results: dict = {
        "command": "benchmarks/metric_choice/metric_choice.py " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(args).items() if v is not None),
        "model": args.model, "calib_images": len(calib), "eval_images": len(ev), "samples": args.samples,
        "draws": args.draws, "ratios": {},
    }
    for ratio in [float(r) for r in args.ratios.split(",")]:
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=args.seed))
        candidates = [("hand-set", rapid_schedule(info, ratio)), ("tome", tome_for_ratio(info, ratio))]
        if args.study:
            st = optuna.load_study(study_name=args.study[1], storage=open_storage(args.study[0], study_name=args.study[1], create=False))
            for t in st.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
                if t.user_attrs.get("warm_start") is None:  # the warm starts are in already
                    candidates.append((f"trial-{t.number}", trial_schedule(t)))
        n_fixed = len(candidates)
        while len(candidates) < args.samples + n_fixed:
            trial = study.ask()
            shape = space.suggest(trial, info.depth)
            res = project(info, shape, ratio * info.base_macs)
            study.tell(trial, 0.0)
            if res is not None:
                candidates.append((f"random-{len(candidates) - n_fixed}", make_schedule(info, res[0], method="random")))
        rows, cal = [], {m: [] for m in METRICS}
        for name, sched in candidates:
            pc = predict(model, calib.images, sched, info=info)
            if sched.has_threshold and float(pc.macs.mean()) > ratio * info.base_macs:
                continue  # measured cost over budget: the search would reject it too
            pe = predict(model, ev.images, sched, info=info)
            pi = per_image(pc.logits, base_c, calib.labels)
            for m in METRICS:
                cal[m].append(pi[m])
            e_top1 = float((pe.logits.argmax(-1) == ev.labels).double().mean())
            rows.append({"name": name, "layers": sched.to_dict()["layers"], "calib": {m: float(pi[m].mean()) for m in METRICS}, "eval_top1": e_top1})
            print(f"{ratio:.2f} {name:>10} calib top1 {rows[-1]['calib']['top1']:.3f} agree {rows[-1]['calib']['agreement']:.3f} "
                  f"kl {-rows[-1]['calib']['kl']:.4f} -> eval top1 {e_top1:.3f}  ({time.time() - t0:.0f}s)", flush=True)
        ev_top1 = np.array([r["eval_top1"] for r in rows])
        cal_arr = {m: np.stack(v) for m, v in cal.items()}  # metric -> (S, N)
        rng = np.random.default_rng(args.seed)
        summary = {
            "spearman_vs_eval_top1": {m: round(spearman(cal_arr[m].mean(1), ev_top1), 3) for m in METRICS},
            "pick_eval_top1": {str(s): pick_quality(cal_arr, ev_top1, s, args.draws, rng) for s in subsets},
            "candidates": len(rows),
            "oracle_eval_top1": float(ev_top1.max()),
            "median_eval_top1": float(np.median(ev_top1)),
            "hand_set_eval_top1": rows[0]["eval_top1"],
        }
        results["ratios"][str(ratio)] = {"summary": summary, "rows": rows}
        print(json.dumps({ratio: summary}, indent=1), flush=True)
    results["seconds"] = round(time.time() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
