"""Where hand-set RAPID's batch-1 time goes beyond a zero-cost reduction, eager and compiled (CPU).

The zero-cost oracle (``speed._Oracle``: the unpatched blocks fed RAPID's token counts by slicing) runs
the same matmuls, attention and MLPs on the same token counts; what RAPID spends beyond it is the
price of the reduction. Eager: each block's attention (timm's module in the oracle, the runtime's
``_attention`` with proportional attention and the importance row in RAPID) and reduction
(``_reduce``), timed in the model, medians over rounds. Compiled (``torch.compile(fullgraph=True)``,
Inductor's per-kernel profiling on): the profiler's self time per forward, grouped into the Python
wrapper that calls the kernels, the matmuls (``bmm``, ``baddbmm``: the explicit attention and the similarities),
the generated kernels, the ATen fallbacks the graph calls (top-k, sort, scatter_reduce, ...), and
Dynamo's guard check.

    python benchmarks/overhead.py --ratio 0.5 --rounds 40 --compiled
    python benchmarks/overhead.py --attention

``--attention`` times one attention alone (DeiT-Tiny's widths, with the proportional-attention bias)
over batch sizes and token counts: the fused CPU kernel against matmul + softmax + matmul, the
measurement behind ``rapid_search.runtime.engine.EXPLICIT_ATTENTION_MAX``.

Random weights (speed does not depend on them); one thread; numbers in microseconds per forward.
"""

from __future__ import annotations

import argparse
import collections
import copy
import statistics
import time
from typing import Any

import timm
import torch

import rapid_search as rs
from rapid_search.runtime import engine
from speed import _Oracle  # benchmarks/ is on sys.path when run as a script

#: Generated-kernel names that belong to the reduction (what the oracle's graph has none of).
_REDUCTION_KERNEL = ("index_select", "gather", "index_fill", "scatter", "arange", "cat", "clamp_min", "log", "index_add")


def _eager(model: torch.nn.Module, oracle: _Oracle, x: torch.Tensor, rounds: int) -> None:
    """Per block: tokens in, attention beyond the oracle's, reduction (medians, µs)."""
    spent: dict[tuple[str, int], list[float]] = collections.defaultdict(list)
    calls = {"block": 0}

    def timed(name: str, fn: Any) -> Any:
        def run(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            out = fn(*a, **k)
            spent[(name, calls["block"])].append(time.perf_counter() - t)
            return out

        return run

    blocks = list(model.blocks)
    hooks = [blk.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__("block", i)) for i, blk in enumerate(blocks)]
    started: dict[int, float] = {}
    for i, blk in enumerate(oracle.m.blocks):
        hooks.append(blk.attn.register_forward_pre_hook(lambda m, a, i=i: started.__setitem__(i, time.perf_counter())))
        hooks.append(blk.attn.register_forward_hook(lambda m, a, o, i=i: spent[("oracle attention", i)].append(time.perf_counter() - started[i])))
    saved = engine._attention, engine._reduce
    engine._attention, engine._reduce = timed("attention", engine._attention), timed("reduction", engine._reduce)
    try:
        with torch.inference_mode():
            for _ in range(rounds):
                model(x)
                oracle(x)
    finally:
        engine._attention, engine._reduce = saved
        for h in hooks:
            h.remove()
    med = {k: statistics.median(v) * 1e6 for k, v in spent.items()}
    counts = oracle.counts  # tokens entering each block (the schedule's, as the oracle slices them)
    print("\n### eager, batch 1: each block beyond the zero-cost oracle (µs, medians)")
    print("| block | op | tokens in | attention beyond the oracle's | reduction |")
    print("|---|---|---|---|---|")
    extra_total = red_total = 0.0
    for i, blk in enumerate(blocks):
        layer = blk._rapid_layer
        if ("attention", i) not in med:  # an idle block: timm's own forward
            continue
        extra = med[("attention", i)] - med[("oracle attention", i)]
        red = med.get(("reduction", i), 0.0)
        extra_total += extra
        red_total += red
        print(f"| {i} | {layer.op} | {counts[i]} | {extra:+.0f} | {red:.0f} |")
    print(f"| all | | | {extra_total:+.0f} | {red_total:.0f} |")


def _compiled(model: torch.nn.Module, oracle: _Oracle, x: torch.Tensor, rounds: int) -> None:
    """Profiler self time per forward of the compiled RAPID model and oracle, grouped (µs)."""
    import torch._inductor.config as inductor_config
    from torch.profiler import ProfilerActivity, profile

    inductor_config.cpp.enable_kernel_profile = True  # each generated kernel is its own profiler event
    rows: dict[str, dict[str, float]] = {}
    for name, module in (("RAPID hand-set", model), ("zero-cost oracle", oracle)):
        compiled = torch.compile(module, fullgraph=True)
        with torch.inference_mode():
            for _ in range(5):
                compiled(x)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(rounds):
                    compiled(x)
        groups: dict[str, float] = collections.Counter()
        for e in prof.key_averages():
            t = e.self_cpu_time_total / rounds
            if e.key.startswith("graph_") and "softmax" in e.key:  # the explicit attention's (the importance reads its rows)
                groups["generated kernels, attention softmax"] += t
            elif e.key.startswith("graph_"):
                groups["generated kernels, reduction" if any(s in e.key for s in _REDUCTION_KERNEL) else "generated kernels, other"] += t
            elif e.key.startswith("## Call CompiledFxGraph"):
                groups["Python wrapper (calls, allocations, checks)"] += t
            elif e.key == "TorchDynamo Cache Lookup":
                groups["Dynamo guard check"] += t
            elif e.key in ("aten::addmm", "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::mkldnn_convolution", "aten::bmm", "aten::baddbmm"):
                groups["matmuls (linear layers, attention, similarity), patch embedding"] += t
            elif e.key in ("aten::topk", "aten::sort", "aten::scatter_reduce_", "aten::arange"):
                groups[f"fallback {e.key[6:]}"] += t
            else:
                groups["other (views, copies, allocations)"] += t
        rows[name] = dict(groups)
    keys = sorted({k for r in rows.values() for k in r}, key=lambda k: -rows["RAPID hand-set"].get(k, 0.0))
    print("\n### compiled (fullgraph), batch 1: profiler self time per forward (µs)")
    print("| where | RAPID hand-set | zero-cost oracle | RAPID − oracle |")
    print("|---|---|---|---|")
    for k in keys:
        a, b = rows["RAPID hand-set"].get(k, 0.0), rows["zero-cost oracle"].get(k, 0.0)
        print(f"| {k} | {a:.0f} | {b:.0f} | {a - b:+.0f} |")
    ta, tb = sum(rows["RAPID hand-set"].values()), sum(rows["zero-cost oracle"].values())
    print(f"| total | {ta:.0f} | {tb:.0f} | {ta - tb:+.0f} |")


def _attention(rounds: int) -> None:
    """The runtime's ``engine._sdpa`` on ``(B, 3, N, 64)`` queries, keys, values with a ``(B, 1, 1, N)`` bias,
    forced onto the fused kernel (limit 0) and explicit (limit above the scores), µs medians."""
    limit = engine.EXPLICIT_ATTENTION_MAX
    H, hd = 3, 64
    attn = timm.layers.Attention(H * hd, num_heads=H).eval()
    print(f"\n### one attention, {H} heads of {hd}, with a size bias: fused kernel vs explicit (µs, medians of {rounds}; limit {limit} scores)")
    print("| batch | tokens | scores B·H·N² | fused | explicit | explicit / fused | runtime takes |")
    print("|---|---|---|---|---|---|---|")
    for B, N in ((1, 197), (1, 171), (1, 96), (1, 41), (1, 17), (8, 197), (8, 96), (8, 41), (32, 197), (32, 96), (32, 41), (32, 23)):
        q, k, v = (torch.randn(B, H, N, hd) for _ in range(3))  # (B, H, N, hd)
        bias = torch.rand(B, 1, 1, N).log()  # (B, 1, 1, N)

        def fused() -> Any:
            engine.EXPLICIT_ATTENTION_MAX = 0
            return engine._sdpa(attn, q, k, v, bias)

        def explicit() -> Any:
            engine.EXPLICIT_ATTENTION_MAX = B * H * N * N
            return engine._sdpa(attn, q, k, v, bias)

        t: dict[str, list[float]] = {"fused": [], "explicit": []}
        with torch.inference_mode():
            for _ in range(3):
                fused(), explicit()
            for _ in range(rounds):  # round-robin
                for name, fn in (("fused", fused), ("explicit", explicit)):
                    t0 = time.perf_counter()
                    fn()
                    t[name].append(time.perf_counter() - t0)
        engine.EXPLICIT_ATTENTION_MAX = limit
        f, e = (statistics.median(t[n]) * 1e6 for n in ("fused", "explicit"))
        scores = B * H * N * N
        print(f"| {B} | {N} | {scores} | {f:.0f} | {e:.0f} | {e / f:.2f} | {'explicit' if scores <= limit else 'fused'} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deit_tiny_patch16_224")
    ap.add_argument("--ratio", type=float, default=0.5, help="GFLOPs ratio of the hand-set schedule")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--compiled", action="store_true", help="also profile the compiled models (a minute of compiling)")
    ap.add_argument("--attention", action="store_true", help="only time one attention, fused kernel vs explicit, over batch sizes and token counts")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if args.attention:
        _attention(max(args.rounds, 20))
        return
    base = timm.create_model(args.model).eval()
    info = rs.model_info(base)
    schedule = rs.rapid_schedule(info, args.ratio)
    model = rs.apply(copy.deepcopy(base), schedule)
    oracle = _Oracle(copy.deepcopy(base), rs.token_counts(info, schedule))
    x = torch.randn(1, *base.pretrained_cfg["input_size"])  # (1, 3, H, W)
    print(f"{args.model}, hand-set RAPID at {args.ratio:.0%} GFLOPs, batch 1, 1 thread, torch {torch.__version__}, {args.rounds} rounds")
    _eager(model, oracle, x, args.rounds)
    if args.compiled:
        _compiled(model, oracle, x, args.rounds)


if __name__ == "__main__":
    main()
