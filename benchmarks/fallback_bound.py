"""How much a selection without ATen fallbacks could save at most: hand-set RAPID against a copy whose
lean selections use fixed indices (wrong tokens; the same shapes, similarities, gathers and merges).

On CPU, Inductor lowers neither ``topk`` nor ``sort`` (both fall back to ATen unless
``config.triton.decompose_sort_ops``, a Triton path) nor MLERP's ``scatter_reduce(amax)``: each is a
fallback that the generated wrapper calls and checks, four top-k and one ``scatter_reduce`` per merge
block. The copy replaces, in the lean path only (``engine.fixed_prune`` / ``engine.fixed_merge``, swapped
in around each of its calls so that both compiled models keep one graph), every top-k with ``arange``
(kept alive by a zero-weighted term of the scores, so the similarities are still computed) and MLERP's
group maximum with each kept token's own norm. Its graph has no fallback left, so its time bounds what
any fallback-free way of computing the same indices could reach (which would also have to compute them).

``--ladder`` adds copies that make more of the reduction free, each on top of the one before, and
the zero-cost oracle (``speed._Oracle``: timm's blocks fed the same token counts by slicing): where the
rest of the time beyond the oracle goes.

* ``no similarity``: the merge's sources and destinations are fixed too, as flat indices made once per
  shape (no normalisation, similarity ``bmm``, masking, maximum or index arithmetic; the prune block keeps
  its similarity);
* ``kept rows only``: the merge keeps its rows by one ``index_select`` (no merge buffer, sizes or MLERP;
  without sizes the later blocks' attention has no proportional-attention bias).

What remains between ``kept rows only`` and the oracle is the reducing blocks' own attention (explicit
on CPU at batch 1, with the importance row), the runtime's Python and the index bookkeeping.

Round-robin in one process, one forward each per round (``speed._table``, CPU clock); prints medians and
the median per-round time ratio to RAPID with a bootstrap 95 % interval. The copies' outputs are not RAPID's.

    python benchmarks/fallback_bound.py --rounds 300 --threads 1
    python benchmarks/fallback_bound.py --rounds 800 --eager --ladder
    python benchmarks/fallback_bound.py --rounds 20 --eager --ladder --batch-size 32 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Optional

import numpy as np
import timm
import torch

import rapid_search as rs
from rapid_search.runtime import engine, ops
from speed import _median_ci, _Oracle, _table  # benchmarks/ is on sys.path when run as a script


def _fixed(score: torch.Tensor, k: int) -> torch.Tensor:
    """``(B, k)`` indices ``0..k-1`` that depend on ``score`` (by a zero), so the scores are not dead code."""
    return torch.arange(k, device=score.device).expand(score.shape[0], k) + (score[:, :1] * 0).long()  # (B, k)


def _rows(batch: int, n: int, removed: torch.Tensor) -> torch.Tensor:
    """``batch * (n - R)`` valid flat rows in place of ``ops._kept_rows`` (no top-k)."""
    return torch.arange(batch * (n - removed.shape[1]), device=removed.device) + removed[:1, 0] * 0  # (B * (n - R),)


class _NoPeakGroup(ops.FixedReduction):
    """MLERP without the group maximum (a ``scatter_reduce`` fallback): each kept token's own norm."""

    def merge(self, x: torch.Tensor, size: Optional[torch.Tensor], *, peak: bool = False, norm: Optional[torch.Tensor] = None):
        merged, size = super().merge(x, size)
        if peak:
            B, N, _ = x.shape
            n = (ops._norm(x) if norm is None else norm).view(B * N).index_select(0, self.keep).view(B, self.num_out, 1)  # (B, L, 1)
            m = merged.to(n.dtype)  # (B, L, C) in float32 or wider, as the runtime's MLERP
            merged = (m * (n / torch.linalg.vector_norm(m, dim=-1, keepdim=True).clamp_min(1e-12))).to(x.dtype)  # (B, L, C)
        return merged, size


def _prune(metric: torch.Tensor, r: int, *, num_prefix: int) -> Optional[ops.FixedReduction]:
    """``ops.fixed_prune`` with fixed indices."""
    B, N, _ = metric.shape
    P, T = num_prefix, N - num_prefix
    r = min(r, (T + 1) // 2)
    if T < 2 or r <= 0:
        return None
    m = ops._unit(metric)  # (B, N, C)
    score = torch.bmm(m[:, P::2], m[:, P + 1 :: 2].transpose(1, 2)).amax(dim=-1)  # (B, Ta)
    drop = _fixed(score, r) * 2 + P  # (B, r) sequence positions of the first r A tokens
    return ops.FixedReduction(B, N, _rows(B, N, drop))


def _merge(metric: torch.Tensor, importance: torch.Tensor, r: int, *, num_prefix: int, protect: float) -> Optional[ops.FixedReduction]:
    """``ops.fixed_merge`` with fixed indices (protection, the sources' order and ranking, the kept rows)."""
    B, N, C = metric.shape
    P, T = num_prefix, N - num_prefix
    k, ta, r = ops.merge_sizes(T, protect, r)
    if T < 2 or r <= 0:
        return None
    a = _fixed(importance, T - k)[:, ::2]  # (B, Ta) patch positions of the sources
    norm = ops._norm(metric)  # (B, N, 1)
    u = ops._unit(metric, norm)  # (B, N, C)
    ma = u.view(B * N, C).index_select(0, ops._flat(a, N, P)).view(B, ta, C)  # (B, Ta, C)
    sim = torch.bmm(ma, u[:, P:].transpose(1, 2))  # (B, Ta, T)
    sim.scatter_(2, a[:, None, :].expand(B, ta, ta), float("-inf"))
    score, dst_a = sim.max(dim=2)  # (B, Ta)
    chosen = _fixed(score, r)  # (B, r)
    src, dst = a.gather(1, chosen), dst_a.gather(1, chosen)  # (B, r) patch positions
    return _NoPeakGroup(B, N, _rows(B, N, src), ops._flat(src, N, P), ops._flat(dst, N, P), metric_norm=norm)


class _KeepOnly(ops.FixedReduction):
    """A merge that only keeps its rows: one ``index_select`` (no merge buffer, sizes or MLERP)."""

    def merge(self, x: torch.Tensor, size: Optional[torch.Tensor], *, peak: bool = False, norm: Optional[torch.Tensor] = None):
        B, N, C = x.shape
        return x.reshape(B * N, C).index_select(0, self.keep).view(B, self.num_out, C), None  # (B, L, C)


def _merge_fixed_pairs(cls: type) -> object:
    """``ops.fixed_merge`` without the similarity or any index computation (same counts): the first ``r``
    of :func:`_merge`'s sources, each merged into the token after it, as flat indices made once per shape."""
    made: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def merge(metric: torch.Tensor, importance: torch.Tensor, r: int, *, num_prefix: int, protect: float) -> Optional[ops.FixedReduction]:
        B, N, C = metric.shape
        P, T = num_prefix, N - num_prefix
        r = ops.merge_sizes(T, protect, r)[2]
        if T < 2 or r <= 0:
            return None
        key = (B, N, r, metric.device)
        if key not in made:
            src = torch.arange(0, 2 * r, 2, device=metric.device).expand(B, r)  # (B, r) patch positions
            dst = (src + 1).clamp_max(T - 1)  # (B, r)
            made[key] = (_rows(B, N, src), ops._flat(src, N, P), ops._flat(dst, N, P))
        keep, src_rows, dst_rows = made[key]
        norm = ops._norm(metric) if cls is _NoPeakGroup else None  # (B, N, 1) for MLERP
        return cls(B, N, keep, src_rows, dst_rows, metric_norm=norm)

    return merge


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deit_tiny_patch16_224")
    ap.add_argument("--ratio", type=float, default=0.5, help="hand-set RAPID at this GFLOPs ratio (default 0.5)")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eager", action="store_true", help="time the eager models instead (the bound on the eager selection)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    ap.add_argument("--ladder", action="store_true", help="also the copies without similarity and with kept rows only, and the zero-cost oracle")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    base = timm.create_model(args.model).eval().to(dtype)  # random weights: speed does not depend on them
    sched = rs.rapid_schedule(base, args.ratio)
    real = (engine.fixed_prune, engine.fixed_merge)
    variants = {"RAPID": real, "fixed indices": (_prune, _merge)}  # the lean path's (prune, merge) for each copy
    if args.ladder:
        variants["no similarity"] = (_prune, _merge_fixed_pairs(_NoPeakGroup))
        variants["kept rows only"] = (_prune, _merge_fixed_pairs(_KeepOnly))
    patched = {k: rs.apply(copy.deepcopy(base), sched) for k in variants}
    models = {"unpatched": copy.deepcopy(base), **patched}
    if args.ladder:
        models["zero-cost oracle"] = _Oracle(copy.deepcopy(base), rs.token_counts(rs.model_info(base), sched))
    if not args.eager:
        models = {k: torch.compile(m, dynamic=False, fullgraph=k in variants) for k, m in models.items()}
    x = torch.randn(args.batch_size, *base.pretrained_cfg["input_size"], generator=torch.Generator().manual_seed(0)).to(dtype)

    def call(name: str) -> torch.Tensor:
        engine.fixed_prune, engine.fixed_merge = variants.get(name, real)
        try:
            return models[name](x)
        finally:
            engine.fixed_prune, engine.fixed_merge = real

    with torch.inference_mode():  # every copy runs RAPID's token counts (what makes the comparison fair)
        counts = {}
        for k in variants:
            call(k)
            counts[k] = rs.last_token_counts(patched[k]).tolist()
    if any(c != counts["RAPID"] for c in counts.values()):
        raise SystemExit(f"fallback_bound.py: the copies' token counts differ from RAPID's: {counts}")
    times = _table({k: ((lambda k=k: call(k)), 0.0) for k in models}, min_rounds=args.rounds, seconds=0.0, stable=0.0, clock=time.thread_time)
    t = {k: np.asarray(v) for k, v in times.items()}
    rng = np.random.default_rng(0)
    mode = "eager" if args.eager else "compiled"
    print(f"{args.model}, hand-set RAPID {args.ratio:.0%}, batch {args.batch_size}, {mode}, {args.dtype}, {args.threads} thread(s), CPU clock, {len(t['RAPID'])} rounds")
    print("| copy | ms (median) | time / RAPID, median per round [95% CI] |\n|---|---|---|")
    for k, v in t.items():
        ratio = v / t["RAPID"]
        lo, hi = _median_ci(ratio, 2000, rng)
        print(f"| {k} | {np.median(v):.2f} | {np.median(ratio):.4f} [{lo:.4f}, {hi:.4f}] |")


if __name__ == "__main__":
    main()
