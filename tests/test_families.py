"""The runtime on every newly supported timm ViT family, on tiny random configurations.

Only DeiT-Tiny and ViT-Tiny pretrained weights exist here, so these parity tests carry the
correctness claim for the other families: an empty schedule is the unpatched model, the composed
(reducing) block equals timm's block when nothing is reduced, positions follow tokens (checked
against timm's own patch-dropout RoPE path and plain indexing of the bias tables), prefix tokens
survive, sizes add up, batched equals per-image, the analytic MACs equal FlopCounterMode, and
``remove`` restores the model exactly.
"""

from __future__ import annotations

import pytest
import timm
import torch
from helpers import images, module_state, read_importance_macs
from test_runtime import _batch_vs_single, _forward, fixed_schedule, threshold_schedule
from timm.models.beit import Beit
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from torch.utils.flop_counter import FlopCounterMode

import rapid_search as rs
from rapid_search import LayerSpec as L
from rapid_search.runtime.families import family_name

_T = dict(img_size=64, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=10)


def _timm(name: str, **kw):
    return lambda: timm.create_model(name, pretrained=False, **{**_T, **kw})


#: label -> (factory, family, ratio reachable by RAPID and ToMe on the tiny configuration)
CASES = {
    "siglip_map": (_timm("vit_base_patch16_siglip_224"), "vit", 0.5),  # attention pooling, no class token
    "vit_map_cls": (lambda: VisionTransformer(**_T, global_pool="map"), "vit", 0.5),  # class token + map
    "parallel_18x2": (_timm("vit_small_patch16_18x2_224"), "vit-blocks", 0.5),  # ParallelThingsBlock
    "respost": (_timm("vit_base_patch16_rpn_224"), "vit-blocks", 0.5),  # ResPostBlock
    "hybrid_r_s16": (_timm("vit_tiny_r_s16_p8_224", patch_size=1), "vit", 0.995),  # HybridEmbed (ResNet stem)
    "vitamin": (lambda: timm.create_model("vitamin_small_224", img_size=64, depth=4, num_classes=10), "vit", 0.97),  # HybridEmbed, no proj
    "eva02": (_timm("eva02_tiny_patch14_224"), "eva", 0.5),  # RoPE (cat), SwiGLU
    "rope_axial": (_timm("vit_small_patch16_rope_224"), "eva", 0.5),
    "rope_mixed": (_timm("vit_small_patch16_rope_mixed_224"), "eva", 0.5),  # per-depth, per-head RoPE
    "dinov3": (_timm("vit_base_patch16_dinov3"), "eva", 0.5),  # registers, LayerScale, DINOv3 RoPE
    "pe_map": (_timm("vit_pe_core_tiny_patch16_384"), "eva", 0.5),  # Eva + attention pooling
    "eva_gqa": (
        lambda: Eva(**_T, use_rot_pos_emb=True, attn_type="rope", qkv_fused=False, num_kv_heads=1, init_values=0.1),
        "eva",
        0.5,
    ),
    "eva_postnorm": (lambda: Eva(**_T, use_rot_pos_emb=True, use_post_norm=True), "eva", 0.5),
    "beit": (_timm("beit_base_patch16_224"), "beit", 0.5),  # per-block relative position bias, LayerScale
    "beit_shared": (lambda: Beit(**_T, use_shared_rel_pos_bias=True, init_values=0.1, global_pool="token"), "beit", 0.5),
    "relpos_avg": (_timm("vit_relpos_small_patch16_224"), "relpos", 0.6),  # RelPosMlp per block, avg pool
    "relpos_cls": (_timm("vit_relpos_medium_patch16_cls_224"), "relpos", 0.6),
    "srelpos": (_timm("vit_srelpos_small_patch16_224"), "relpos", 0.5),  # shared RelPosBias
    "relpos_rpn": (_timm("vit_relpos_medium_patch16_rpn_224"), "relpos", 0.6),  # ResPostRelPosBlock
}


def _make(label: str, dtype=torch.float32):
    torch.manual_seed(0)
    m = CASES[label][0]().eval().to(dtype)
    for p in m.parameters():  # random init leaves LayerScale / rel-pos tables tiny or zero: make them matter
        p = p.detach()
        if p.ndim == 1 and p.numel() > 1 and bool((p == p[0]).all()) and float(p.abs().max()) < 0.2:
            with torch.no_grad():
                p.add_(torch.rand_like(p) * 0.5)
    for name, p in m.named_parameters():
        if "relative_position_bias_table" in name:
            with torch.no_grad():
                p.normal_(0, 1.0)
    return m


@pytest.fixture(scope="module")
def models():
    return {k: (_make(k), _make(k, torch.float64)) for k in CASES}


@pytest.fixture(autouse=True)
def _unpatch(models):
    yield
    for pair in models.values():
        for m in pair:
            rs.remove(m)


def _set_fused(model, fused: bool) -> None:
    for mod in model.modules():
        if hasattr(mod, "fused_attn"):
            mod.fused_attn = fused


def _assert_restored(model, state, params):
    assert not rs.is_patched(model)
    assert module_state(model) == state
    for blk in model.blocks:
        assert "forward" not in blk.__dict__
    for k, v in model.state_dict().items():
        assert torch.equal(v, params[k]), k


@pytest.mark.parametrize("label", sorted(CASES))
def test_family_detected(models, label):
    assert family_name(models[label][0]) == CASES[label][1]
    rs.check_model(models[label][0])


@pytest.mark.parametrize("label", sorted(CASES))
def test_empty_schedule_and_remove(models, label):
    model = models[label][0]
    x = images(model, 2)
    state, params = module_state(model), {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(x)
        with rs.applied(model, None):
            assert torch.equal(model(x), ref)  # timm's own forward in every block
            assert rs.last_sizes(model) is None
        _assert_restored(model, state, params)
        rs.apply(model, rs.rapid_schedule(model, CASES[label][2]), trace_source=True)
        red = model(x)
        assert torch.isfinite(red).all() and not torch.equal(red, ref)
        rs.remove(model)
        _assert_restored(model, state, params)
        assert torch.equal(model(x), ref)


@pytest.mark.parametrize("label", sorted(CASES))
def test_composed_blocks_equal_timm(models, label):
    """Every block on the composed path (merge layers whose threshold nothing reaches) == unpatched (float64)."""
    model = models[label][1]
    x = images(model, 2, dtype=torch.float64)
    depth = len(model.blocks)
    with torch.no_grad():
        ref = model(x)
        for fused in (True, False):
            _set_fused(model, fused)
            try:
                with rs.applied(model, [L("merge", 4, 1.0, 0.25)] * depth):
                    out = model(x)
                    assert rs.last_token_counts(model)[:, -1].tolist() == [rs.model_info(model).num_tokens] * 2
            finally:
                _set_fused(model, True)
            torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("label", sorted(CASES))
@pytest.mark.parametrize("kind", ["prune", "merge", "tome", "all_ops"])  # evit: in all_ops; RAPID: below
def test_fixed_schedules(models, label, kind):
    """Counts = cost model, prefix tokens survive, sizes add up, batched == per-image (float64)."""
    model = models[label][1]
    info = rs.ModelInfo.from_model(model)
    P, N0 = info.num_prefix_tokens, info.num_tokens
    s = fixed_schedule(model, kind)
    x = images(model, 3, dtype=torch.float64)
    counts, sizes, source = _batch_vs_single(model, x, s)
    assert counts.tolist() == [rs.token_counts(info, s)] * 3
    eye = torch.eye(N0, dtype=source.dtype)
    assert torch.equal(source[:, :P], eye[:P].expand(3, -1, -1))
    assert (source.sum(1) <= 1).all()
    if sizes is not None:
        assert torch.equal(sizes[:, :P], torch.ones(3, P, 1, dtype=sizes.dtype))
        assert torch.equal(sizes[..., 0], source.sum(-1))
    if kind in ("merge", "tome"):
        assert torch.equal(sizes.sum(1), torch.full((3, 1), float(N0), dtype=sizes.dtype))


def _spread_schedule(model, x):
    """The threshold schedule (kinds x a threshold grid) that spreads the batch's final counts most."""
    best = None
    for kind in ("mixed_thr", "merge_thr", "prune_thr"):
        for thr in (0.99, 0.97, 0.94, 0.9, 0.8, 0.7, 0.5, 0.3):
            s = threshold_schedule(model, kind, thr)
            _, counts, _, _ = _forward(model, x, s)
            spread = len(set(map(tuple, counts.tolist())))
            if best is None or spread > best[0]:
                best = (spread, s)
            if spread == len(x):
                return s
    return best[1]


@pytest.mark.parametrize("label", sorted(CASES))
def test_threshold_schedule_batched_equals_single(models, label):
    model = models[label][1]
    info = rs.ModelInfo.from_model(model)
    x = images(model, 4, dtype=torch.float64)
    s = _spread_schedule(model, x)
    counts, sizes, source = _batch_vs_single(model, x, s)
    assert len(set(map(tuple, counts.tolist()))) > 1, "counts must differ across the batch for this test to mean anything"
    assert (counts >= torch.tensor(rs.token_counts(info, s))).all()
    for i in range(4):
        n = int(counts[i, -1])
        assert torch.equal(source[i, : info.num_prefix_tokens], torch.eye(info.num_tokens, dtype=source.dtype)[: info.num_prefix_tokens])
        if sizes is not None:
            assert torch.equal(sizes[i, :n, 0], source[i, :n].sum(-1))
            assert not sizes[i, n:].any()


def _flops(model, x, schedule):
    with rs.applied(model, schedule), torch.no_grad():
        fc = FlopCounterMode(display=False)
        with fc:
            model(x)
        return fc.get_total_flops(), rs.last_token_counts(model)


@pytest.mark.parametrize("label", sorted(CASES))
def test_analytic_macs_equal_flop_counter(models, label):
    """Attention unfused (FlopCounterMode does not see the fused CPU SDPA kernel), so the importance rows are read from
    its probabilities, not counted; batch 1 (bias MLPs run once per forward)."""
    model = models[label][0]
    info = rs.ModelInfo.from_model(model)
    x = images(model, 1)
    D, T = info.depth, info.num_tokens - info.num_prefix_tokens
    r = T // 8
    ratio = CASES[label][2]
    cycle = [L("prune", r), L("tome", r), L("merge", r, None, 0.5), L("evit", r), L()]
    rapid_thr = rs.rapid_schedule(model, ratio, prune_threshold=0.3, merge_threshold=0.2)
    _set_fused(model, False)
    grads = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)  # FlopCounterMode's module tracker fails on AttentionPoolLatent's expanded latent otherwise
    try:
        for s in (rs.empty_schedule(model), rs.rapid_schedule(model, ratio), rs.tome_for_ratio(model, ratio), rs.as_schedule([cycle[i % 5] for i in range(D)], model)):
            total, counts = _flops(model, x, s)
            assert total == 2 * (rs.schedule_macs(info, s) - read_importance_macs(model, info, s)), (label, s.layers)
            assert counts[0].tolist() == rs.token_counts(info, s)
        total, counts = _flops(model, x, rapid_thr)
        assert total == 2 * (int(rs.macs_from_counts(info, rapid_thr, counts)[0]) - read_importance_macs(model, info, rapid_thr, counts[0]))
    finally:
        _set_fused(model, True)
        for p, g in zip(model.parameters(), grads):
            p.requires_grad_(g)


# ---- positions follow tokens: against timm's own code paths --------------------------------------------------------------


def _kept(model, x, schedule):
    """Final kept input indices (B, L) of a pruning-only schedule, and the patched output."""
    with rs.applied(model, schedule, trace_source=True), torch.no_grad():
        y = model(x)
        src = rs.last_source(model)  # (B, L, N0) one-hot rows: pruning never merges
    assert torch.equal(src.sum(-1), torch.ones_like(src[..., 0]))
    return src.argmax(-1), y


@pytest.mark.parametrize("label", ["eva02", "rope_axial", "rope_mixed", "dinov3", "eva_gqa"])
@pytest.mark.parametrize("op", ["prune", "evit"])
def test_rope_follows_pruned_tokens(models, label, op):
    """Block 0 drops tokens; later blocks == timm's Eva on the kept tokens with RoPE gathered by timm's patch-dropout code."""
    from timm.layers.pos_embed_sincos import apply_keep_indices_nlc

    model = models[label][1]
    info = rs.ModelInfo.from_model(model)
    P, T = info.num_prefix_tokens, info.num_tokens - info.num_prefix_tokens
    s = rs.as_schedule([L(op, T // 3)] + [L()] * (info.depth - 1), model)
    x = images(model, 2, dtype=torch.float64)
    idx, y = _kept(model, x, s)
    with torch.no_grad():
        h, rope = model._pos_embed(model.patch_embed(x))
        h = model.norm_pre(h)
        b0 = model.blocks[0]
        rope0 = rope[0] if model.rope_mixed else rope
        a = b0.attn(b0.norm1(h), rope=rope0)
        h = h + (a if b0.gamma_1 is None else b0.gamma_1 * a)
        h = torch.stack([h[i, idx[i]] for i in range(2)])  # the kept tokens, in the runtime's order
        m = b0.mlp(b0.norm2(h))
        h = h + (m if b0.gamma_2 is None else b0.gamma_2 * m)
        keep = idx[:, P:] - P
        rk = apply_keep_indices_nlc(h, rope, keep)
        rk = rk.transpose(0, 1) if model.rope_mixed else rk.unsqueeze(1)
        for i, blk in enumerate(model.blocks[1:], 1):
            h = blk(h, rope=rk[i] if model.rope_mixed else rk)
        ref = model.forward_head(model.norm(h))
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("label", ["beit", "beit_shared", "relpos_cls", "srelpos"])
def test_relative_bias_follows_pruned_tokens(models, label):
    """Later blocks == timm's blocks on the kept tokens given the bias table indexed at their rows and columns."""
    model = models[label][1]
    info = rs.ModelInfo.from_model(model)
    T = info.num_tokens - info.num_prefix_tokens
    s = rs.as_schedule([L("prune", T // 3)] + [L()] * (info.depth - 1), model)
    x = images(model, 2, dtype=torch.float64)
    idx, y = _kept(model, x, s)
    beit = isinstance(model, Beit)
    with torch.no_grad():  # block 0 prunes between its attention and MLP; later blocks see the kept tokens
        outs = []
        for i in range(2):
            xi, k = x[i : i + 1], idx[i]
            if beit:
                h = torch.cat((model.cls_token.expand(1, -1, -1), model.patch_embed(xi)), dim=1)
                h = h if model.pos_embed is None else h + model.pos_embed
                shared = model.rel_pos_bias() if model.rel_pos_bias is not None else None
                shared = None if shared is None else shared.reshape(1, *shared.shape[-3:])  # (1, H, N0, N0)
                b0 = model.blocks[0]
                a = b0.attn(b0.norm1(h), shared_rel_pos_bias=shared)
                h = h + (a if b0.gamma_1 is None else b0.gamma_1 * a)
                h = h[:, k]
                m = b0.mlp(b0.norm2(h))
                h = h + (m if b0.gamma_2 is None else b0.gamma_2 * m)
            else:
                h = model.patch_embed(xi)
                if model.cls_token is not None:
                    h = torch.cat((model.cls_token.expand(1, -1, -1), h), dim=1)
                shared = model.shared_rel_pos.get_bias() if model.shared_rel_pos is not None else None
                b0 = model.blocks[0]
                h = h + b0.ls1(b0.attn(b0.norm1(h), shared_rel_pos=shared))
                h = h[:, k]
                h = h + b0.ls2(b0.mlp(b0.norm2(h)))
            for blk in model.blocks[1:]:
                if beit:
                    own = blk.attn._get_rel_pos_bias() if blk.attn.relative_position_bias_table is not None else None
                    bias = own if shared is None else (shared if own is None else own + shared)
                    saved, blk.attn.relative_position_bias_table = blk.attn.relative_position_bias_table, None
                    try:
                        h = blk(h, shared_rel_pos_bias=None if bias is None else bias[:, :, k][:, :, :, k])
                    finally:
                        blk.attn.relative_position_bias_table = saved
                else:
                    bias = blk.attn.rel_pos.get_bias() if blk.attn.rel_pos is not None else shared
                    saved, blk.attn.rel_pos = blk.attn.rel_pos, None
                    try:
                        h = blk(h, shared_rel_pos=bias[:, :, k][:, :, :, k])
                    finally:
                        blk.attn.rel_pos = saved
            outs.append(model.forward_head(model.norm(h)))
    torch.testing.assert_close(y, torch.cat(outs), rtol=1e-10, atol=1e-10)


def test_merged_token_keeps_its_destination_position():
    """follow_positions: every output token sits at the one input among its members that was not merged away."""
    from rapid_search.runtime.ops import TomeReduction, bipartite_soft_matching, follow_positions, importance_merge

    g = torch.Generator().manual_seed(0)
    metric = torch.randn(2, 17, 8, generator=g)
    pos = torch.arange(17).expand(2, -1)
    reds = (bipartite_soft_matching(metric, 5, num_prefix=1), importance_merge(metric, torch.rand(2, 16, generator=g), 5, num_prefix=1, protect=0.25))
    for red in reds:
        members = red(torch.eye(17, dtype=torch.float64)[None].expand(2, -1, -1).contiguous(), mode="amax")  # (2, 12, 17)
        if isinstance(red, TomeReduction):
            removed = torch.zeros(2, 17, dtype=torch.bool)
            removed[:, ::2] = torch.zeros(2, 9, dtype=torch.bool).scatter(1, red.src_idx[..., 0], True)
        else:
            removed = red.remove
        out = follow_positions(red, pos)
        assert out.shape == (2, 12) and out[:, 0].eq(0).all()  # the class token stays first
        for b in range(2):
            for j in range(12):
                own = [i for i in members[b, j].nonzero().flatten().tolist() if not removed[b, i]]
                assert own == [int(out[b, j])]
        assert (members.sum(-1) > 1).any()  # some outputs really are merges


@pytest.mark.parametrize("label", sorted(CASES))
def test_rapid_and_tome_finite(models, label):
    model = models[label][0]
    x = images(model, 2)
    ratio = CASES[label][2]
    for s in (rs.rapid_schedule(model, ratio), rs.tome_for_ratio(model, ratio)):
        assert s.budget.achieved["ratio"] <= ratio
        y, counts, _, _ = _forward(model, x, s)
        assert torch.isfinite(y).all() and counts[0, -1] < counts[0, 0]


@pytest.mark.parametrize("label", sorted(CASES))
def test_bfloat16_explicit_attention_matches_the_fused_kernel(label, monkeypatch):
    """In bfloat16 at batch 1 on CPU every reducing block computes its attention explicitly in float32
    (position biases and RoPE included); the fused kernel (limit 0) gives the same tokens and, to
    bfloat16's precision, the same output."""
    from rapid_search.runtime import engine

    model = _make(label).to(torch.bfloat16)
    s = rs.rapid_schedule(model, CASES[label][2])
    x = images(model, 1).to(torch.bfloat16)
    calls = {}
    for limit in (engine.EXPLICIT_ATTENTION_MAX, 0):
        monkeypatch.setattr(engine, "EXPLICIT_ATTENTION_MAX", limit)
        with rs.applied(model, s), torch.no_grad(), torch.profiler.profile() as prof:
            calls[limit] = (model(x), rs.last_token_counts(model))
        calls[limit] += (sum(e.name == "aten::scaled_dot_product_attention" for e in prof.events()),)
    (y, counts, sdpa), (y0, counts0, sdpa0) = calls.values()
    assert torch.equal(counts, counts0) and sdpa < sdpa0
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), y0.float(), rtol=5e-2, atol=5e-2 * float(y0.float().abs().max()) + 1e-3)


@pytest.mark.parametrize("label", ["siglip_map", "vit_map_cls", "pe_map", "relpos_avg", "beit", "eva02"])
def test_pooling_sees_token_sizes(models, label):
    """Pooling merged tokens == timm's unpatched pooling of the same tokens each repeated ``size`` times.

    Attention pooling (``map``: the latent queries' ``+log size``) and average pooling (``Eva.pool``,
    and the mean BEiT / RelPos inline in ``forward_head``).
    """
    model = models[label][1]
    head = "pool" if hasattr(type(model), "pool") else "forward_head"
    assert model.global_pool in ("map", "avg")
    x = images(model, 2, dtype=torch.float64)
    with rs.applied(model, rs.tome_for_ratio(model, 0.5)), torch.no_grad():
        feats = model.forward_features(x)  # (B, L, C) merged tokens
        sizes = rs.last_sizes(model)  # (B, L, 1)
        pooled = getattr(model, head)(feats)  # the patched, size-aware pooling
        unpatched = getattr(type(model), head)
        assert sizes.max() > 1
        for b in range(2):
            expanded = feats[b].repeat_interleave(sizes[b, :, 0].long(), dim=0)[None]  # (1, N0, C)
            torch.testing.assert_close(pooled[b : b + 1], unpatched(model, expanded), rtol=1e-10, atol=1e-10)
        assert not torch.allclose(pooled, unpatched(model, feats))  # ignoring sizes would differ
