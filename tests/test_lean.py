"""The lean fixed-count path (rapid_search.runtime.ops.fixed_*): same tokens and outputs as the general
path, no host synchronisation, torch.compile(fullgraph=True) without recompiles, reduced precision."""

from __future__ import annotations

import pytest
import timm
import torch
from helpers import FAMILIES, images
from test_runtime import FIXED, fixed_schedule
from torch.utils._python_dispatch import TorchDispatchMode

import rapid_search as rs
from rapid_search import LayerSpec as L
from rapid_search.runtime.ops import (
    fixed_evit,
    fixed_merge,
    fixed_prune,
    importance_merge,
    importance_prune,
    merge_source,
    merge_wavg,
    peak_norm,
    redundancy_prune,
)
from rapid_search.runtime.patch import _runtime


@pytest.fixture(scope="module")
def models64():
    return {name: make().double() for name, make in FAMILIES.items()}


@pytest.fixture(autouse=True)
def _unpatch(models64):
    yield
    for m in models64.values():
        rs.remove(m)


def _run(model, x, schedule, *, lean: bool):
    with rs.applied(model, schedule, trace_source=True), torch.no_grad():
        _runtime(model).lean = lean
        y = model(x)
        return y, rs.last_token_counts(model), rs.last_sizes(model), rs.last_source(model)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("kind", FIXED)
def test_lean_path_equals_general_path(models64, family, kind):
    """Same tokens kept, same sizes, same sources; outputs equal to float64 rounding."""
    model = models64[family]
    x = images(model, 3, dtype=torch.float64)
    s = fixed_schedule(model, kind)
    y, counts, sizes, source = _run(model, x, s, lean=True)
    y0, counts0, sizes0, source0 = _run(model, x, s, lean=False)
    torch.testing.assert_close(y, y0, rtol=1e-10, atol=1e-10)
    assert torch.equal(counts, counts0)
    assert torch.equal(source, source0)
    assert (sizes is None) == (sizes0 is None)
    if sizes is not None:
        assert sizes.dtype == sizes0.dtype == torch.float64
        assert torch.equal(sizes, sizes0)
        assert torch.equal(sizes.sum(1)[:, 0], source.sum((1, 2)))  # sizes add up to the covered patches


def _removed_rows(red, B, N):
    """(B, N) bool mask of the rows a FixedReduction drops."""
    kept = torch.zeros(B * N, dtype=torch.bool)
    kept[red.keep] = True
    return ~kept.view(B, N)


def _general_removed(red, B, N):
    keep = torch.zeros(B, N, dtype=torch.bool)
    keep.scatter_(1, red.keep_idx, True)
    return ~keep


@pytest.mark.parametrize("P", [0, 1, 2, 5])
@pytest.mark.parametrize("r", [1, 6, 40])
def test_fixed_ops_select_what_the_general_ops_select(P, r):
    """Same tokens removed (prefix never), merged features equal, sizes add up, batched == per image."""
    B, N, C = 3, 29, 8
    g = torch.Generator().manual_seed(P * 100 + r)
    metric = torch.randn(B, N, C, generator=g, dtype=torch.float64)
    imp = torch.rand(B, N - P, generator=g, dtype=torch.float64)
    x = torch.randn(B, N, 5, generator=g, dtype=torch.float64)
    size = torch.randint(1, 4, (B, N, 1), generator=g).double()
    ops = {
        "prune": (lambda m, i: fixed_prune(m, r, num_prefix=P), lambda m, i: redundancy_prune(m, r, num_prefix=P)),
        "evit": (lambda m, i: fixed_evit(i, r, num_prefix=P), lambda m, i: importance_prune(i, r, num_prefix=P)),
    }
    for protect in (0.0, 0.25, 0.5):
        ops[f"merge{protect}"] = (
            lambda m, i, p=protect: fixed_merge(m, i, r, num_prefix=P, protect=p),
            lambda m, i, p=protect: importance_merge(m, i, r, num_prefix=P, protect=p),
        )
    for name, (lean_op, general_op) in ops.items():
        lean, general = lean_op(metric, imp), general_op(metric, imp)
        gone = _removed_rows(lean, B, N)
        assert torch.equal(gone, _general_removed(general, B, N)), name
        assert not gone[:, :P].any()  # prefix tokens survive
        assert (gone.sum(1) == gone[0].sum()).all() and gone[0].sum() > 0
        for i in range(B):  # batched == per image
            assert torch.equal(_removed_rows(lean_op(metric[i : i + 1], imp[i : i + 1]), 1, N)[0], gone[i]), name
        if lean.src is None:
            torch.testing.assert_close(lean(x), general(x), rtol=0, atol=0)
            continue
        got_x, got_s = lean.merge(x, size)
        want_x, want_s = merge_wavg(general, x, size)
        torch.testing.assert_close(got_x, want_x, rtol=1e-12, atol=1e-12)
        assert torch.equal(got_s, want_s)
        assert torch.equal(got_s.sum(1), size.sum(1))  # nothing lost
        # MLERP fused into the merge = the general path's peak_norm after merge_wavg
        peaked, peaked_s = lean.merge(x, size, peak=True)
        torch.testing.assert_close(peaked, peak_norm(general, x, want_x), rtol=1e-12, atol=1e-12)
        assert torch.equal(peaked_s, want_s)
        assert not torch.allclose(peaked, got_x)  # the peak norms did change the averages
        torch.testing.assert_close(merge_source(lean, x, None), merge_source(general, x, None), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_fused_mlerp_reuses_the_metric_norms_when_the_metric_is_the_tokens(dtype):
    """``similarity: tokens``: the merge's MLERP takes the norms ``fixed_merge`` already computed for the
    similarity; the result equals computing them again, in every dtype, and comes back in ``x``'s dtype."""
    B, N, C, P = 2, 29, 16, 1
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(B, N, C, generator=g, dtype=torch.float64) * 3).to(dtype)
    imp = torch.rand(B, N - P, generator=g, dtype=torch.float64).to(dtype)
    size = torch.randint(1, 4, (B, N, 1), generator=g).to(dtype)
    red = fixed_merge(x, imp, 6, num_prefix=P, protect=0.25)
    assert red.metric_norm.dtype == (torch.float32 if dtype == torch.bfloat16 else dtype)
    shared, s1 = red.merge(x, size, peak=True, norm=red.metric_norm)
    own, s2 = red.merge(x, size, peak=True)
    assert shared.dtype == dtype and torch.equal(shared, own) and torch.equal(s1, s2)
    general = importance_merge(x, imp, 6, num_prefix=P, protect=0.25)  # same tokens, same rounding as the general path
    torch.testing.assert_close(shared, peak_norm(general, x, merge_wavg(general, x, size)[0]), rtol=0, atol=0)


def test_fixed_ops_identity_when_nothing_to_do():
    metric = torch.randn(2, 3, 4)
    assert fixed_prune(metric, 0, num_prefix=1) is None
    assert fixed_prune(metric[:, :2], 5, num_prefix=1) is None  # one patch token: no partner
    assert fixed_merge(metric, torch.rand(2, 2), 0, num_prefix=1, protect=0.25) is None
    assert fixed_evit(torch.rand(2, 1), 3, num_prefix=1) is None  # keeps at least one patch token


class _SyncSpy(TorchDispatchMode):
    """Records ops that read device data on the host or give data-dependent shapes."""

    BAD = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "item")

    def __init__(self) -> None:
        super().__init__()
        self.bad: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.BAD or (name == "index" and any(t is not None and t.dtype == torch.bool for t in args[1])):
            self.bad.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("family", ["test_vit", "distilled", "reg4", "avg_nocls"])
@pytest.mark.parametrize("kind", ["mixed", "all_ops", "evit"])
def test_fixed_schedule_never_synchronises(models64, family, kind):
    model = models64[family]
    x = images(model, 2, dtype=torch.float64)
    with rs.applied(model, fixed_schedule(model, kind)), torch.no_grad(), _SyncSpy() as spy:
        model(x)
    assert spy.bad == []
    # the general path does synchronise (the spy can fail)
    s = rs.rapid_schedule(model, 0.5, prune_threshold=0.5)
    with rs.applied(model, s), torch.no_grad(), _SyncSpy() as spy:
        model(x)
    assert spy.bad


def test_empty_schedule_runs_timm_forward_untouched(models64):
    model = models64["test_vit"]
    rs.apply(model, rs.empty_schedule(model))
    assert all("forward" not in blk.__dict__ for blk in model.blocks) and "pool" not in model.__dict__
    rs.apply(model, [L()] * len(model.blocks))  # the same through as_schedule
    assert all("forward" not in blk.__dict__ for blk in model.blocks)


# ---- torch.compile -------------------------------------------------------------------------------------------


def _compile_check(model, schedule, x, *, backend):
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    with torch.no_grad():
        ref_unpatched = model(x)
        rs.apply(model, schedule)
        eager = model(x)
        eager_counts = rs.last_token_counts(model)
        dynamo.reset()
        counters.clear()
        compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
        out = compiled(x)
        torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)
        assert torch.equal(rs.last_token_counts(model), eager_counts)  # the runtime's record survives compilation
        with dynamo.config.patch(error_on_recompile=True):
            for seed in (1, 2):
                x2 = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
                torch.testing.assert_close(compiled(x2), model(x2), rtol=1e-4, atol=1e-4)
        assert counters["stats"]["unique_graphs"] == 1
        rs.remove(model)
        assert all("forward" not in blk.__dict__ for blk in model.blocks)
        assert torch.equal(model(x), ref_unpatched)
        dynamo.reset()


@pytest.mark.parametrize(
    "family,kind", [("test_vit", "mixed"), ("distilled", "mixed"), ("avg_nocls", "mixed"), ("test_vit", "all_ops"), ("reg4", "empty")]
)
def test_fixed_schedule_compiles_fullgraph_without_recompiles(family, kind):
    model = FAMILIES[family]()
    s = rs.empty_schedule(model) if kind == "empty" else fixed_schedule(model, kind)
    _compile_check(model, s, images(model, 2), backend="aot_eager")


def test_fixed_schedule_compiles_with_inductor():
    """The real compiler (C++ codegen on CPU) on a two-block ViT, to keep the compile time short."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10).eval()
    s = rs.as_schedule([L("prune", 3), L("merge", 3, None, 0.25)], model)
    _compile_check(model, s, torch.randn(2, 3, 32, 32), backend="inductor")


# ---- reduced precision ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", ["test_vit", "distilled", "avg_nocls"])
def test_reduced_precision_keeps_counts_and_stays_close(family, dtype):
    """Same tokens per block as float32; similarity, importance and sizes are float32 inside."""
    from rapid_search.tools.evaluate import predict

    m32, m16 = FAMILIES[family](), FAMILIES[family]().to(dtype)
    x = images(m32, 4)
    for kind in ("mixed", "all_ops", "merge"):
        s = fixed_schedule(m32, kind)
        ref, low = predict(m32, x, s, batch_size=2), predict(m16, x, s, batch_size=2)  # predict casts the images
        assert torch.equal(low.counts, ref.counts)
        assert low.logits.dtype == torch.float32 and torch.isfinite(low.logits).all()
        with rs.applied(m16, s), torch.no_grad():
            m16(x[:2].to(dtype))
            sizes = rs.last_sizes(m16)
        assert sizes.dtype == torch.float32  # token counts are bookkept in float32
        if kind == "merge":
            assert torch.equal(sizes.sum(1), torch.full((2, 1), float(rs.ModelInfo.from_model(m32).num_tokens)))


def test_evaluate_cli_dtype(tiny_search, tmp_path):
    import json

    from rapid_search.cli import main

    s = rs.rapid_schedule(timm_test_vit(), 0.5).save(tmp_path / "s.yaml")
    out = tmp_path / "r.json"
    argv = ["evaluate", "--schedule", str(s), "--data", str(tiny_search.data), "--checkpoint", str(tiny_search.ckpt), "--model", "test_vit"]
    assert main(argv + ["--dtype", "bfloat16", "--repeats", "1", "--threads", "1", "--batch-size", "8", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["dtype"] == "bfloat16" and res["images"] == 16 and 0 <= res["schedule_scores"]["agreement"] <= 1


def timm_test_vit():
    import timm

    return timm.create_model("test_vit")


def test_measure_schedule_compiled(monkeypatch):
    """--compile timings: the schedule's compiled forward is timed (compilation in the warm-up).
    The plumbing is tested with the quick aot_eager backend (inductor: test above)."""
    import functools

    from timm.models.vision_transformer import VisionTransformer

    calls = []
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: calls.append(kw) or functools.partial(real, backend="aot_eager")(m, **kw))

    from rapid_search.tools.latency import measure_schedule_ms

    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10).eval()
    s = rs.as_schedule([L("prune", 3), L("merge", 3, None, 0.25)], model)
    t = measure_schedule_ms(model, s, device="cpu", batch_size=2, repeats=3, warmup=0, compile=True)
    assert t.repeats == 3 and t.median_ms > 0
    assert not rs.is_patched(model)
    from rapid_search.tools.latency import LatencyModel

    lat = LatencyModel.measure(model, device="cpu", batch_size=2, repeats=2, calibrate_repeats=2, compile=True)
    assert lat.compiled and lat.base_ms > 0
    assert calls == [{"dynamic": False}] * 2


def test_paired_timing_runs_the_schedule_only_in_its_rounds(monkeypatch):
    """``measure_against_unreduced``: one run of each per round, the schedule applied only around
    the reduced runs, eager and compiled (both modules compiled, the model left unpatched)."""
    import functools

    from timm.models.vision_transformer import VisionTransformer

    from rapid_search.runtime import engine
    from rapid_search.tools.latency import measure_against_unreduced, paired_ratio
    from rapid_search.tools.measure import Timing

    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10).eval()
    s = rs.as_schedule([L("prune", 3), L("merge", 3, None, 0.25)], model)
    reductions = []
    real_reduce = engine._reduce
    monkeypatch.setattr(engine, "_reduce", lambda *a: reductions.append(a[3].op) or real_reduce(*a))
    red, base = measure_against_unreduced(model, s, device="cpu", batch_size=2, repeats=4, warmup=1)
    assert (red.repeats, base.repeats, len(red.times_ms), len(base.times_ms)) == (4, 4, 4, 4)
    assert reductions == ["prune", "merge"] * 5  # warm-up + 4 rounds of the reduced forward, none in the unreduced ones
    assert not rs.is_patched(model)

    calls = []
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: calls.append((m is model, kw)) or functools.partial(real, backend="aot_eager")(m, **kw))
    red, base = measure_against_unreduced(model, s, device="cpu", batch_size=2, repeats=3, warmup=0, compile=True)
    assert calls == [(False, {"dynamic": False}), (True, {"dynamic": False})]  # a copy carries the schedule
    assert red.repeats == base.repeats == 3 and not rs.is_patched(model)

    assert paired_ratio(Timing.from_times([1.0, 4.0, 3.0]), Timing.from_times([2.0, 8.0, 3.0])) == 0.5  # round by round, not median / median


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_similarity_picks_what_prune_and_merge_compare(models64, family, monkeypatch):
    """``similarity: tokens`` hands the ops the residual stream (``embed_dim`` wide, the tokens being
    reduced), ``keys`` the head-averaged keys (``head_dim`` wide); both paths, every family."""
    from rapid_search.runtime import engine

    model = models64[family]
    info = rs.ModelInfo.from_model(model)
    x = images(model, 2, dtype=torch.float64)
    r = (info.num_tokens - info.num_prefix_tokens) // 8
    seen: list = []

    def spy(name, mod):
        real = getattr(mod, name)

        def wrapped(metric, *args, **kwargs):
            seen.append(metric)
            return real(metric, *args, **kwargs)

        monkeypatch.setattr(mod, name, wrapped)

    for name in ("fixed_prune", "fixed_merge", "redundancy_prune", "importance_merge"):
        spy(name, engine)
    for similarity in ("keys", "tokens"):
        s = rs.as_schedule([L("prune", r, similarity=similarity), L("merge", r, None, 0.25, "max", similarity)] + [L()] * (info.depth - 2), model)
        for lean in (True, False):
            seen.clear()
            _run(model, x, s, lean=lean)
            width = info.embed_dim if similarity == "tokens" else info.head_dim
            assert [m.shape[-1] for m in seen] == [width, width], (similarity, lean)


class _KeyMeans(TorchDispatchMode):
    """Counts head averages of ``(B, H, N, hd)`` keys (``mean`` over dim 1 of a 4-D tensor)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.mean.dim and args[0].ndim == 4 and list(args[1]) == [1]:
            self.count += 1
        return func(*args, **kwargs)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_keys_are_averaged_only_for_layers_that_compare_by_them(models64, family):
    """The head-averaged keys cost a pass over ``(B, H, N, hd)`` per block (milliseconds at batch 32):
    they are computed for ``similarity: keys`` and ``tome`` layers, never for ``similarity: tokens``
    or ``evit`` ones; both paths, every family."""
    model = models64[family]
    info = rs.ModelInfo.from_model(model)
    x = images(model, 2, dtype=torch.float64)
    r = (info.num_tokens - info.num_prefix_tokens) // 8

    def means(layers, lean):
        spy = _KeyMeans()
        with spy:
            _run(model, x, rs.as_schedule(layers + [L()] * (info.depth - len(layers)), model), lean=lean)
        return spy.count

    for lean in (True, False):
        assert means([L("prune", r, similarity="tokens"), L("merge", r, None, 0.25, "max", "tokens"), L("evit", r)], lean) == 0
        assert means([L("prune", r, similarity="keys"), L("merge", r, None, 0.25, "max", "keys")], lean) >= 2
        assert means([L("tome", r)], lean) >= 1


def test_call_skips_only_modules_that_return_their_input():
    """``engine._call`` returns its input itself for an identity and for a dropout that drops nothing,
    and calls every other module, and any module with hooks of its own."""
    from rapid_search.runtime.engine import _call

    x = torch.randn(4, 8)
    assert _call(torch.nn.Identity(), x) is x
    assert _call(torch.nn.Dropout(0.5).eval(), x) is x
    assert _call(torch.nn.Dropout(0.0).train(), x) is x
    torch.manual_seed(0)
    y = _call(torch.nn.Dropout(0.5).train(), x)
    assert y is not x and bool((y == 0).any()) and torch.equal(y[y != 0], 2 * x[y != 0])
    scale = timm.layers.LayerScale(8, init_values=0.5)
    torch.testing.assert_close(_call(scale, x), 0.5 * x)
    seen = []
    hooked = torch.nn.Identity()
    hooked.register_forward_hook(lambda m, args, out: seen.append(out) or out + 1)
    torch.testing.assert_close(_call(hooked, x), x + 1)
    pre = torch.nn.Dropout(0.5).eval()
    pre.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    assert _call(pre, x) is x and len(seen) == 2  # called (the hook ran), and eval dropout returns its input


def test_compiled_reducing_blocks_run_module_hooks():
    """Under torch.compile a reducing block calls its identity-like modules (Dynamo inlines them), so a
    hook on one changes the compiled output exactly as it changes the eager one."""
    import torch._dynamo as dynamo

    model = FAMILIES["test_vit"]()
    s = fixed_schedule(model, "merge")
    x = images(model, 2)
    with rs.applied(model, s), torch.no_grad():
        plain = model(x)
        blk = model.blocks[1]
        assert s.layers[1].reduces and type(blk.ls1) is torch.nn.Identity
        blk.ls1.register_forward_hook(lambda m, args, out: out * 0.5)
        eager = model(x)
        assert not torch.allclose(eager, plain)
        dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False)
        torch.testing.assert_close(compiled(x), eager, rtol=1e-4, atol=1e-4)
        dynamo.reset()


@pytest.mark.parametrize("family", ["test_vit", "qk_norm", "deit3"])
def test_reducing_blocks_call_hooked_modules_and_train_mode_dropout(family):
    """A reducing block still calls a skippable module that has hooks (ls1, q_norm, attn_drop), and in
    train mode applies the attention dropout on the explicit path: two forwards with different seeds
    differ, and equal the eval forward with p = 0."""
    model = FAMILIES[family]()
    s = fixed_schedule(model, "merge")
    x = images(model, 2)
    calls = []
    with rs.applied(model, s), torch.no_grad():
        blk = model.blocks[1]
        for mod in (blk.ls1, blk.attn.q_norm, blk.attn.attn_drop, blk.attn.norm):
            mod.register_forward_hook(lambda m, args, out: calls.append(type(m).__name__))
        y_eval = model(x)
        assert sorted(calls) == sorted([type(blk.ls1).__name__, type(blk.attn.q_norm).__name__, "Dropout", type(blk.attn.norm).__name__])
        for b in model.blocks:
            b.attn.attn_drop.p = 0.5
        model.train()
        torch.manual_seed(1)
        y1 = model(x)
        torch.manual_seed(2)
        y2 = model(x)
        assert not torch.allclose(y1, y2)
        for b in model.blocks:
            b.attn.attn_drop.p = 0.0
        torch.testing.assert_close(model(x), y_eval)
