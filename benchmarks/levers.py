"""Which changes to RAPID would let the search find better schedules at 50% GFLOPs? Measured on
calibration images only (issue 12): every variant is scored on ``imagenet-calib`` (never on the
evaluation images) by the search's own score, the KL divergence from the unreduced model's
predictions (lower is better), with calibration top-1 and agreement alongside.

Variants (fixed counts; the searched schedule's prune threshold dropped where it would make the
counts data-dependent):

* ``fold``: a prune block merges each dropped token into its near-duplicate (size-weighted, sizes
  tracked, proportional attention) instead of discarding it. An experiment in this script only.
* the hand-set schedule over a grid of switch depth and protected fraction;
* other ops in the deep blocks: ToMe's bipartite merge, EViT-style importance pruning, or
  pruning everywhere;
* the importance signal: class attention with the head *maximum* instead of the mean, divided
  by the token's size (importance per patch), or the attention a token receives from every token
  instead of from the class token;
* the similarity metric: the residual stream instead of the head-averaged keys;
* proportional attention off (in the attention only, or also in the importance);
* which tokens merge: destinations only the unprotected B tokens (not the protected ones), or
  sources the least important unprotected tokens instead of every other one;
* per-block protection: the protected fraction rising or falling linearly over the merge blocks
  (counts re-fitted to the budget);
* the strength of proportional attention: ``alpha * log(size)`` added to the logits instead of
  ``log(size)`` (ToMe's choice, alpha 1), in the attention and the importance alike.

On the current defaults (MLERP, residual-stream similarity; the hand-set schedule and the shipped
searched one, same counts), rows labelled "hand-set (MLERP, tokens)" / "searched (shipped)":

* the similarity computed on a transformed metric: centred (minus the size-weighted mean patch
  token), layer-normed without affine, both, or standardised per channel;
* a size-aware merge: pair score = cosine similarity - ``beta * (log size_src + log size_dst)``;
* an importance-weighted merge: averages weighted by ``size * (1 + gamma * T * importance)``;
* protection by PiToMe's energy (the most distinct tokens protected instead of the most attended),
  or by the mean of the importance and energy ranks;
* protection by the token's norm (the residual stream's high-norm tokens), or by a mix of the
  importance and norm ranks.

Every hand-set row here merges with ``merged_norm: mean`` and compares ``similarity: keys`` (the
levers were measured before MLERP and the residual-stream similarity became the defaults;
``benchmarks/merged_norm.py`` measures those two levers). The "searched" rows load
``studies/MODEL-50pct.yaml``: the tables in ``benchmarks/levers/`` were made with the schedules
shipped before MLERP (git 97f644f), ``current-defaults.md`` with the third generation (git 61d8af2).
Every hand-set row prunes in every block before the switch (``prune_blocks=info.depth``), the
hand-set structure when the tables were made (``benchmarks/handset_structure.py`` measures the
structure of today's default).

    python benchmarks/levers.py --model vit_tiny_patch16_224   # ~15 min on one core
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from rapid_search import apply, remove
from rapid_search.runtime import engine, ops
from rapid_search.runtime.flops import schedule_macs
from rapid_search.runtime.presets import _fit_two_level, make_schedule, model_info, rapid_schedule, tome_for_ratio
from rapid_search.runtime.schedule import LayerSpec, Schedule
from rapid_search.tools.data import load_images
from rapid_search.tools.loading import load_model


def _fold(metric: torch.Tensor, r: int, *, num_prefix: int) -> Optional[ops.Reduction]:
    """Redundancy pruning whose dropped A tokens are merged into their most similar B token."""
    B, N, _ = metric.shape
    T = N - num_prefix
    m = F.normalize(metric[:, num_prefix:].float(), dim=-1)  # (B, T, C)
    score, best = (m[:, ::2] @ m[:, 1::2].transpose(1, 2)).max(-1)  # (B, Ta) similarity and B match
    drop = ops._select_top(score, r, torch.ones_like(score, dtype=torch.bool))  # (B, Ta)
    remove_p = torch.zeros(B, T, dtype=torch.bool)
    remove_p[:, ::2] = drop
    own = torch.arange(T).expand(B, T).clone()  # (B, T) destination of every patch token
    own[:, ::2] = torch.where(drop, best * 2 + 1, own[:, ::2])
    dst = torch.cat([torch.arange(num_prefix).expand(B, num_prefix), own + num_prefix], 1)  # (B, N)
    return ops._compact(ops._full_mask(remove_p, num_prefix), None, dst=dst)


_REDUCE = engine._reduce
_IMPORTANCE = engine._importance


def _fold_reduce(x, keys, importance, layer, rt):
    """``engine._reduce`` with folding prune blocks (``keys``: the attention's metric, computed on demand)."""
    if layer.op != "prune":
        return _REDUCE(x, keys, importance, layer, rt)
    red = _fold(x if layer.similarity == "tokens" else keys(), layer.r, num_prefix=rt.num_prefix)
    x, rt.state.size = ops.merge_wavg(red, x, rt.state.size)
    rt.state.merged = True
    return x


def _residual_metric(x, keys, importance, layer, rt):
    return _REDUCE(x, lambda: x, importance, layer, rt)  # the residual stream in place of the keys


def _head_max(q, k, scale, size, *, rows, num_prefix, bias, probs=None):  # probs: the attention's own rows, not used here
    logits = (q[:, :, :rows] * scale) @ k.transpose(-2, -1)  # (B, H, R, N)
    if bias is not None:
        logits = logits + bias
    return logits.float().softmax(-1).amax(dim=1).mean(1)[:, num_prefix:]  # (B, T)


_SDPA = engine._sdpa
_MERGE = engine.fixed_merge
_REDUCE_FIXED = engine._reduce_fixed
_SIZE: list[Optional[torch.Tensor]] = [None]  # the sizes of the layer being reduced, for the size-aware merge


def _centre(m: torch.Tensor, rt) -> torch.Tensor:
    """The metric minus the size-weighted mean of the patch tokens (cosine then compares deviations)."""
    P, size = rt.num_prefix, rt.state.size
    w = torch.ones_like(m[:, P:, :1]) if size is None else size[:, P:].to(m.dtype)  # (B, T, 1)
    return m - (m[:, P:] * w).sum(1, keepdim=True) / w.sum(1, keepdim=True)  # (B, N, C)


def _standardise(m: torch.Tensor, rt) -> torch.Tensor:
    """Per-channel standardisation over the patch tokens (centred, divided by each channel's spread)."""
    c = _centre(m, rt)
    return c / c[:, rt.num_prefix :].std(1, keepdim=True).clamp_min(1e-6)  # (B, N, C)


_METRIC_TRANSFORMS: dict[str, Callable] = {
    "centred": _centre,
    "layer-normed (no affine)": lambda m, rt: F.layer_norm(m, (m.shape[-1],)),
    "centred and layer-normed": lambda m, rt: F.layer_norm(_centre(m, rt), (m.shape[-1],)),
    "standardised per channel": _standardise,
}


def _transformed_metric(transform: Callable) -> Callable:
    """``engine._reduce_fixed`` comparing tokens by ``transform(metric, rt)`` (MLERP then takes the
    tokens' own norms, the metric no longer being the tokens)."""

    def reduce_fixed(x, metric, importance, layer, rt):
        return _REDUCE_FIXED(x, None if metric is None else transform(metric, rt), importance, layer, rt)

    return reduce_fixed


def _with_size(x, metric, importance, layer, rt):
    """``engine._reduce_fixed`` that hands the layer's sizes to the size-aware merge (through ``_SIZE``)."""
    _SIZE[0] = rt.state.size
    return _REDUCE_FIXED(x, metric, importance, layer, rt)


def _importance_weighted(gamma: float) -> Callable:
    """``engine._reduce_fixed`` whose merges average with weights ``size * (1 + gamma * T * importance)``
    (the merged token leans towards its more important members; sizes tracked as usual), MLERP kept."""

    def reduce_fixed(x, metric, importance, layer, rt):
        if layer.op != "merge":
            return _REDUCE_FIXED(x, metric, importance, layer, rt)
        st, P = rt.state, rt.num_prefix
        red = ops.fixed_merge(metric, importance, layer.r, num_prefix=P, protect=float(layer.protect))
        if red is None:
            return x
        B, N, C = x.shape
        size = torch.ones(B, N, 1) if st.size is None else st.size.float()  # (B, N, 1)
        w = torch.ones(B, N, 1)
        w[:, P:, 0] += gamma * (N - P) * importance.float()  # 1 + gamma at the mean importance
        buf = torch.cat([x.float() * size * w, size * w, size], -1).view(B * N, C + 2)
        buf.index_add_(0, red.dst, buf.index_select(0, red.src))
        out = buf.index_select(0, red.keep).view(B, -1, C + 2)  # (B, L, C + 2)
        merged = out[..., :C] / out[..., C : C + 1]  # (B, L, C)
        if layer.merged_norm == "max":
            merged = ops.peak_norm(red, x, merged)
        st.size, st.merged = out[..., C + 1 :], True
        return merged.to(x.dtype)

    return reduce_fixed


def _protect_by(score: Callable[[torch.Tensor], torch.Tensor], mix: Optional[float] = None) -> Callable:
    """``ops.fixed_merge`` protecting the patch tokens of highest ``score(patch_metric)`` ``(B, T)``
    instead of the most attended; ``mix``: by ``mix * rank(importance) + (1 - mix) * rank(score)``."""

    def merge(metric, importance, r, *, num_prefix, protect):
        s = score(metric[:, num_prefix:])  # (B, T)
        if mix is not None:
            s = mix * importance.argsort(1).argsort(1).float() + (1 - mix) * s.argsort(1).argsort(1).float()
        return _MERGE(metric, s, r, num_prefix=num_prefix, protect=protect)

    return merge


def _distinctness(margin: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Minus PiToMe's energy of every patch token ``(B, T, C) -> (B, T)``: the mean over the patch
    tokens of the cosine similarity, ``exp(s - margin) - 1`` below ``margin`` (high = distinct)."""

    def score(m: torch.Tensor) -> torch.Tensor:
        u = ops._unit(m)  # (B, T, C)
        s = u @ u.transpose(1, 2)  # (B, T, T)
        return -torch.where(s >= margin, s, torch.exp(s - margin) - 1).mean(-1)  # (B, T)

    return score


def _token_norm(m: torch.Tensor) -> torch.Tensor:
    """Norm of every patch token's metric ``(B, T, C) -> (B, T)`` (the residual stream's high-norm tokens)."""
    return torch.linalg.vector_norm(m.float(), dim=-1)


def _no_prop(attn, q, k, v, mask, *, rows=0):
    return _SDPA(attn, q, k, v, None, rows=rows)


def _no_prop_importance(q, k, scale, size, *, rows, num_prefix, bias, probs=None):  # probs: the attention's own rows, not used here
    return _IMPORTANCE(q, k, scale, size, rows=rows, num_prefix=num_prefix, bias=None)


def _received(q, k, scale, size, *, rows, num_prefix, bias, probs=None):  # probs: the attention's own rows, not used here
    """Importance = the attention each token receives from every query (size-weighted mean over the
    queries, head-averaged) instead of from the class token: O(N^2), an experiment only."""
    logits = (q * scale) @ k.transpose(-2, -1)  # (B, H, N, N)
    if bias is not None:
        logits = logits + bias
    a = logits.float().softmax(-1)  # (B, H, N, N)
    w = (torch.ones_like(q[:, 0, :, :1]) if size is None else size).float()[:, None]  # (B, 1, N, 1) query weights
    return ((a * w).sum(2) / w.sum(2)).mean(1)[:, num_prefix:]  # (B, T)


def _per_size(q, k, scale, size, *, rows, num_prefix, bias, probs=None):  # probs: the attention's own rows, not used here
    imp = _IMPORTANCE(q, k, scale, size, rows=rows, num_prefix=num_prefix, bias=bias)  # (B, T)
    return imp if size is None else imp / size[:, num_prefix:, 0]


def _scaled_prop(alpha: float) -> tuple[Callable, Callable]:
    """``(sdpa, importance)`` with proportional attention ``alpha * log(size)`` (the mask is that bias)."""

    def sdpa(attn, q, k, v, mask, *, rows=0):
        return _SDPA(attn, q, k, v, None if mask is None else mask * alpha, rows=rows)

    def importance(q, k, scale, size, *, rows, num_prefix, bias, probs=None):  # probs: the attention's own rows, not used here
        return _IMPORTANCE(q, k, scale, size, rows=rows, num_prefix=num_prefix, bias=None if bias is None else bias * alpha)

    return sdpa, importance


def _merge_variant(sources: str, beta: float = 0.0) -> Callable:
    """``ops.fixed_merge`` with other sources, destinations or pair scores: ``"b-only"`` (every other
    unprotected token merges into the unprotected rest only), ``"least-important"`` (the least
    important unprotected tokens merge into any other patch token) or ``"size-aware"`` (sources and
    destinations as usual, pair score = cosine similarity - ``beta * (log size_src + log size_dst)``,
    so that large tokens are less likely to grow further; run with :func:`_with_size`)."""

    def merge(metric, importance, r, *, num_prefix, protect):
        B, N, C = metric.shape
        P, T = num_prefix, N - num_prefix
        k, ta, r = ops.merge_sizes(T, protect, r)
        if T < 2 or r <= 0:
            return None
        m = ops._unit(metric)  # (B, N, C)
        if sources == "b-only":
            unp = importance.topk(T - k, dim=1, largest=False).indices.sort(dim=1).values + P  # (B, T - k)
            a, b = unp[:, ::2], unp[:, 1::2]  # (B, Ta), (B, Tb)
            sim = m.gather(1, a[..., None].expand(B, ta, C)) @ m.gather(1, b[..., None].expand(B, b.shape[1], C)).transpose(1, 2)
            score, j = sim.max(-1)  # (B, Ta)
            dst_all = b.gather(1, j)  # (B, Ta)
        else:
            if sources == "size-aware":
                a = importance.topk(T - k, dim=1, largest=False).indices.sort(dim=1).values[:, ::2] + P  # (B, Ta) every other unprotected
            else:
                a = importance.topk(ta, dim=1, largest=False).indices + P  # (B, Ta) least important
            sim = m[:, P:] @ m.gather(1, a[..., None].expand(B, ta, C)).transpose(1, 2)  # (B, T, Ta)
            if sources == "size-aware" and _SIZE[0] is not None:
                ls = _SIZE[0][:, P:, 0].float().log()  # (B, T)
                sim = sim - beta * (ls[:, :, None] + ls.gather(1, a - P)[:, None, :])
            sim = sim.masked_fill(torch.zeros(B, T, dtype=torch.bool).scatter(1, a - P, True)[..., None], float("-inf"))
            score, j = sim.max(dim=1)  # (B, Ta)
            dst_all = j + P
        chosen = score.topk(r, dim=1).indices  # (B, r)
        src, dst = a.gather(1, chosen), dst_all.gather(1, chosen)  # (B, r) each
        return ops.FixedReduction(B, N, ops._kept_rows(B, N, src), ops._flat(src, N), ops._flat(dst, N))

    return merge


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vit_tiny_patch16_224")
    ap.add_argument("--data", default=os.path.join(os.environ.get("RAPID_SHARED", "../shared"), "data/imagenet-calib"))
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--searched", default=None, help="searched schedule to compare (default studies/MODEL-50pct.yaml)")
    ap.add_argument("--images", type=int, default=750)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", action="append", default=[], metavar="TEXT", help="run only the rows whose label contains TEXT (repeatable)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    info = model_info(model)
    X = load_images(args.data, model=model, limit=args.images, seed=0)
    Y = torch.as_tensor(X.labels)

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([model(X.images[i : i + 50]) for i in range(0, len(X.images), 50)])  # (N, 1000)

    base = forward()
    lp = F.log_softmax(base, -1)
    print(f"{args.model}, {len(Y)} calibration images, {args.ratio:.0%} GFLOPs; unreduced calibration top-1 {(base.argmax(-1) == Y).float().mean():.1%}")
    print("| variant | GFLOPs ratio | KL | calib top-1 | agreement |\n|---|---|---|---|---|")

    def row(label: str, s: Schedule, reduce: Callable = _REDUCE, importance: Callable = _IMPORTANCE, sdpa: Callable = _SDPA,
            merge: Callable = _MERGE, reduce_fixed: Callable = _REDUCE_FIXED) -> None:  # fmt: skip
        if args.only and not any(t in label for t in args.only):
            return
        apply(model, s)
        engine._reduce, engine._importance, engine._sdpa, engine.fixed_merge, engine._reduce_fixed = reduce, importance, sdpa, merge, reduce_fixed
        try:
            out = forward()
        finally:
            engine._reduce, engine._importance, engine._sdpa, engine.fixed_merge, engine._reduce_fixed = (
                _REDUCE, _IMPORTANCE, _SDPA, _MERGE, _REDUCE_FIXED
            )
            remove(model)
        kl = (lp.exp() * (lp - F.log_softmax(out, -1))).sum(-1).mean()
        top1, agree = (out.argmax(-1) == Y).float().mean(), (out.argmax(-1) == base.argmax(-1)).float().mean()
        print(f"| {label} | {schedule_macs(info, s.layers) / info.base_macs:.4f} | {kl:.4f} | {top1:.1%} | {agree:.1%} |", flush=True)

    def fit(build: Callable) -> Schedule:
        return make_schedule(info, build(_fit_two_level(info, build, args.ratio * info.base_macs, info.num_tokens)), method="variant")

    def deep(op: str, sw: int = 3) -> Callable:
        return lambda r: [LayerSpec("prune", int(x)) if i < sw else LayerSpec(op, int(x)) for i, x in enumerate(r)]

    pct = round(args.ratio * 100)
    searched = Schedule.load(args.searched or f"studies/{args.model}-{pct}pct.yaml")
    fixed = make_schedule(info, [dataclasses.replace(l, threshold=None) for l in searched.layers], method="searched-fixed")
    hand = rapid_schedule(model, args.ratio, merged_norm="mean", similarity="keys", prune_blocks=info.depth)
    row("searched (shipped)", searched)
    row("searched, fixed counts", fixed)
    row("searched, fixed counts, fold", fixed, reduce=_fold_reduce)
    row("hand-set", hand)
    row("hand-set, fold", hand, reduce=_fold_reduce)
    for sw, p in [(0, 0.25), (0, 0.5), (2, 0.0), (2, 0.25), (2, 0.5), (2, 0.6), (3, 0.6), (4, 0.5), (6, 0.5)]:
        row(f"hand-set switch {sw}, protect {p}", rapid_schedule(model, args.ratio, merged_norm="mean", similarity="keys", switch=sw, protect=p, prune_blocks=info.depth))
    row("prune 3 blocks, then ToMe merge", fit(deep("tome")))
    row("prune 3 blocks, then EViT pruning", fit(deep("evit")))
    row("prune every block", rapid_schedule(model, args.ratio, merged_norm="mean", similarity="keys", switch=info.depth, protect=0.0, prune_blocks=info.depth))
    row("ToMe, constant r", tome_for_ratio(model, args.ratio))
    best = rapid_schedule(model, args.ratio, merged_norm="mean", similarity="keys", switch=3, protect=0.6, prune_blocks=info.depth)
    row("switch 3, protect 0.6, importance: head max", best, importance=_head_max)
    row("switch 3, protect 0.6, importance: attention received from every token", best, importance=_received)
    row("searched (shipped), importance: attention received from every token", searched, importance=_received)
    row("switch 3, protect 0.6, metric: residual stream", best, reduce=_residual_metric)
    row("switch 3, protect 0.6, importance per patch (divided by size)", best, importance=_per_size)
    row("switch 3, protect 0.6, no proportional attention", best, sdpa=_no_prop)
    row("switch 3, protect 0.6, no proportional attention (also in the importance)", best, sdpa=_no_prop, importance=_no_prop_importance)
    for alpha in (0.5, 0.75, 1.25, 1.5):
        sdpa, importance = _scaled_prop(alpha)
        row(f"switch 3, protect 0.6, proportional attention x {alpha}", best, sdpa=sdpa, importance=importance)
    row("switch 3, protect 0.6, destinations: unprotected B only", best, merge=_merge_variant("b-only"))
    row("switch 3, protect 0.6, sources: least important", best, merge=_merge_variant("least-important"))

    def ramp(lo: float, hi: float) -> Callable:  # protect from lo to hi over the merge blocks
        n = info.depth - 3
        return lambda r: [
            LayerSpec("prune", int(x)) if i < 3 else LayerSpec("merge", int(x), None, round(lo + (hi - lo) * (i - 3) / max(1, n - 1), 3))
            for i, x in enumerate(r)
        ]

    for lo, hi in [(0.3, 0.8), (0.4, 0.8), (0.2, 0.9), (0.8, 0.3)]:
        row(f"switch 3, protect {lo} -> {hi} over the merge blocks", fit(ramp(lo, hi)))

    # levers on the current defaults (MLERP, residual-stream similarity): the hand-set schedule and the shipped one
    current = {"hand-set (MLERP, tokens)": rapid_schedule(model, args.ratio, prune_blocks=info.depth), "searched (shipped)": searched}
    for name, s in current.items():
        row(f"{name}, reference", s)
        for label, transform in _METRIC_TRANSFORMS.items():
            row(f"{name}, similarity on the {label} metric", s, reduce_fixed=_transformed_metric(transform))
        for beta in (0.02, 0.05, 0.1):
            row(f"{name}, size-aware merge, beta {beta}", s, merge=_merge_variant("size-aware", beta), reduce_fixed=_with_size)
        for gamma in (0.5, 1.0, 2.0):
            row(f"{name}, importance-weighted merge, gamma {gamma}", s, reduce_fixed=_importance_weighted(gamma))
        for margin in (0.3, 0.5, 0.7):
            row(f"{name}, energy protection, margin {margin}", s, merge=_protect_by(_distinctness(margin)))
        row(f"{name}, protection by importance and energy ranks, margin 0.5", s, merge=_protect_by(_distinctness(0.5), mix=0.5))
        row(f"{name}, protection by norm", s, merge=_protect_by(_token_norm))
        for mix in (0.5, 0.8):
            row(f"{name}, protection by importance and norm ranks, {mix} / {1 - mix:.1f}", s, merge=_protect_by(_token_norm, mix))


if __name__ == "__main__":
    main()
