"""The analytic cost model (rapid_search.runtime.flops) against torch's FlopCounterMode on the patched forward.

FlopCounterMode counts 2 FLOPs per multiply-accumulate for exactly the ops the cost model counts
(convolution, addmm/mm/bmm and the attention matmuls) and nothing else (norms, softmax, GELU,
gathers and sorts are free in both), so analytic MACs must equal counted FLOPs / 2 exactly — less
the class rows' importance where the attention is computed explicitly: the cost model counts that
row (``importance_rows * N * attn_dim`` MACs, what a block running the fused kernel computes on
the side), an explicit attention reads it from its own probabilities.

The exact check runs with attention computed unfused (``attn.fused_attn = False``: two bmm per
block), where every torch version counts it. Whether the fused CPU kernel is counted is a torch
version's quirk (torch 2.14.1 does not count ``_scaled_dot_product_flash_attention_for_cpu``), so
the fused path is checked separately: with ``EXPLICIT_ATTENTION_MAX = 0`` the patched model
dispatches the fused kernel in every block, and gives the unfused path's outputs; with the default,
small attentions on CPU run explicitly and give the same outputs.
"""

from __future__ import annotations

import pytest
import timm
import torch
from helpers import FAMILIES, images, read_importance_macs
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import rapid_search as rs
from rapid_search import LayerSpec as L
from rapid_search.runtime import engine



@pytest.fixture(scope="module")
def models():
    return {name: make() for name, make in FAMILIES.items()}


def _schedules(model):
    info = rs.ModelInfo.from_model(model)
    D, T = info.depth, info.num_tokens - info.num_prefix_tokens
    r = T // 8
    rapid = rs.rapid_schedule(model, 0.5)
    cycle = [L("prune", r), L("tome", r), L("merge", r, None, 0.5), L("evit", r), L()]
    return {
        "unreduced": rs.empty_schedule(model),
        "rapid": rapid,  # similarity: tokens (embed_dim-wide similarity matmuls)
        "rapid_keys": rs.rapid_schedule(model, 0.5, similarity="keys"),
        "tome": rs.tome_for_ratio(model, 0.5),
        "tome_decreasing": rs.tome_for_ratio(model, 0.5, inflect=-1.0),
        "evit": rs.variant_schedule(rapid, model, kind="evit"),
        "tofu": rs.variant_schedule(rapid, model, kind="tofu"),
        "all_ops": rs.as_schedule([cycle[i % len(cycle)] for i in range(D)], model),
    }


def _counted(model, x, schedule):
    """(total FLOPs, per-op FLOPs, recorded token counts) of one patched forward."""
    with rs.applied(model, schedule), torch.no_grad():
        fc = FlopCounterMode(display=False)
        with fc:
            model(x)
        counts = rs.last_token_counts(model)
    ops = {str(k).split(".")[-1] if "." in str(k) else str(k): v for k, v in fc.get_flop_counts()["Global"].items()}
    return fc.get_total_flops(), ops, counts


def _set_fused(model, fused):
    for blk in model.blocks:
        blk.attn.fused_attn = fused


@pytest.fixture
def unfused(models):
    """The models with attention computed as two counted matmuls; restored to fused afterwards."""
    for m in models.values():
        _set_fused(m, False)
    yield models
    for m in models.values():
        _set_fused(m, True)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_analytic_macs_equal_flop_counter(unfused, family):
    model = unfused[family]
    info = rs.ModelInfo.from_model(model)
    B = 2
    x = images(model, B)
    for name, s in _schedules(model).items():
        total, ops, counts = _counted(model, x, s)
        assert not any("scaled_dot_product" in k for k in ops), ops
        assert ops.get("bmm", 0) > 0, f"attention matmuls not counted: {ops}"
        assert total % (2 * B) == 0
        assert total // (2 * B) == rs.schedule_macs(info, s) - read_importance_macs(model, info, s), (name, ops)
        assert counts[0].tolist() == rs.token_counts(info, s)


class _AtenCalls(TorchDispatchMode):
    """Records the name of every aten op a forward dispatches."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_patched_model_keeps_fused_attention(models, family, monkeypatch):
    """With ``fused_attn`` set and no explicit attention allowed, every block of the patched forward
    runs the fused kernel (one SDPA call per block), and the result equals the unfused path's."""
    monkeypatch.setattr(engine, "EXPLICIT_ATTENTION_MAX", 0)
    model = models[family]
    info = rs.ModelInfo.from_model(model)
    x = images(model, 2)
    for name, s in _schedules(model).items():
        with rs.applied(model, s), torch.no_grad():
            with _AtenCalls() as rec:
                fused = model(x)
            _set_fused(model, False)
            try:
                plain = model(x)
            finally:
                _set_fused(model, True)
        sdpa = [c for c in rec.calls if "scaled_dot_product" in c]
        assert len(sdpa) == info.depth, (name, sdpa)
        torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_small_cpu_attention_runs_explicitly(models, family, monkeypatch):
    """By default a reducing block's attention whose scores fit ``EXPLICIT_ATTENTION_MAX`` runs as
    matmul + softmax + matmul on CPU even with ``fused_attn`` set, and gives the fused kernel's outputs."""
    model = models[family]
    x = images(model, 2)
    for name, s in _schedules(model).items():
        reducing = sum(layer.reduces for layer in s.layers)
        with rs.applied(model, s), torch.no_grad():
            with _AtenCalls() as rec:
                explicit = model(x)
            with monkeypatch.context() as m:
                m.setattr(engine, "EXPLICIT_ATTENTION_MAX", 0)
                fused = model(x)
        sdpa = [c for c in rec.calls if "scaled_dot_product" in c]
        assert len(sdpa) <= len(s.layers) - reducing, (name, sdpa)  # no reducing block calls the fused kernel
        torch.testing.assert_close(explicit, fused, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2])
def test_explicit_attention_limit_and_importance(rows, dtype, monkeypatch):
    """At exactly ``EXPLICIT_ATTENTION_MAX`` scores the attention runs explicitly and the importance
    is read from its probabilities; one score fewer allowed and it runs the fused kernel with the
    importance computed separately. Both give the same output and importance (in bfloat16 to its
    precision: the explicit attention computes in float32 and returns bfloat16)."""
    torch.manual_seed(0)
    attn = timm.layers.Attention(32, num_heads=2, qkv_bias=True).eval().to(dtype)
    B, N = 2, 17
    x = torch.randn(B, N, 32).to(dtype)  # (B, N, C)
    size = torch.rand(B, N, 1) * 3 + 1  # (B, N, 1)
    scores = B * attn.num_heads * N * N
    given: list[bool] = []  # whether each importance was handed the attention's probabilities
    real = engine._importance
    monkeypatch.setattr(engine, "_importance", lambda *a, probs=None, **k: given.append(probs is not None) or real(*a, probs=probs, **k))
    got = {}
    for limit in (scores, scores - 1):
        monkeypatch.setattr(engine, "EXPLICIT_ATTENTION_MAX", limit)
        with torch.no_grad(), _AtenCalls() as rec:
            out, _, imp = engine._attention(attn, x, size, importance_rows=rows, need_importance=True, num_prefix=rows)
        got[limit] = (out, imp, sum("scaled_dot_product" in c for c in rec.calls))
    assert got[scores][2] == 0 and got[scores - 1][2] == 1
    assert given == [True, False]
    assert got[scores][1].shape == (B, N - rows) and got[scores][1].dtype == torch.float32
    assert got[scores][0].dtype == got[scores - 1][0].dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got[scores][0], got[scores - 1][0], **tol)
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(got[scores][1], got[scores - 1][1], **tol)


@pytest.mark.parametrize("family", ["test_vit", "distilled", "avg_nocls"])
def test_threshold_schedule_macs_from_counts(unfused, family):
    """Data-dependent cost: macs_from_counts on the recorded counts == counted FLOPs / 2 (batch size 1; plus
    the importance rows the explicit attention reads, as in test_analytic_macs_equal_flop_counter)."""
    model = unfused[family]
    info = rs.ModelInfo.from_model(model)
    T = info.num_tokens - info.num_prefix_tokens
    layers = [L("prune", T, 0.55), L("merge", T // 4, 0.4, 0.25), L("evit", T // 10), L("prune", T // 8, 0.5)]
    sched = [
        rs.rapid_schedule(model, 0.5, prune_threshold=0.5, merge_threshold=0.3),
        rs.as_schedule(layers + [L()] * (info.depth - len(layers)), model),
    ]
    x = images(model, 3)
    seen = set()
    for s in sched:
        assert s.has_threshold
        for i in range(len(x)):
            total, _, counts = _counted(model, x[i : i + 1], s)
            assert total % 2 == 0
            got = rs.macs_from_counts(info, s, counts)
            assert got.dtype == torch.float64 and got.shape == (1,)
            assert int(got[0]) == got[0] == total // 2 + read_importance_macs(model, info, s, counts[0])
            assert got[0] >= rs.schedule_macs(info, s)  # the analytic value is the all-pass lower bound
            seen.add(tuple(counts[0].tolist()))
    assert len(seen) > 2, "threshold layers should produce image-dependent counts"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_macs_from_counts_equals_schedule_macs(models, family):
    model = models[family]
    info = rs.ModelInfo.from_model(model)
    for name, s in _schedules(model).items():
        counts = torch.tensor([rs.token_counts(info, s)] * 3)
        got = rs.macs_from_counts(info, s, counts)
        assert torch.equal(got, torch.full((3,), float(rs.schedule_macs(info, s)), dtype=torch.float64)), name
        assert rs.schedule_macs(info, s, counts=counts[0].tolist()) == rs.schedule_macs(info, s)
        assert rs.schedule_gflops(info, s) == rs.schedule_macs(info, s) / 1e9
    assert info.base_macs == rs.schedule_macs(info, rs.empty_schedule(model))


def test_budget_achieved_matches_cost_model(models):
    model = models["test_vit"]
    info = rs.ModelInfo.from_model(model)
    for s in (rs.rapid_schedule(model, 0.5), rs.tome_for_ratio(model, 0.5)):
        macs = rs.schedule_macs(info, s)
        assert s.budget.achieved["gflops"] == round(macs / 1e9, 6)
        assert macs / info.base_macs <= 0.5
        assert s.budget.achieved["ratio"] == round(macs / info.base_macs, 6)


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "vit_tiny_patch16_224"])
def test_tiny_224_base_gflops(name):
    torch.manual_seed(0)
    model = timm.create_model(name).eval()  # random init: no download
    info = rs.ModelInfo.from_model(model)
    assert (info.depth, info.embed_dim, info.num_tokens, info.num_prefix_tokens) == (12, 192, 197, 1)
    assert round(info.base_gflops, 2) == 1.25  # MACs convention (fvcore / token-reduction papers)
    assert info.base_macs == 1_253_683_200
    if name == "deit_tiny_patch16_224":
        _set_fused(model, False)  # the attention matmuls counted on every torch version (see the module docstring)
        with torch.no_grad():
            fc = FlopCounterMode(display=False)
            with fc:
                model(torch.randn(1, 3, 224, 224))
        assert fc.get_total_flops() == 2 * info.base_macs


def test_model_info_fields(models):
    info = rs.ModelInfo.from_model(models["distilled"])
    assert info.num_prefix_tokens == 2 and info.importance_rows == 2 and info.num_tokens == 66
    assert info.head_macs == 2 * 32 * 10  # head + head_dist
    assert info.fingerprint() == rs.ModelFingerprint(info.name, 4, 32, 66, 2)
    info = rs.ModelInfo.from_model(models["reg4"])
    assert info.num_prefix_tokens == 5 and info.importance_rows == 1 and info.num_tokens == 69
