"""One range study of N trials against single-budget studies of N/3 trials, on calibration images.

For each seed: a study over ``--range`` (N trials), and one single-budget study of N/3 trials at
each budget of ``--at``; at each budget, the best calibration score among the range study's
trials that meet it (what ``rapid-search export --budget X`` writes) against the single study's
best. ``--raw`` adds a range study whose sampler and pruner see the raw score (no hand-set
baseline subtracted), to show what the normalisation buys. ``range+refine`` is the same compute
as the single studies together: a range study of N - 3k trials, then k trials at each budget
(``rapid-search search --budget X --study-name RANGE_STUDY``: the hand-set shape and the range's
two best shapes projected onto X first), the best meeting X taken after its own refinement.

    PYTHONPATH=$PWD HF_HUB_CACHE=../shared/hf-cache/hub HF_HUB_OFFLINE=1 python benchmarks/range_vs_single.py \\
        --range 35%..70%GFLOPs --at 40,50,65 --trials 36 --calib-images 64 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import optuna

from rapid_search.search import study as study_mod
from rapid_search.search.runner import SearchOptions, run_search
from rapid_search.storage import open_storage
from rapid_search.search.study import feasible_trials


def best_at(study: optuna.Study, gflops: float) -> tuple[float, int, int]:
    """``(KL, trial, n)``: the best calibration KL among trials meeting ``gflops``, and how many meet it."""
    ok = [t for t in feasible_trials(study) if t.user_attrs["gflops"] <= gflops + 1e-12]
    return -ok[0].user_attrs.get("score", ok[0].value), ok[0].number, len(ok)


def run(opts: SearchOptions, raw: bool = False) -> optuna.Study:
    saved = study_mod.Objective._gain
    if raw:
        study_mod.Objective._gain = lambda self, trial, step, t, raw: raw
    try:
        run_search(opts)
    finally:
        study_mod.Objective._gain = saved
    return optuna.load_study(study_name=opts.study_name, storage=open_storage(opts.storage, study_name=opts.study_name))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="deit_tiny_patch16_224")
    ap.add_argument("--data", type=Path, default=Path("../shared/data/imagenet-calib"))
    ap.add_argument("--range", default="35%..70%GFLOPs")
    ap.add_argument("--at", default="40,50,65", help="budgets inside the range, percent of the unreduced GFLOPs")
    ap.add_argument("--trials", type=int, default=36)
    ap.add_argument("--calib-images", type=int, default=64)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--raw", action="store_true")
    ap.add_argument("--refine", type=int, default=3, help="k: trials per budget in range+refine (0: skip it)")
    ap.add_argument("--variants", default="range,refine,single", help="which studies to run")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    at = [float(x) / 100 for x in a.at.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="range-vs-single-"))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rows: dict[str, dict[float, list]] = {}
    t0 = time.time()
    for seed in [int(s) for s in a.seeds.split(",")]:
        def opts(name: str, budget: str, trials: int) -> SearchOptions:
            return SearchOptions(model=a.model, data=a.data, budget=budget, trials=trials, calib_images=a.calib_images, batch_size=64,
                                 seed=seed, threads=1, progress="quiet", storage=f"journal:{tmp / name}.journal", study_name=name,
                                 out=tmp / f"{name}.yaml")

        variants = ([("range", False)] if "range" in a.variants else []) + ([("range-raw", True)] if a.raw else [])
        for label, raw in variants:
            st = run(opts(f"{label}-s{seed}", a.range, a.trials), raw=raw)
            base = st.user_attrs["base_gflops"]
            for x in at:
                rows.setdefault(label, {}).setdefault(x, []).append(best_at(st, x * base))
            print(f"seed {seed} {label}: done ({time.time() - t0:.0f} s)", flush=True)
        if a.refine and "refine" in a.variants:
            name, n = f"refined-s{seed}", a.trials - a.refine * len(at)
            st = run(opts(name, a.range, n))
            for i, x in enumerate(at):
                st = run(replace(opts(name, f"{x * 100:g}%GFLOPs", n + a.refine * (i + 1)), out=tmp / f"{name}-{x}.yaml"))
                rows.setdefault(f"range+refine ({n} + {a.refine}/budget)", {}).setdefault(x, []).append(best_at(st, x * st.user_attrs["base_gflops"]))
            print(f"seed {seed} range+refine: done ({time.time() - t0:.0f} s)", flush=True)
        for x in at if "single" in a.variants else []:
            st = run(opts(f"single{x * 100:g}-s{seed}", f"{x * 100:g}%GFLOPs", a.trials // 3))
            rows.setdefault(f"single (N/3 = {a.trials // 3})", {}).setdefault(x, []).append(best_at(st, x * st.user_attrs["base_gflops"]))
            print(f"seed {seed} single {x:.0%}: done ({time.time() - t0:.0f} s)", flush=True)
    print(f"\ncalibration KL of the best schedule meeting each budget ({a.model}, {a.calib_images} calibration images, N = {a.trials}); per seed")
    print(f"{'study':28s}" + "".join(f"{x:>22.0%}" for x in at))
    for label, by in rows.items():
        cells = ["  ".join(f"{kl:.4f}" for kl, _, _ in by[x]) + f" (n={statistics.median(n for _, _, n in by[x]):g})" for x in at]
        print(f"{label:28s}" + "".join(f"{c:>22s}" for c in cells))
    if a.json:
        a.json.write_text(json.dumps({k: {str(x): v for x, v in by.items()} for k, by in rows.items()}, indent=1))


if __name__ == "__main__":
    main()
