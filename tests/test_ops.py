"""Pure tensor ops (rapid_search.runtime.ops) against reference implementations and their invariants."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rapid_search.runtime.ops import (
    bipartite_soft_matching,
    importance_merge,
    importance_prune,
    merge_source,
    merge_wavg,
    peak_norm,
    protected_count,
    redundancy_prune,
)

NEG = float("-inf")


def _rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _sizes(B, N, seed=0):
    g = torch.Generator().manual_seed(seed + 1000)
    return torch.randint(1, 5, (B, N, 1), generator=g).to(torch.float64)


# ---- ToMe reference, written from the paper's description -------------------------------------------


def ref_tome(x, size, metric, r, *, class_token, distill_token):
    """ToMe (Bolya et al. 2023) bipartite soft matching + size-weighted merge, one image at a time.

    Tokens alternate into A (even) and B (odd); each A token's edge goes to its most cosine-similar
    B token; the class token never merges (its row is -inf), the distillation token never receives
    (its column is -inf); the r best edges merge (size-weighted mean); r <= (t - protected) // 2.
    Output: unmerged A tokens (in original order when there is a class token, else in descending
    edge order) then all B tokens; with a distillation token [unm0, dst0, unm[1:], dst[1:]].
    """
    B, t, C = x.shape
    protected = int(class_token) + int(distill_token)
    r = min(r, (t - protected) // 2)
    outs, out_sizes = [], []
    for i in range(B):
        m = metric[i] / metric[i].norm(dim=-1, keepdim=True)
        A, Bi = list(range(0, t, 2)), list(range(1, t, 2))
        edges = []  # (score, a position in A, b position in B)
        for ai, a in enumerate(A):
            best, best_j = NEG, 0
            for bj, b in enumerate(Bi):
                s = float(m[a] @ m[b])
                if (class_token and ai == 0) or (distill_token and bj == 0):
                    s = NEG
                if s > best:
                    best, best_j = s, bj
            edges.append((best, ai, best_j))
        order = sorted(edges, key=lambda e: -e[0])
        merged, unmerged = order[:r], order[r:]
        if class_token:
            unmerged = sorted(unmerged, key=lambda e: e[1])
        num = [x[i, b] * size[i, b] for b in Bi]
        den = [size[i, b].clone() for b in Bi]
        for _, ai, bj in merged:
            num[bj] = num[bj] + x[i, A[ai]] * size[i, A[ai]]
            den[bj] = den[bj] + size[i, A[ai]]
        unm_x = [x[i, A[ai]] for _, ai, _ in unmerged]
        unm_s = [size[i, A[ai]] for _, ai, _ in unmerged]
        dst_x = [n / d for n, d in zip(num, den)]
        if distill_token:
            xs = [unm_x[0], dst_x[0]] + unm_x[1:] + dst_x[1:]
            ss = [unm_s[0], den[0]] + unm_s[1:] + den[1:]
        else:
            xs, ss = unm_x + dst_x, unm_s + den
        outs.append(torch.stack(xs))
        out_sizes.append(torch.stack(ss))
    return torch.stack(outs), torch.stack(out_sizes)


@pytest.mark.parametrize("t", [17, 18])
@pytest.mark.parametrize("r", [1, 4, 8, 100])
@pytest.mark.parametrize("prefix", [0, 1, 2])
def test_bipartite_soft_matching_equals_reference(t, r, prefix):
    B, C = 3, 6
    metric, x, size = _rand(B, t, C, seed=t * 7 + r), _rand(B, t, 5, seed=r), _sizes(B, t, seed=t)
    red = bipartite_soft_matching(metric, r, num_prefix=prefix)
    assert red is not None
    got_x, got_s = merge_wavg(red, x, size)
    want_x, want_s = ref_tome(x, size, metric, r, class_token=prefix >= 1, distill_token=prefix == 2)
    assert got_x.shape == want_x.shape == (B, t - min(r, (t - prefix) // 2), 5)
    torch.testing.assert_close(got_s, want_s, rtol=0, atol=0)
    torch.testing.assert_close(got_x, want_x, rtol=1e-12, atol=1e-12)


def test_bipartite_soft_matching_metric_untouched_and_identity():
    metric = _rand(2, 11, 4)
    before = metric.clone()
    bipartite_soft_matching(metric, 3, num_prefix=1)
    assert torch.equal(metric, before)
    assert bipartite_soft_matching(metric, 0, num_prefix=1) is None
    assert bipartite_soft_matching(metric[:, :2], 5, num_prefix=1) is None  # (2 - 1) // 2 == 0


@pytest.mark.parametrize("prefix", [3, 5])
def test_bipartite_soft_matching_register_prefix_kept_in_order(prefix):
    t, B = 21, 2
    metric, x = _rand(B, t, 6, seed=prefix), _rand(B, t, 4, seed=9)
    red = bipartite_soft_matching(metric, 100, num_prefix=prefix)
    out, size = merge_wavg(red, x, None)
    assert out.shape[1] == t - (t - prefix) // 2
    torch.testing.assert_close(out[:, :prefix], x[:, :prefix], rtol=0, atol=0)
    assert torch.equal(size[:, :prefix], torch.ones(B, prefix, 1, dtype=x.dtype))
    src = merge_source(red, x, None)
    assert torch.equal(src[:, :prefix], torch.eye(t, dtype=x.dtype)[:prefix].expand(B, -1, -1))


# ---- merge_wavg ---------------------------------------------------------------------------------------


def _merge_reductions(B, N, C, P, seed):
    metric = _rand(B, N, C, seed=seed)
    imp = _rand(B, N - P, seed=seed + 1).softmax(-1)
    yield "tome", bipartite_soft_matching(metric, 7, num_prefix=P)
    yield "merge", importance_merge(metric, imp, 7, num_prefix=P, protect=0.25)
    yield "merge_thr", importance_merge(metric, imp, 7, num_prefix=P, protect=0.25, threshold=0.0)
    nv = torch.tensor([N, N - 3, N - 6][:B])
    yield "merge_padded", importance_merge(metric, imp, 7, num_prefix=P, protect=0.5, n_valid=nv)


@pytest.mark.parametrize("P", [0, 1, 2])
def test_merge_wavg_preserves_weighted_mean_and_total_size(P):
    B, N, C = 3, 24, 5
    x, size = _rand(B, N, C, seed=3), _sizes(B, N, seed=3)
    for name, red in _merge_reductions(B, N, 6, P, seed=P):
        assert red is not None, name
        if red.ragged:  # padding has size 0 (as in the runtime); only the real output rows count
            size = size * (torch.arange(N)[None, :, None] < torch.tensor([N, N - 3, N - 6])[:, None, None])
        out, new = merge_wavg(red, x, size)
        if red.ragged:
            new = new * red.valid_mask()[..., None]
        torch.testing.assert_close(new.sum(1), size.sum(1), rtol=0, atol=0, msg=name)
        torch.testing.assert_close((out * new).sum(1), (x * size).sum(1), rtol=1e-12, atol=1e-12, msg=name)
        if red.ragged:
            continue
        # size=None means every token has size 1
        out1, new1 = merge_wavg(red, x, None)
        assert torch.equal(new1.sum(1), torch.full((B, 1), float(N), dtype=x.dtype))
        torch.testing.assert_close((out1 * new1).sum(1), x.sum(1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("P", [0, 1, 2])
def test_peak_norm_gives_merged_tokens_the_largest_norm_in_the_direction_of_their_average(P):
    """MLERP: each output token points where the size-weighted average points, with the largest
    norm among the input tokens merged into it; a token merged with nothing is unchanged."""
    B, N, C = 3, 24, 5
    x, size = _rand(B, N, C, seed=7), _sizes(B, N, seed=7)
    for name, red in _merge_reductions(B, N, 6, P, seed=P):
        avg, new = merge_wavg(red, x, size)
        out = peak_norm(red, x, avg)
        assert out.shape == avg.shape and out.dtype == x.dtype, name
        covers = merge_source(red, x, None)  # (B, L, N) 0/1: which input tokens each output token is
        norms = x.norm(dim=-1)  # (B, N)
        for b in range(B):
            rows = range(int(red.n_keep[b])) if red.ragged else range(out.shape[1])  # padding rows are masked later
            for j in rows:
                members = covers[b, j].bool()
                assert members.any(), name
                peak = norms[b][members].max()
                torch.testing.assert_close(out[b, j].norm(), peak, rtol=1e-12, atol=1e-12, msg=name)
                cos = F.cosine_similarity(out[b, j], avg[b, j], dim=0)
                torch.testing.assert_close(cos, torch.ones((), dtype=x.dtype), rtol=1e-12, atol=1e-12, msg=name)
                if int(members.sum()) == 1:
                    torch.testing.assert_close(out[b, j], x[b][members][0], rtol=1e-12, atol=1e-12, msg=name)


def test_peak_norm_is_computed_wide_and_returned_in_the_features_dtype():
    B, N, C, P = 2, 16, 8, 1
    x = _rand(B, N, C, seed=9).float() * 30
    red = importance_merge(_rand(B, N, C, seed=10).float(), _rand(B, N - P, seed=11).abs().float(), 5, num_prefix=P, protect=0.25)
    ref = peak_norm(red, x, merge_wavg(red, x, None)[0])
    low = x.bfloat16()
    out = peak_norm(red, low, merge_wavg(red, low, None)[0])
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float().norm(dim=-1), ref.norm(dim=-1), rtol=1e-2, atol=0)


# ---- redundancy_prune ---------------------------------------------------------------------------------


def _redundancy(metric, P):
    """Each A token's highest cosine similarity to a B token (patch tokens only)."""
    m = F.normalize(metric[:, P:], dim=-1)
    return (m[:, ::2] @ m[:, 1::2].transpose(1, 2)).amax(-1)  # (B, Ta)


def _removed(red, B, N):
    """(B, N) bool mask of removed tokens (pruning reductions)."""
    kept = torch.zeros(B, N, dtype=torch.bool)
    for i in range(B):
        kept[i, red.keep_idx[i, : int(red.n_keep[i])]] = True
    return ~kept


@pytest.mark.parametrize("P", [0, 1, 2, 5])
@pytest.mark.parametrize("r", [1, 5, 12, 50])
def test_redundancy_prune_keeps_b_and_removes_top_r(P, r):
    B, T, C = 3, 23, 8
    N = T + P
    metric = _rand(B, N, C, seed=r + P)
    red = redundancy_prune(metric, r, num_prefix=P)
    removed = _removed(red, B, N)
    Ta = (T + 1) // 2
    assert not removed[:, :P].any()  # prefix untouched
    assert not removed[:, P + 1 :: 2].any()  # every B token kept
    assert (removed.sum(1) == min(r, Ta)).all()
    score = _redundancy(metric, P)
    for i in range(B):
        gone = removed[i, P::2]
        if gone.any() and (~gone).any():
            assert score[i][gone].min() >= score[i][~gone].max()  # the most redundant went
    # kept tokens are in their original order
    x = _rand(B, N, 4, seed=1)
    out = red(x)
    for i in range(B):
        assert torch.equal(out[i], x[i][~removed[i]])


def test_redundancy_prune_never_removes_both_of_a_pair():
    """Exact duplicates: the A copy may go, its B twin always stays."""
    B, P, T, C = 2, 1, 16, 8
    metric = _rand(B, P + T, C, seed=5)
    metric[:, P + 4] = metric[:, P + 5] * 2.0  # A token 4 duplicates B token 5
    metric[:, P + 8] = metric[:, P + 3]  # A token 8 duplicates B token 3
    red = redundancy_prune(metric, 2, num_prefix=P)
    removed = _removed(red, B, P + T)
    assert removed[:, P + 4].all() and removed[:, P + 8].all()
    assert not removed[:, P + 5].any() and not removed[:, P + 3].any()
    # every dropped token's most similar partner survives
    m = F.normalize(metric[:, P:], dim=-1)
    sim = m @ m.transpose(1, 2)
    sim.diagonal(dim1=1, dim2=2).fill_(NEG)
    for i in range(B):
        for j in removed[i, P:].nonzero().flatten().tolist():
            partner = int(sim[i, j, 1::2].argmax()) * 2 + 1
            assert not removed[i, P + partner]


@pytest.mark.parametrize("thr", [-1.0, 0.0, 0.3, 0.6, 1.0])
def test_redundancy_prune_threshold(thr):
    B, P, T, C = 4, 1, 30, 4
    metric = _rand(B, P + T, C, seed=11)
    score = _redundancy(metric, P)
    for r in (3, 15):
        red = redundancy_prune(metric, r, num_prefix=P, threshold=thr)
        want = torch.clamp((score >= thr).sum(1), max=r)
        if red is None:
            assert not want.any()
            continue
        removed = _removed(red, B, P + T)[:, P::2]
        assert torch.equal(removed.sum(1), want)
        assert (score[removed] >= thr).all()
        assert red.ragged == bool((want != want[0]).any())


def test_redundancy_prune_edge_cases():
    metric = _rand(2, 6, 4)
    assert redundancy_prune(metric, 0, num_prefix=1) is None
    assert redundancy_prune(metric[:, :2], 3, num_prefix=1) is None  # one patch token: no B partner
    red = redundancy_prune(metric, 100, num_prefix=1)  # capped at ceil(5 / 2)
    assert red.keep_idx.shape[1] == 6 - 3


# ---- importance_merge -----------------------------------------------------------------------------------


def _check_merge(metric, imp, r, P, protect, threshold=None):
    B, N, _ = metric.shape
    T = N - P
    red = importance_merge(metric, imp, r, num_prefix=P, protect=protect, threshold=threshold)
    k = protected_count(T, protect)
    prot = torch.zeros(B, T, dtype=torch.bool)
    prot.scatter_(1, imp.topk(k, dim=1).indices, True) if k else None
    unp = (~prot).long()
    is_a = (~prot) & ((unp.cumsum(1) - 1) % 2 == 0)
    m = F.normalize(metric[:, P:], dim=-1)
    sim = (m @ m.transpose(1, 2)).masked_fill(is_a[:, None, :], NEG)  # destinations: protected and B
    best, best_dst = sim.max(-1)  # (B, T)
    n_a = (T - k + 1) // 2
    removed_all = []
    for i in range(B):
        cand = is_a[i] & (best[i] > NEG)
        if threshold is not None:
            cand &= best[i] >= threshold
        want_n = min(r, int(cand.sum()))
        removed = red.remove[i, P:] if red is not None else torch.zeros(T, dtype=torch.bool)
        assert int(removed.sum()) == want_n
        assert not (removed & prot[i]).any()  # protected tokens never merged away
        assert not (removed & ~is_a[i]).any()  # only sources (every other unprotected) merge away
        if red is not None:
            assert not red.remove[i, :P].any()
            assert torch.equal(red.dst[i, :P], torch.arange(P))  # prefix tokens untouched
            dst = red.dst[i, P:] - P
            assert (dst[removed] == best_dst[i][removed]).all()  # into the most similar destination
            assert not removed[dst[removed]].any()  # destinations survive
            assert (red.dst[i, P:][removed] >= P).all()  # never into a prefix token
        if removed.any() and (cand & ~removed).any():
            assert best[i][removed].min() >= best[i][cand & ~removed].max()  # the r most similar
        removed_all.append(removed)
    assert n_a == int(is_a[0].sum())
    return red


@pytest.mark.parametrize("P", [0, 1, 2, 5])
@pytest.mark.parametrize("protect", [0.0, 0.25, 0.5, 0.9])
@pytest.mark.parametrize("r", [1, 6, 40])
def test_importance_merge_invariants(P, protect, r):
    B, T, C = 3, 20, 6
    metric = _rand(B, P + T, C, seed=int(protect * 100) + r)
    imp = _rand(B, T, seed=r).softmax(-1)
    _check_merge(metric, imp, r, P, protect)


@pytest.mark.parametrize("thr", [-0.5, 0.0, 0.4, 0.95])
def test_importance_merge_threshold(thr):
    B, P, T, C = 4, 1, 26, 3
    metric = _rand(B, P + T, C, seed=2)
    imp = _rand(B, T, seed=3).softmax(-1)
    for r in (2, 13):
        _check_merge(metric, imp, r, P, 0.25, threshold=thr)


def test_importance_merge_prefix_values_untouched():
    B, P, T = 2, 2, 18
    metric, x, size = _rand(B, P + T, 5, seed=4), _rand(B, P + T, 7, seed=5), _sizes(B, P + T)
    imp = _rand(B, T, seed=6).softmax(-1)
    red = importance_merge(metric, imp, 5, num_prefix=P, protect=0.25)
    out, new = merge_wavg(red, x, size)
    torch.testing.assert_close(out[:, :P], x[:, :P], rtol=1e-15, atol=0)  # x * s / s
    assert torch.equal(new[:, :P], size[:, :P])
    assert out.shape[1] == P + T - 5


def test_importance_merge_protects_most_important():
    B, P, T = 1, 1, 12
    metric = torch.ones(B, P + T, 4, dtype=torch.float64)  # every token identical: all pairs are duplicates
    imp = torch.arange(T, dtype=torch.float64)[None]  # the last tokens are the most important
    red = importance_merge(metric, imp, 100, num_prefix=P, protect=0.5)
    removed = red.remove[0, P:]
    assert not removed[6:].any() and int(removed.sum()) == 3  # 6 unprotected -> 3 sources


# ---- importance_prune ---------------------------------------------------------------------------------


@pytest.mark.parametrize("r", [0, 3, 11, 50])
def test_importance_prune_drops_least_important(r):
    B, P, T = 3, 1, 12
    imp = _rand(B, T, seed=r).softmax(-1)
    red = importance_prune(imp, r, num_prefix=P)
    if r == 0:
        assert red is None
        return
    removed = _removed(red, B, P + T)
    assert not removed[:, :P].any()
    assert (removed.sum(1) == min(r, T - 1)).all()  # at least one patch token kept
    for i in range(B):
        gone = removed[i, P:]
        assert imp[i][gone].max() <= imp[i][~gone].min()


# ---- padding (n_valid): a padded batch gives each image's single-image result --------------------------


def _padded(counts, N, C, P, seed, adversarial=False):
    """A batch whose image i has counts[i] real tokens, then padding (garbage) at the tail."""
    g = torch.Generator().manual_seed(seed)
    metric = torch.randn(len(counts), N, C, generator=g, dtype=torch.float64)
    imp = torch.rand(len(counts), N - P, generator=g, dtype=torch.float64)
    x = torch.randn(len(counts), N, 5, generator=g, dtype=torch.float64)
    size = torch.ones(len(counts), N, 1, dtype=torch.float64)
    for i, n in enumerate(counts):
        size[i, n:] = 0
        if adversarial:  # padding tokens that look like exact duplicates of real tokens
            for j in range(n, N):
                metric[i, j] = metric[i, P + (j - n) % (n - P)]
                imp[i, j - P] = imp[i, (j - n) % (n - P)]
    return metric, imp, x, size, torch.tensor(counts)


def _check_padding(op, counts, N=23, C=6, P=1, adversarial=False, seed=0):
    metric, imp, x, size, nv = _padded(counts, N, C, P, seed, adversarial)
    red = op(metric, imp, nv)
    out, new = merge_wavg(red, x, size)
    for i, n in enumerate(counts):
        single = op(metric[i : i + 1, :n], imp[i : i + 1, : n - P], None)
        if single is None:
            ref, ref_size = x[i : i + 1, :n], size[i : i + 1, :n]
        else:
            ref, ref_size = merge_wavg(single, x[i : i + 1, :n], size[i : i + 1, :n])
        L = ref.shape[1]
        assert int(red.n_keep[i]) == L, f"image {i}: {int(red.n_keep[i])} tokens kept in the batch, {L} alone"
        torch.testing.assert_close(out[i, :L], ref[0], rtol=1e-12, atol=1e-12)
        assert torch.equal(new[i, :L], ref_size[0])


COUNTS = [[23, 15, 9], [12, 23, 20], [23, 23, 18], [3, 23, 2]]

PADDED_OPS = {
    "merge": lambda m, i, nv: importance_merge(m, i, 4, num_prefix=1, protect=0.25, n_valid=nv),
    "merge_p0": lambda m, i, nv: importance_merge(m, i, 50, num_prefix=1, protect=0.0, n_valid=nv),
    "merge_thr": lambda m, i, nv: importance_merge(m, i, 6, num_prefix=1, protect=0.5, threshold=0.1, n_valid=nv),
    "evit": lambda m, i, nv: importance_prune(i, 5, num_prefix=1, n_valid=nv),
    "prune_all": lambda m, i, nv: redundancy_prune(m, 50, num_prefix=1, n_valid=nv),
    "prune_thr_all": lambda m, i, nv: redundancy_prune(m, 50, num_prefix=1, threshold=0.2, n_valid=nv),
}


@pytest.mark.parametrize("name", sorted(PADDED_OPS))
@pytest.mark.parametrize("counts", COUNTS)
@pytest.mark.parametrize("adversarial", [False, True])
def test_padded_batch_equals_single_images(name, counts, adversarial):
    _check_padding(PADDED_OPS[name], counts, adversarial=adversarial)


@pytest.mark.parametrize("adversarial", [False, True])
def test_padded_prune_fixed_r_equals_single_images(adversarial):
    op = lambda m, i, nv: redundancy_prune(m, 3, num_prefix=1, n_valid=nv)  # noqa: E731
    for counts in COUNTS:
        _check_padding(op, counts, adversarial=adversarial)


def test_protected_count_formula():
    for T in range(0, 60):
        for p in (0.0, 0.1, 0.25, 1 / 3, 0.5, 0.75, 0.99):
            assert protected_count(T, p) == math.floor(T * p + 0.5)
