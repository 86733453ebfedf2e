"""Speed of the runtime: unreduced vs RAPID and ToMe at a GFLOPs ratio, eager and compiled, per dtype.

Every configuration is its own copy of the model (so that each can be compiled for what it runs);
within one table (batch size x dtype) the configurations are timed round-robin, one forward each
per round, so load from other processes on a shared machine hits them alike, in an order that
rotates from round to round (of two identical forwards in a fixed order the second reads faster). Rounds continue
until the median of every configuration is stable (its bootstrap 95 % interval within
``--stable`` of the median) or ``--seconds`` have passed. Reported: median ms per batch, IQR in %
of the median, speed-up over the unpatched model in the same mode, the FLOPs-ideal speed-up
(unreduced GFLOPs / schedule GFLOPs) and the fraction of it reached. A row is flagged when its
speed-up exceeds the ideal beyond the noise or its spread is too wide to compare.

Official ToMe (facebookresearch/ToMe) is imported from a checkout given with ``--tome`` (a
fetched copy; its code is never part of this repository) and patched onto its own model copy
with the same constant ``r`` as the project's ToMe row.

    python benchmarks/speed.py --threads 1 --batch-sizes 1,32 --modes eager,compiled --dtypes float32
    python benchmarks/speed.py --threads 1 --batch-sizes 1 --modes compiled-cpp --dtypes float32
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import timm
import torch

import rapid_search as rs

FLAG_SPREAD = 0.15  # IQR above 15 % of the median: too noisy to compare


def _official_tome(path: Path, tmp: str) -> Any:
    """Import ``tome`` from a checkout (a work tree, or a git directory, also the ``repo`` folder inside
    a fetched snapshot: its HEAD is extracted)."""
    src = path
    if not (path / "tome" / "__init__.py").exists():
        git_dir = next((d for d in (path, path / "repo", path / ".git") if (d / "HEAD").is_file()), None)
        if git_dir is None:
            sys.exit(f"speed.py: error: --tome {path} is neither a checkout of facebookresearch/ToMe (no tome/__init__.py) nor a git directory")
        archive = subprocess.run(["git", "--git-dir", str(git_dir), "archive", "HEAD", "tome"], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        src = Path(tmp)
    sys.path.insert(0, str(src))
    import tome  # noqa: PLC0415

    return tome


def _median_ci(a: np.ndarray, n_boot: int, rng: np.random.Generator) -> tuple[float, float]:
    """Bootstrap 95 % interval of the median of ``a`` (``n_boot`` resamples)."""
    boots = np.median(rng.choice(a, size=(n_boot, a.size)), axis=1)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return float(lo), float(hi)


def _stats(v: list[float]) -> tuple[float, float, float]:
    """median, IQR / median, bootstrap 95 % half-width of the median / median."""
    a = np.asarray(v)
    med = float(np.median(a))
    q25, q75 = np.percentile(a, [25, 75])
    lo, hi = _median_ci(a, 300, np.random.default_rng(0))
    return med, float(q75 - q25) / med, float(hi - lo) / 2 / med


def _table(
    configs: dict[str, tuple[Callable[[], Any], float]], *, min_rounds: int, seconds: float, stable: float, clock: Callable[[], float]
) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in configs}
    t_end = time.perf_counter() + seconds
    rounds = 0
    with torch.inference_mode():
        for fn, _ in configs.values():  # warm-up (and compilation)
            fn(), fn(), fn()
        names = list(configs)
        while True:
            for name in names[rounds % len(names) :] + names[: rounds % len(names)]:  # rotating: no position bias
                t0 = clock()
                configs[name][0]()
                times[name].append((clock() - t0) * 1e3)
            rounds += 1
            if rounds >= min_rounds and (time.perf_counter() > t_end or all(_stats(v)[2] <= stable for v in times.values())):
                return times


def _print_ratios(times: dict[str, list[float]], ref: str) -> None:
    """Per-round time ratios to configuration ``ref``: median and bootstrap 95 % interval of the median."""
    if ref not in times:
        raise SystemExit(f"--ratio-to {ref!r} is not a configuration; these are: {', '.join(times)}")
    base = np.asarray(times[ref])
    print(f"\nper-round time ratio to {ref!r} (median [95% CI]; > 1 = slower):")
    rng = np.random.default_rng(0)
    for name, v in times.items():
        if name != ref:
            r = np.asarray(v) / base  # (rounds,)
            lo, hi = _median_ci(r, 2000, rng)
            print(f"- {name}: {np.median(r):.3f} [{lo:.3f}, {hi:.3f}]")


class _Oracle(torch.nn.Module):
    """The unpatched blocks fed the token counts of a schedule by slicing (no reduction work at all):
    the speed a reduction with zero cost would reach."""

    def __init__(self, model: torch.nn.Module, counts: list[int]) -> None:
        super().__init__()
        self.m, self.counts = model, counts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.m
        t = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))  # (B, N, C)
        for i, blk in enumerate(m.blocks):
            t = t + blk.ls1(blk.attn(blk.norm1(t)))
            t = t[:, : self.counts[i + 1]]  # (B, N_{l+1}, C)
            t = t + blk.ls2(blk.mlp(blk.norm2(t)))
        return m.forward_head(m.norm(t))


def _cpu_name() -> str:
    """The processor's model name and its widest vector extension (what the CPU timings depend on)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "unknown")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    isa = "AVX-512" + (" BF16" if "avx512_bf16" in flags else "") if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{name} ({isa})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deit_tiny_patch16_224")
    ap.add_argument("--batch-sizes", default="1,32")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument(
        "--modes", default="eager,compiled",
        help="eager, compiled (torch.compile, inductor, dynamic=False) and/or compiled-cpp (the same with inductor's C++ "
        "wrapper, options={'cpp_wrapper': True}: the compiled graph's kernels are called from C++ instead of Python)",
    )
    ap.add_argument("--dtypes", default="float32", help="float32, bfloat16, float16 (comma-separated)")
    ap.add_argument("--seconds", type=float, default=120.0, help="time limit per table (default 120)")
    ap.add_argument("--min-rounds", type=int, default=15)
    ap.add_argument("--stable", type=float, default=0.01, help="stop when every median's 95%% interval is within this fraction")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall",
        help="wall: perf_counter; cpu: this process's CPU time (with --threads 1 the forward runs on one thread, so time spent "
        "waiting for a core shared with other processes is not counted)",
    )
    ap.add_argument("--tome", type=Path, default=None, help="checkout of facebookresearch/ToMe (work tree or git dir)")
    ap.add_argument("--schedule", type=Path, action="append", default=[], help="extra schedule YAMLs to time")
    ap.add_argument("--oracle", action="store_true", help="add the unpatched blocks fed RAPID's token counts by slicing (a zero-cost reduction)")
    ap.add_argument(
        "--ratio-to", default=None, metavar="NAME",
        help="also print each configuration's per-round time ratio to configuration NAME (median, bootstrap 95%% CI): "
        "both timed in the same round, so a machine switching between fast and slow states cancels out",
    )
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    bad = [m for m in args.modes.split(",") if m not in ("eager", "compiled", "compiled-cpp")]
    if bad:
        sys.exit(f"speed.py: error: unknown mode {bad[0]!r} — use eager, compiled or compiled-cpp")
    if args.threads:
        torch.set_num_threads(args.threads)
    base_model = timm.create_model(args.model).eval()  # random weights: speed does not depend on them
    info = rs.model_info(base_model)
    tome_sched = rs.tome_for_ratio(info, args.ratio)
    tome_r = tome_sched.layers[0].r
    schedules: dict[str, Any] = {
        "unpatched": None,
        "empty schedule": rs.empty_schedule(info),
        f"RAPID hand-set {args.ratio:.0%}": rs.rapid_schedule(info, args.ratio),
        f"RAPID hand-set {args.ratio:.0%}, merged_norm mean": rs.rapid_schedule(info, args.ratio, merged_norm="mean"),
        f"RAPID hand-set {args.ratio:.0%}, similarity keys": rs.rapid_schedule(info, args.ratio, similarity="keys"),
        f"ToMe r={tome_r} (this project)": tome_sched,
    }
    for p in args.schedule:
        schedules[p.stem] = rs.Schedule.load(p)
    tmp = tempfile.TemporaryDirectory()
    tome = _official_tome(args.tome, tmp.name) if args.tome else None
    gflops = {k: (info.base_gflops if s is None else rs.schedule_macs(info, s) / 1e9) for k, s in schedules.items()}
    if tome is not None:
        gflops[f"official ToMe r={tome_r}"] = rs.schedule_macs(info, tome_sched) / 1e9
    print(
        f"{args.model}, CPU {_cpu_name()}, threads {torch.get_num_threads()}, torch {torch.__version__}, {args.clock} clock; round-robin, medians; "
        f"IQR in % of the median; ! = flagged (speed-up above ideal beyond noise, or IQR > {FLAG_SPREAD:.0%})"
    )
    out: list[dict[str, Any]] = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for bs in [int(b) for b in args.batch_sizes.split(",")]:
            x = torch.randn(bs, *base_model.pretrained_cfg["input_size"]).to(dtype)
            for mode in args.modes.split(","):
                configs: dict[str, tuple[Callable[[], Any], float]] = {}
                for name, sched in schedules.items():
                    m = copy.deepcopy(base_model).to(dtype)
                    if sched is not None:
                        rs.apply(m, sched)
                    configs[name] = (m, gflops[name])
                if args.oracle:
                    rapid = schedules[f"RAPID hand-set {args.ratio:.0%}"]
                    configs["zero-cost reduction (oracle)"] = (_Oracle(copy.deepcopy(base_model).to(dtype), rs.token_counts(info, rapid)), gflops[f"RAPID hand-set {args.ratio:.0%}"])
                if tome is not None:
                    m = copy.deepcopy(base_model).to(dtype)
                    tome.patch.timm(m)
                    m.r = tome_r
                    configs[f"official ToMe r={tome_r}"] = (m, gflops[f"official ToMe r={tome_r}"])
                if mode in ("compiled", "compiled-cpp"):
                    torch._dynamo.reset()
                    opts = {"cpp_wrapper": True} if mode == "compiled-cpp" else None
                    configs = {k: (torch.compile(m, dynamic=False, options=opts), g) for k, (m, g) in configs.items()}
                t0 = time.perf_counter()
                fns = {k: ((lambda m=m: m(x)), g) for k, (m, g) in configs.items()}
                clock = time.perf_counter if args.clock == "wall" else time.process_time
                times = _table(fns, min_rounds=args.min_rounds, seconds=args.seconds, stable=args.stable, clock=clock)
                base_med, base_iqr, base_ci = _stats(times["unpatched"])
                print(f"\n### batch {bs}, {mode}, {dtype_name}: {len(times['unpatched'])} rounds in {time.perf_counter() - t0:.0f} s")
                print("| configuration | GFLOPs | ms / batch (IQR) | speed-up | ideal | of ideal |\n|---|---|---|---|---|---|")
                for name, v in times.items():
                    med, iqr, ci = _stats(v)
                    g = configs[name][1]
                    speed, ideal = base_med / med, info.base_gflops / g
                    noise = speed * (ci + base_ci)
                    flag = (speed - noise > ideal * 1.0 + 1e-9) or iqr > FLAG_SPREAD
                    print(f"| {name} | {g:.3f} | {med:.2f} ({100 * iqr:.0f}%) | {speed:.2f}x | {ideal:.2f}x | {speed / ideal:.2f}{' !' if flag else ''} |")
                    out.append(
                        {"batch_size": bs, "mode": mode, "dtype": dtype_name, "config": name, "gflops": g, "median_ms": med,
                         "iqr_frac": iqr, "ci_frac": ci, "speedup": speed, "ideal": ideal, "of_ideal": speed / ideal,
                         "flagged": bool(flag), "rounds": len(v)}
                    )
                if args.ratio_to:
                    _print_ratios(times, args.ratio_to)
                sys.stdout.flush()
    if args.json:
        meta = {"model": args.model, "threads": torch.get_num_threads(), "clock": args.clock, "command": " ".join(sys.argv)}
        args.json.write_text(json.dumps({**meta, "rows": out}, indent=1) + "\n")


if __name__ == "__main__":
    main()
