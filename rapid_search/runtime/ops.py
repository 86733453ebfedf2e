"""Pure tensor operations for token reduction.

Nothing here touches a model. Each matching function looks at a similarity ``metric`` (and, for
the importance-aware merge, an importance score) once, computes the indices, and returns a
:class:`Reduction` whose ``__call__`` applies the same reduction to any per-token tensor
(features, sizes, source maps). This mirrors ToMe's "compute indices once, return a closure"
design; ``None`` is returned when nothing would be reduced (identity fast path).

Conventions:
    * Tokens are ``(B, N, C)``; the first ``num_prefix`` tokens (class, distillation, register
      tokens) are never removed and never absorb other tokens.
    * ``n_valid`` (``(B,)``, optional) is the number of real tokens per image; tokens at positions
      ``>= n_valid`` are padding, which appears only after data-dependent (threshold) layers.
      Padding always sits at the tail, so the real tokens of an image are laid out exactly as in
      a single-image forward: batched results equal per-image results.
    * Similarity is cosine similarity of the metric (head-averaged attention keys).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

__all__ = [
    "Reduction",
    "TomeReduction",
    "bipartite_soft_matching",
    "redundancy_prune",
    "importance_merge",
    "importance_prune",
    "merge_wavg",
    "merge_source",
    "peak_norm",
    "follow_positions",
    "protected_count",
    "merge_sizes",
    "FixedReduction",
    "fixed_prune",
    "fixed_merge",
    "fixed_evit",
]

_NEG_INF = float("-inf")


def _wide(dtype: torch.dtype) -> torch.dtype:
    """float32 for reduced-precision dtypes, else the dtype itself (float64 stays float64)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in ``dtype`` (no op when it already is)."""
    return x if x.dtype == dtype else x.to(dtype)


def protected_count(num_tokens: int, protect: float) -> int:
    """Number of tokens protected by a merge layer: ``floor(protect * T + 0.5)``.

    The same float64 formula is used by the runtime (on tensors) and the cost model (on ints), so
    predicted and executed token counts agree exactly.
    """
    return int(math.floor(num_tokens * protect + 0.5))


def merge_sizes(num_tokens: int, protect: float, r: int) -> tuple[int, int, int]:
    """``(protected, sources, merged)`` of a fixed-count importance merge over ``num_tokens`` patch tokens:
    :func:`protected_count` tokens are protected, every other one of the rest is a source (half of them,
    rounded up), and ``r`` capped at the sources merge away. The runtime's merges and the cost model
    (:func:`rapid_search.runtime.schedule.effective_r`) both take their counts from here."""
    k = protected_count(num_tokens, protect)
    ta = (num_tokens - k + 1) // 2
    return k, ta, min(r, ta)


@dataclass
class Reduction:
    """A token reduction computed once, applicable to any ``(B, N, C)`` per-token tensor.

    Attributes:
        keep_idx: ``(B, L)`` indices of the tokens kept, in their original order, padded at the
            tail with removed positions when images keep different counts.
        n_keep: ``(B,)`` real tokens kept per image.
        dst: ``(B, N)`` destination index of every token for merges (a token's own index when it
            is not merged away); ``None`` for pure pruning.
        ragged: True when images keep different counts (the output carries padding).
        src_idx: ``(B, R)`` merged-away tokens when every image merges the same count ``R``
            (the fast path); None otherwise.
        dst_pos: ``(B, R)`` their destinations as positions in the output.
    """

    keep_idx: torch.Tensor
    n_keep: torch.Tensor
    dst: Optional[torch.Tensor]
    remove: torch.Tensor
    ragged: bool
    src_idx: Optional[torch.Tensor] = None
    dst_pos: Optional[torch.Tensor] = None

    def __call__(self, x: torch.Tensor, mode: str = "sum") -> torch.Tensor:
        """Apply the reduction to ``x`` of shape ``(B, N, C)`` -> ``(B, L, C)``.

        Args:
            x: Per-token tensor.
            mode: ``"sum"`` adds merged tokens into their destination (use on size-weighted
                features and sizes), ``"amax"`` takes the elementwise max (source maps).
        """
        B, N, C = x.shape
        L = self.keep_idx.shape[1]
        if self.dst is None:  # pruning: keep rows only
            return x.gather(1, self.keep_idx[..., None].expand(B, L, C))  # (B, L, C)
        if self.src_idx is not None:  # every image merges the same count: touch only r rows
            R = self.src_idx.shape[1]
            out = x.gather(1, self.keep_idx[..., None].expand(B, L, C))  # (B, L, C)
            src = x.gather(1, self.src_idx[..., None].expand(B, R, C))  # (B, R, C)
            index = self.dst_pos[..., None].expand(B, R, C)  # (B, R, C)
            if mode == "sum":
                return out.scatter_add_(1, index, src)
            return out.scatter_reduce_(1, index, src, reduce=mode, include_self=True)
        contrib = x * self.remove[..., None].to(x.dtype)  # (B, N, C) merged-away tokens only
        index = self.dst[..., None].expand(B, N, C)  # (B, N, C)
        if mode == "sum":
            x = x.scatter_add(1, index, contrib)  # (B, N, C)
        else:
            x = x.scatter_reduce(1, index, contrib, reduce=mode, include_self=True)
        return x.gather(1, self.keep_idx[..., None].expand(B, L, C))  # (B, L, C)

    def valid_mask(self) -> Optional[torch.Tensor]:
        """``(B, L)`` bool mask of real (non-padding) output tokens, or None if not ragged."""
        if not self.ragged:
            return None
        L = self.keep_idx.shape[1]
        return torch.arange(L, device=self.keep_idx.device)[None, :] < self.n_keep[:, None]


def _compact(remove: torch.Tensor, valid: Optional[torch.Tensor], dst: Optional[torch.Tensor]) -> Optional[Reduction]:
    """Turn a ``(B, N)`` removal mask into a :class:`Reduction` (kept tokens first, in order)."""
    B, N = remove.shape
    keep = ~remove if valid is None else (~remove & valid)  # (B, N)
    n_keep = keep.sum(1)  # (B,)
    if valid is None and not bool(remove.any()):
        return None
    pos = torch.arange(N, device=remove.device).expand(B, N)  # (B, N)
    key = torch.where(keep, pos, pos + N)  # kept tokens sort first, in original order
    L = int(n_keep.max())
    keep_idx = key.argsort(dim=1)[:, :L]  # (B, L)
    ragged = bool((n_keep != L).any())
    src_idx = dst_pos = None
    if dst is not None and valid is None and not ragged:
        R = N - L  # every image merges exactly R tokens
        src_idx = remove.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :R]  # (B, R)
        out_pos = keep.long().cumsum(1) - 1  # (B, N) output position of each kept token
        dst_pos = out_pos.gather(1, dst.gather(1, src_idx))  # (B, R)
    return Reduction(keep_idx=keep_idx, n_keep=n_keep, dst=dst, remove=remove, ragged=ragged, src_idx=src_idx, dst_pos=dst_pos)


def _patch_valid(n_valid: Optional[torch.Tensor], num_prefix: int, T: int, device: torch.device) -> Optional[torch.Tensor]:
    """``(B, T)`` mask of real patch tokens, or None when there is no padding."""
    if n_valid is None:
        return None
    return torch.arange(T, device=device)[None, :] < (n_valid - num_prefix)[:, None]  # (B, T)


def _seq_valid(n_valid: Optional[torch.Tensor], N: int, device: torch.device) -> Optional[torch.Tensor]:
    """``(B, N)`` mask of real tokens over the whole sequence, or None when there is no padding."""
    if n_valid is None:
        return None
    return torch.arange(N, device=device)[None, :] < n_valid[:, None]  # (B, N)


def _full_mask(patch_mask: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Extend a ``(B, T)`` patch-token mask with ``num_prefix`` leading False columns."""
    B = patch_mask.shape[0]
    pad = patch_mask.new_zeros(B, num_prefix)
    return torch.cat([pad, patch_mask], dim=1)  # (B, N)


def _select_top(score: torch.Tensor, r: int, eligible: torch.Tensor) -> torch.Tensor:
    """Mask of the ``r`` highest-scoring eligible entries of ``score`` ``(B, M)``."""
    r = min(r, score.shape[1])
    chosen = torch.zeros_like(eligible)
    if r > 0:
        chosen.scatter_(1, score.topk(r, dim=1).indices, True)  # (B, M)
    return chosen & eligible  # (B, M)


def redundancy_prune(
    metric: torch.Tensor,
    r: int,
    *,
    num_prefix: int,
    threshold: Optional[float] = None,
    n_valid: Optional[torch.Tensor] = None,
) -> Optional[Reduction]:
    """Redundancy-aware pruning: drop up to ``r`` tokens that duplicate a token that is kept.

    Patch tokens are split alternately into sets A and B (neighbours land in different sets).
    Each A token's redundancy is its highest cosine similarity to any B token; the ``r`` most
    redundant A tokens (and only those reaching ``threshold`` when it is set) are dropped. B
    tokens are all kept, so a dropped token's near-duplicate always survives and both members of
    a pair are never removed together.

    Args:
        metric: ``(B, N, C)`` similarity features (head-averaged keys, or the tokens themselves: ``LayerSpec.similarity``).
        r: Maximum number of tokens to drop per image (capped at ``ceil(T / 2)``, T patch tokens).
        num_prefix: Leading tokens never touched.
        threshold: Minimum similarity for a token to be dropped; None = fixed count ``r``.
        n_valid: ``(B,)`` real tokens per image when the input carries padding.

    Returns:
        A :class:`Reduction`, or None when nothing is removed.
    """
    if r <= 0 and n_valid is None:
        return None
    B, N, _ = metric.shape
    T = N - num_prefix
    m = F.normalize(_as(metric[:, num_prefix:], _wide(metric.dtype)), dim=-1)  # (B, T, C) float32 or wider
    a, b = m[:, ::2], m[:, 1::2]  # (B, Ta, C), (B, Tb, C)
    Ta = a.shape[1]
    if b.shape[1] == 0:
        score = a.new_full((B, Ta), _NEG_INF)
    else:
        sim = a @ b.transpose(1, 2)  # (B, Ta, Tb)
        pvalid = _patch_valid(n_valid, num_prefix, T, metric.device)
        if pvalid is not None:
            sim = sim.masked_fill(~pvalid[:, None, 1::2], _NEG_INF)
        score = sim.amax(dim=-1)  # (B, Ta)
    eligible = torch.isfinite(score)
    if n_valid is not None:
        eligible &= _patch_valid(n_valid, num_prefix, T, metric.device)[:, ::2]
    if threshold is not None:
        eligible &= score >= threshold
    drop_a = _select_top(score.masked_fill(~eligible, _NEG_INF), r, eligible)  # (B, Ta) padding never takes a slot
    remove_p = torch.zeros(B, T, dtype=torch.bool, device=metric.device)
    remove_p[:, ::2] = drop_a
    return _compact(_full_mask(remove_p, num_prefix), _seq_valid(n_valid, N, metric.device), dst=None)


def importance_merge(
    metric: torch.Tensor,
    importance: torch.Tensor,
    r: int,
    *,
    num_prefix: int,
    protect: float,
    threshold: Optional[float] = None,
    n_valid: Optional[torch.Tensor] = None,
) -> Optional[Reduction]:
    """Importance-aware merging: protect the important tokens, fuse redundant unimportant ones.

    The top ``protect`` fraction of patch tokens by ``importance`` is protected: never merged
    away. The remaining tokens are split alternately (in sequence order) into sources A and
    candidates B; every A token finds its most similar destination among B and the protected
    tokens (an ``|A| x T`` similarity: ``ceil((T - P_k) / 2) * T * C`` MACs), and the ``r`` A tokens with the highest similarity (reaching ``threshold`` when set)
    are merged into their destinations. Merging is by the caller, size-weighted (see
    :func:`merge_wavg`).

    Args:
        metric: ``(B, N, C)`` similarity features.
        importance: ``(B, N - num_prefix)`` importance of patch tokens (class-token attention).
        r: Maximum number of tokens merged away per image.
        num_prefix: Leading tokens never touched.
        protect: Fraction of patch tokens protected, in ``[0, 1)``.
        threshold: Minimum similarity to merge; None = fixed count ``r``.
        n_valid: ``(B,)`` real tokens per image when the input carries padding.

    Returns:
        A :class:`Reduction` (with ``dst`` set), or None when nothing is merged.
    """
    if r <= 0 and n_valid is None:
        return None
    B, N, C = metric.shape
    T = N - num_prefix
    device = metric.device
    pvalid = _patch_valid(n_valid, num_prefix, T, device)  # (B, T) or None
    if pvalid is None:  # same counts for every image: top-k selects the protected tokens
        k, ta, _ = merge_sizes(T, protect, 0)
        prot = torch.zeros(B, T, dtype=torch.bool, device=device)
        if k > 0:
            prot.scatter_(1, importance.topk(k, dim=1).indices, True)  # (B, T)
        real = torch.ones_like(prot)
        n_a = torch.full((B,), ta, device=device, dtype=torch.long)
    else:  # padded batch: per-image counts, ranks instead of top-k
        n_real = n_valid - num_prefix  # (B,)
        n_prot = torch.floor(n_real.double() * protect + 0.5).long()  # (B,) same formula as protected_count
        imp = importance.masked_fill(~pvalid, _NEG_INF)
        rank = imp.argsort(dim=1, descending=True).argsort(dim=1)  # (B, T) rank 0 = most important
        prot = rank < n_prot[:, None]
        real = pvalid
        n_a = (n_real - n_prot + 1) // 2
    unp = real & ~prot  # (B, T)
    order = unp.long().cumsum(1) - 1  # (B, T) position among unprotected tokens
    is_a = unp & (order % 2 == 0)  # sources: every other unprotected token
    Ta = int(n_a.max())
    if Ta == 0:
        return _compact(torch.zeros(B, N, dtype=torch.bool, device=device), _seq_valid(n_valid, N, device), dst=None)
    a_idx = is_a.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :Ta]  # (B, Ta) source positions
    a_ok = torch.arange(Ta, device=device)[None, :] < n_a[:, None]  # (B, Ta) real sources (padding: fewer)
    m = F.normalize(_as(metric[:, num_prefix:], _wide(metric.dtype)), dim=-1)  # (B, T, C) float32 or wider
    ma = m.gather(1, a_idx[..., None].expand(B, Ta, C))  # (B, Ta, C)
    sim = ma @ m.transpose(1, 2)  # (B, Ta, T)
    not_dst = is_a if pvalid is None else (is_a | ~pvalid)  # destinations: protected tokens and B
    sim = sim.masked_fill(not_dst[:, None, :], _NEG_INF)
    score, dst_a = sim.max(dim=-1)  # (B, Ta)
    eligible = a_ok & torch.isfinite(score)
    if threshold is not None:
        eligible &= score >= threshold
    chosen = _select_top(score.masked_fill(~a_ok, _NEG_INF), r, eligible)  # (B, Ta)
    remove_p = torch.zeros(B, T, dtype=torch.bool, device=device)
    remove_p.scatter_(1, a_idx, chosen)
    own = torch.arange(T, device=device).expand(B, T)
    dst_p = own.scatter(1, a_idx, torch.where(chosen, dst_a, a_idx))  # (B, T) destination of every patch token
    prefix_idx = torch.arange(num_prefix, device=device).expand(B, num_prefix)
    dst = torch.cat([prefix_idx, dst_p + num_prefix], dim=1)  # (B, N) full-sequence indices
    return _compact(_full_mask(remove_p, num_prefix), _seq_valid(n_valid, N, device), dst=dst)


def importance_prune(
    importance: torch.Tensor,
    r: int,
    *,
    num_prefix: int,
    n_valid: Optional[torch.Tensor] = None,
) -> Optional[Reduction]:
    """Importance-only pruning (EViT-style, training-free): drop the ``r`` least attended tokens.

    Args:
        importance: ``(B, T)`` importance of patch tokens (class-token attention).
        r: Tokens dropped per image (capped at T - 1).
        num_prefix: Leading tokens never touched.
        n_valid: ``(B,)`` real tokens per image when the input carries padding.
    """
    if r <= 0 and n_valid is None:
        return None
    B, T = importance.shape
    N = T + num_prefix
    device = importance.device
    pvalid = _patch_valid(n_valid, num_prefix, T, device)
    real = torch.ones(B, T, dtype=torch.bool, device=device) if pvalid is None else pvalid
    score = (-importance).masked_fill(~real, _NEG_INF)  # low importance first
    n_real = real.sum(1)
    r_eff = torch.clamp(n_real - 1, max=r)  # keep at least one patch token
    rank = score.argsort(dim=1, descending=True).argsort(dim=1)
    remove_p = (rank < r_eff[:, None]) & real
    return _compact(_full_mask(remove_p, num_prefix), _seq_valid(n_valid, N, device), dst=None)


class TomeReduction:
    """ToMe's bipartite merge as a closure; output layout exactly as in the published code."""

    def __init__(self, r: int, unm_idx: torch.Tensor, src_idx: torch.Tensor, dst_idx: torch.Tensor, pa: int, pb: int):
        self.r, self.unm_idx, self.src_idx, self.dst_idx, self.pa, self.pb = r, unm_idx, src_idx, dst_idx, pa, pb
        self.ragged = False

    def __call__(self, x: torch.Tensor, mode: str = "sum") -> torch.Tensor:
        src, dst = x[..., ::2, :], x[..., 1::2, :]  # (B, Ta, C), (B, Tb, C)
        n, t1, c = src.shape
        r = self.r
        unm = src.gather(dim=-2, index=self.unm_idx.expand(n, t1 - r, c))  # (B, Ta - r, C)
        src = src.gather(dim=-2, index=self.src_idx.expand(n, r, c))  # (B, r, C)
        dst = dst.scatter_reduce(-2, self.dst_idx.expand(n, r, c), src, reduce=mode)  # (B, Tb, C)
        if self.pb == 0:
            return torch.cat([unm, dst], dim=1)  # (B, N - r, C)
        # prefix tokens alternate between A and B: put them back first, in their original order
        prefix = []
        for i in range(self.pa):
            prefix.append(unm[:, i : i + 1])
            if i < self.pb:
                prefix.append(dst[:, i : i + 1])
        return torch.cat(prefix + [unm[:, self.pa :], dst[:, self.pb :]], dim=1)  # (B, N - r, C)

    def valid_mask(self) -> None:
        return None


def bipartite_soft_matching(metric: torch.Tensor, r: int, *, num_prefix: int) -> Optional[TomeReduction]:
    """ToMe's bipartite soft matching (Bolya et al., ICLR 2023), as published.

    Tokens are split alternately into A (even positions) and B (odd positions); each A token is
    matched to its most similar B token by cosine similarity of the metric; the ``r`` most
    similar edges are merged. ``r`` is capped at half the non-prefix tokens. Prefix tokens
    (class, distillation, registers) are protected: as sources (rows) and destinations (columns).
    With one class token this is exactly ToMe's ``class_token=True``; with class + distillation
    token exactly its ``distill_token=True``.

    Args:
        metric: ``(B, N, C)`` head-averaged keys.
        r: Tokens to merge away.
        num_prefix: Leading protected tokens.
    """
    t = metric.shape[1]
    r = min(r, (t - num_prefix) // 2)
    if r <= 0:
        return None
    pa, pb = (num_prefix + 1) // 2, num_prefix // 2  # prefix tokens in A and in B
    with torch.no_grad():
        metric = _as(metric, _wide(metric.dtype))  # similarity in float32 (or wider)
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[..., ::2, :], metric[..., 1::2, :]  # (B, Ta, C), (B, Tb, C)
        scores = a @ b.transpose(-1, -2)  # (B, Ta, Tb)
        if pa:
            scores[..., :pa, :] = _NEG_INF
        if pb:
            scores[..., :, :pb] = _NEG_INF
        node_max, node_idx = scores.max(dim=-1)  # (B, Ta)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]  # (B, Ta, 1)
        unm_idx = edge_idx[..., r:, :]  # unmerged tokens
        src_idx = edge_idx[..., :r, :]  # merged tokens
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)  # (B, r, 1)
        if num_prefix:
            unm_idx = unm_idx.sort(dim=1)[0]  # prefix tokens first
    return TomeReduction(r, unm_idx, src_idx, dst_idx, pa, pb)


ReduceFn = Callable[..., torch.Tensor]


def merge_wavg(reduce: ReduceFn, x: torch.Tensor, size: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average merge: returns merged ``x`` and the new sizes ``(B, L, 1)``.

    Reduced-precision features are averaged in float32 and returned in their own dtype; sizes
    are float32 (or the features' dtype when that is wider), so token counts stay exact.
    """
    wide = _wide(x.dtype)
    if size is None:
        size = torch.ones_like(x[..., :1], dtype=wide)  # (B, N, 1)
    out = reduce(x.to(wide) * size, mode="sum")  # (B, L, C)
    size = reduce(size, mode="sum")  # (B, L, 1)
    return (out / size.clamp_min(1e-6)).to(x.dtype), size


def peak_norm(reduce: ReduceFn, x: torch.Tensor, merged: torch.Tensor) -> torch.Tensor:
    """MLERP (ToFu, Kim et al., WACV 2024): give each merged token the largest norm among the
    tokens merged into it, keeping the direction of their average (which is shorter than its
    parts when they differ). Tokens merged with nothing are unchanged.

    Args:
        reduce: The reduction that turned ``x`` into ``merged``.
        x: ``(B, N, C)`` tokens before the merge.
        merged: ``(B, L, C)`` their (size-weighted) averages.

    Returns:
        ``(B, L, C)`` in ``merged``'s dtype (norms taken in float32 or wider; the peak of every
        token's group, the token itself included).
    """
    wide = _wide(x.dtype)
    peak = reduce(torch.linalg.vector_norm(_as(x, wide), dim=-1, keepdim=True), mode="amax")  # (B, L, 1)
    m = _as(merged, wide)  # (B, L, C)
    return _as(m * (peak / torch.linalg.vector_norm(m, dim=-1, keepdim=True).clamp_min(1e-12)), merged.dtype)  # (B, L, C)


def merge_source(reduce: ReduceFn, x: torch.Tensor, source: Optional[torch.Tensor]) -> torch.Tensor:
    """Track which input patches each token covers: ``(B, L, N0)`` 0/1 map."""
    if source is None:
        B, N, _ = x.shape
        source = torch.eye(N, device=x.device, dtype=x.dtype)[None].expand(B, N, N)
    return reduce(source, mode="amax")


# ---- the lean fixed-count path ---------------------------------------------------------------------------
#
# A fixed-count layer (threshold null) on a batch without padding removes the same number of tokens from
# every image, so every shape follows from the schedule: the functions below never synchronise with the
# host, branch only on Python ints, and build flat row indices once so that applying the reduction is one
# ``index_select`` (pruning) or ``index_select`` + ``index_add_`` + ``index_select`` (merging) per tensor.
# They select exactly the tokens the general functions above select (same scores, same top-k).


def _flat(idx: torch.Tensor, n: int, offset: int = 0) -> torch.Tensor:
    """``(B, K)`` per-image positions ``offset + idx`` among ``n`` rows -> ``(B * K,)`` rows of the flattened batch."""
    B = idx.shape[0]
    if B == 1:
        return (idx + offset if offset else idx).reshape(-1)  # (K,)
    offs = torch.arange(offset, B * n + offset, n, device=idx.device)  # (B,)
    return (idx + offs[:, None]).reshape(-1)  # (B * K,)


@dataclass
class FixedReduction:
    """A fixed-count reduction of ``(B, N, C)`` tensors to ``(B, L, C)``, as flat row indices.

    Attributes:
        batch: Images ``B``.
        num_in: Tokens per image before ``N``.
        keep: ``(B * L,)`` rows of the flattened ``(B * N, C)`` input kept, in sequence order.
        src: ``(B * R,)`` rows merged away (None: pruning).
        dst: ``(B * R,)`` the rows they are added into (never removed; None: pruning).
        metric_norm: ``(B, N, 1)`` norms of the similarity metric, float32 or wider (merges only): the
            tokens' own norms when they are compared by the residual stream, reused by MLERP.
    """

    batch: int
    num_in: int
    keep: torch.Tensor
    src: Optional[torch.Tensor] = None
    dst: Optional[torch.Tensor] = None
    metric_norm: Optional[torch.Tensor] = None
    ragged = False

    @property
    def num_out(self) -> int:
        return self.keep.shape[0] // self.batch

    def __call__(self, x: torch.Tensor, mode: str = "sum") -> torch.Tensor:
        """Apply to ``x`` ``(B, N, C)`` -> ``(B, L, C)``; ``mode`` combines merged rows (``sum`` or ``amax``)."""
        B, N, C = x.shape
        flat = x.reshape(B * N, C)  # (B * N, C)
        if self.src is not None:
            rows = flat.index_select(0, self.src)  # (B * R, C)
            if mode == "sum":
                flat = flat.index_add(0, self.dst, rows)  # (B * N, C)
            else:
                index = self.dst[:, None].expand(-1, C)  # (B * R, C)
                flat = flat.scatter_reduce(0, index, rows, reduce=mode, include_self=True)  # (B * N, C)
        return flat.index_select(0, self.keep).view(B, self.num_out, C)  # (B, L, C)

    def merge(
        self, x: torch.Tensor, size: Optional[torch.Tensor], *, peak: bool = False, norm: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Size-weighted average merge of ``x`` ``(B, N, C)`` in one pass over a fused buffer.

        Features and sizes travel together as ``(B * N, C + 1)`` rows in float32 (float64 inputs
        stay float64), so the weighted sums and the token counts are exact to that precision.

        Args:
            x: ``(B, N, C)`` tokens.
            size: ``(B, N, 1)`` their sizes, or None (all 1).
            peak: MLERP (:func:`peak_norm`): each merged token keeps its average's direction and takes
                the largest norm among its members; in reduced precision the average is rounded to
                ``x``'s dtype first, as the general path (:func:`merge_wavg`, then :func:`peak_norm`) does,
                so that both paths give the same tokens in every dtype.
            norm: ``(B, N, 1)`` norms of ``x`` in float32 (or wider) when already known (the
                reduction's ``metric_norm`` when the metric is ``x`` itself); computed when None.

        Returns:
            ``(B, L, C)`` merged features in ``x``'s dtype and ``(B, L, 1)`` sizes.
        """
        B, N, C = x.shape
        wide = _wide(x.dtype)
        ones = size is None
        buf = torch.cat([_as(x, wide), x.new_ones(B, N, 1, dtype=wide) if ones else _as(size, wide)], dim=-1)  # (B, N, C + 1)
        if not ones:
            buf[..., :C].mul_(buf[..., C:])  # size-weighted features
        flat = buf.view(B * N, C + 1)
        if self.src is not None:
            flat.index_add_(0, self.dst, flat.index_select(0, self.src))  # (B * N, C + 1)
        out = flat.index_select(0, self.keep).view(B, self.num_out, C + 1)  # (B, L, C + 1)
        size = out[..., C:]  # (B, L, 1) >= 1: no padding on this path
        merged = out[..., :C] / size  # (B, L, C) wide
        if peak:
            if wide != x.dtype:
                merged = _as(merged, x.dtype).to(wide)  # the general path's rounding (see ``peak``)
            n = (_norm(x) if norm is None else norm).view(B * N)  # (B * N,)
            if self.src is not None:
                n = n.scatter_reduce(0, self.dst, n.index_select(0, self.src), reduce="amax")  # (B * N,) peak of each group
            p = n.index_select(0, self.keep).view(B, self.num_out, 1)  # (B, L, 1)
            merged = merged * (p / torch.linalg.vector_norm(merged, dim=-1, keepdim=True).clamp_min(1e-12))  # (B, L, C)
        return _as(merged, x.dtype), size

    def valid_mask(self) -> None:
        return None


def _norm(metric: torch.Tensor) -> torch.Tensor:
    """Euclidean norm of every token's metric in float32 (or wider): ``(B, N, C)`` -> ``(B, N, 1)``."""
    return torch.linalg.vector_norm(_as(metric, _wide(metric.dtype)), dim=-1, keepdim=True)  # (B, N, 1)


def _unit(metric: torch.Tensor, norm: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Unit-norm metric of every token in float32 (or wider), as ``F.normalize``: ``(B, N, C)``
    (``norm``: its :func:`_norm` when the caller keeps it; computed when None)."""
    norm = _norm(metric) if norm is None else norm  # (B, N, 1)
    return _as(metric, norm.dtype) / norm.clamp_min(1e-12)  # (B, N, C)


def _kept_rows(batch: int, n: int, removed: torch.Tensor, *, offset: int = 0, step: int = 1) -> torch.Tensor:
    """Rows of the flattened ``(batch * n, C)`` tokens that remain when every image removes the positions
    ``offset + step * removed`` (``removed``: ``(B, R)``), in sequence order: ``(B * (n - R),)``.

    One pass: number the rows, mark the removed ones past the end, keep the ``n - R`` smallest per image.
    """
    R = removed.shape[1]
    key = torch.arange(batch * n, device=removed.device).view(batch, n)  # (B, n) flat row of every token
    (key[:, offset::step] if offset or step != 1 else key).scatter_(1, removed, batch * n)  # removed rows sort last
    return key.topk(n - R, dim=1, largest=False, sorted=True).values.view(-1)  # (B * (n - R),)


def fixed_prune(metric: torch.Tensor, r: int, *, num_prefix: int) -> Optional[FixedReduction]:
    """:func:`redundancy_prune` with a fixed count and no padding, without host synchronisation.

    Args:
        metric: ``(B, N, C)`` similarity features.
        r: Tokens dropped per image (capped at the A half ``ceil(T / 2)``).
        num_prefix: Leading tokens never touched.

    Returns:
        The reduction, or None when nothing is removed (fewer than two patch tokens, or ``r = 0``).
    """
    B, N, _ = metric.shape
    P = num_prefix
    T = N - P
    r = min(r, (T + 1) // 2)
    if T < 2 or r <= 0:
        return None
    m = _unit(metric)  # (B, N, C)
    score = torch.bmm(m[:, P::2], m[:, P + 1 :: 2].transpose(1, 2)).amax(dim=-1)  # (B, Ta) redundancy of each A token
    drop = score.topk(r, dim=1).indices  # (B, r) dropped A tokens (A token j is sequence position P + 2j)
    return FixedReduction(B, N, _kept_rows(B, N, drop, offset=P, step=2))


def fixed_merge(metric: torch.Tensor, importance: torch.Tensor, r: int, *, num_prefix: int, protect: float) -> Optional[FixedReduction]:
    """:func:`importance_merge` with a fixed count and no padding, without host synchronisation.

    Args:
        metric: ``(B, N, C)`` similarity features.
        importance: ``(B, T)`` importance of the patch tokens.
        r: Tokens merged away per image (capped at half the unprotected tokens, rounded up).
        num_prefix: Leading tokens never touched.
        protect: Fraction of patch tokens protected.

    Returns:
        The reduction, or None when nothing is merged.
    """
    B, N, C = metric.shape
    P = num_prefix
    T = N - P
    k, ta, r = merge_sizes(T, protect, r)
    if T < 2 or r <= 0:
        return None
    if k > 0:  # the T - k least important tokens, in sequence order
        unp = importance.topk(T - k, dim=1, largest=False).indices  # (B, T - k) patch positions
        unp = unp.topk(T - k, dim=1, largest=False).values  # in sequence order (a top-k of all is a sort, and faster on small rows)
    else:
        unp = torch.arange(T, device=metric.device).expand(B, T)  # (B, T)
    a = unp[:, ::2]  # (B, Ta) patch positions of the sources: every other unprotected token
    norm = _norm(metric)  # (B, N, 1) kept for MLERP (FixedReduction.metric_norm)
    u = _unit(metric, norm)  # (B, N, C)
    ma = u.view(B * N, C).index_select(0, _flat(a, N, P)).view(B, ta, C)  # (B, Ta, C) (a flat index_select: a gather is 8x slower at batch 32)
    sim = torch.bmm(ma, u[:, P:].transpose(1, 2))  # (B, Ta, T): sources x patch tokens (the only destinations)
    sim.scatter_(2, a[:, None, :].expand(B, ta, ta), _NEG_INF)  # sources are no destinations
    score, dst_a = sim.max(dim=2)  # (B, Ta) best destination of each source, as a patch position
    chosen = score.topk(r, dim=1).indices  # (B, r) into the sources
    src = a.gather(1, chosen)  # (B, r) patch positions
    dst = dst_a.gather(1, chosen)  # (B, r) patch positions
    return FixedReduction(B, N, _kept_rows(B, N, src, offset=P), _flat(src, N, P), _flat(dst, N, P), metric_norm=norm)


def fixed_evit(importance: torch.Tensor, r: int, *, num_prefix: int) -> Optional[FixedReduction]:
    """:func:`importance_prune` with no padding, without host synchronisation: drop the ``r``
    least important patch tokens (keeping at least one)."""
    B, T = importance.shape
    r = min(r, T - 1)
    if r <= 0:
        return None
    drop = importance.topk(r, dim=1, largest=False).indices  # (B, r) patch positions
    return FixedReduction(B, T + num_prefix, _kept_rows(B, T + num_prefix, drop, offset=num_prefix))


def follow_positions(reduce: ReduceFn, pos: torch.Tensor) -> torch.Tensor:
    """Input position of every output token of a reduction: ``(B, N)`` -> ``(B, L)`` long.

    A kept token keeps its own position; a merge destination keeps its own (the tokens merged into
    it do not move it). Padding slots carry the position of some removed token (their size is 0).
    """
    if isinstance(reduce, FixedReduction):  # the lean path: kept rows, destinations included, in order
        B, N = pos.shape
        return pos.reshape(B * N).index_select(0, reduce.keep).view(B, reduce.num_out)  # (B, L)
    if isinstance(reduce, Reduction):
        return pos.gather(1, reduce.keep_idx)  # (B, L)
    if isinstance(reduce, TomeReduction):
        B, N = pos.shape
        removed = torch.zeros(B, (N + 1) // 2, dtype=torch.bool, device=pos.device)  # (B, Ta) A tokens merged away
        removed.scatter_(1, reduce.src_idx[..., 0].expand(B, -1), True)
        key = pos.clone()
        key[:, ::2] += N * (~removed).long()  # survivors outrank the sources merged into them
        key[:, 1::2] += N
        return reduce(key[..., None], mode="amax")[..., 0] - N  # (B, L)
    raise TypeError(f"cannot follow positions through {type(reduce).__name__}")
