"""A full search with one of ``levers.py``'s runtime variants patched in: does the lever let the search
find a better schedule on the calibration images, not just re-score the shipped one?

Runs ``rapid-search search`` in this process with ``make studies``' settings (750 calibration images,
40 trials, seed 0, KL, 1 thread) after replacing the runtime function the lever changes. The study
and the schedule go to ``--storage`` / ``--out`` (never ``studies/``); compare the best calibration KL
it prints with the shipped study's (``scores.calib_kl`` in ``studies/MODEL-PCTpct.yaml``).

    python benchmarks/levers_search.py --model vit_tiny_patch16_224 --lever received --budget 50%GFLOPs \\
        --storage journal:/tmp/received.journal --out /tmp/received.yaml

Levers: ``received`` and ``head-max`` (the importance signal, see ``levers.py``) and ``protect-ramp``
(per-block protection: a searched ``protect_end``, protection linear over the merge blocks).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any, Callable

import levers  # benchmarks/ is on sys.path when run as a script

from rapid_search.cli import main as cli_main
from rapid_search.runtime import engine

def _importance(fn: Callable[..., Any]) -> Callable[[], None]:
    """A lever that replaces the runtime's importance signal with ``fn`` (one of ``levers.py``'s)."""
    return lambda: setattr(engine, "_importance", fn)


def _protect_ramp() -> None:
    """Per-block protection: the space gains ``protect_end`` in [0, 0.9]; merge blocks' protection runs linearly
    from ``protect`` (first merge block) to ``protect_end`` (last block). The hand-set warm start keeps it constant."""
    from rapid_search.search import runner, space

    suggest, from_counts, hand = space.SearchSpace.suggest, space._layers_from_counts, runner.hand_params

    def ramp_suggest(self: space.SearchSpace, trial: Any, depth: int) -> dict[str, Any]:
        return {**suggest(self, trial, depth), "protect_end": float(trial.suggest_float("protect_end", 0.0, 0.9))}

    def ramp_layers(info: Any, shape: Any, r: list[int]) -> list[Any]:
        layers = from_counts(info, shape, r)
        end = shape.get("protect_end")
        if end is None:
            return layers
        sw, p0, n = int(shape["switch"]), float(shape["protect"]), len(layers)
        return [
            dataclasses.replace(l, protect=p0 + (float(end) - p0) * (i - sw) / max(1, n - 1 - sw)) if l.op == "merge" else l
            for i, l in enumerate(layers)
        ]

    space.SearchSpace.suggest = ramp_suggest  # type: ignore[method-assign]
    space._layers_from_counts = ramp_layers
    runner.hand_params = lambda info: {**hand(info), "protect_end": hand(info)["protect"]}


#: Each lever patches the runtime or the search in this process before the search runs.
LEVERS: dict[str, Callable[[], None]] = {"received": _importance(levers._received), "head-max": _importance(levers._head_max), "protect-ramp": _protect_ramp}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_tiny_patch16_224")
    ap.add_argument("--lever", choices=sorted(LEVERS), required=True)
    ap.add_argument("--budget", default="50%GFLOPs")
    ap.add_argument("--data", default=os.path.join(os.environ.get("RAPID_SHARED", "../shared"), "data/imagenet-calib"))
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--storage", required=True, help="e.g. journal:/tmp/lever.journal (not the shipped studies)")
    ap.add_argument("--out", required=True, help="schedule YAML to write (outside studies/)")
    args = ap.parse_args()
    LEVERS[args.lever]()
    return cli_main([
        "search", "--model", args.model, "--data", args.data, "--budget", args.budget, "--trials", str(args.trials),
        "--calib-images", "750", "--seed", "0", "--metric", "kl", "--progress", "plain", "--threads", "1",
        "--study-name", f"{args.model}-{args.lever}", "--storage", args.storage, "--out", args.out,
    ])  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
