"""The runtime on a CUDA device gives the CPU's results (marker ``cuda``; skipped without CUDA).

Every supported family (``helpers.FAMILIES``) and every op (prune, merge, tome, evit, mixed
schedules, thresholds with ragged per-image counts) is run on the device and compared with the
same model on the CPU:

* float64 on both sides: token counts, sizes and source maps equal, outputs within 1e-7
  (only the order of floating-point sums differs);
* float32 with TF32 off: counts equal, outputs within 1e-4;
* batch independence on the device (a batch gives each image's single-image result);
* ``remove`` restores the model bit for bit, and an empty schedule is the unpatched model;
* float16 and bfloat16 (``model.to(dtype)`` and ``torch.autocast``) where the device supports
  them: finite, the cost model's counts, close to float32;
* the pure ops on padded (ragged) batches, and the latency model and ``evaluate.predict`` on the
  device.

``scripts/gpu_check.sh`` runs these with ``RAPID_REQUIRE_CUDA=1``, which turns the skip into a
failure. ``RAPID_CUDA_TEST_DEVICE`` (default ``cuda``) names the device under test; setting it
to ``cpu`` runs the test code itself on a machine without a GPU (both sides are then the CPU).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from helpers import FAMILIES, images, module_state

import rapid_search as rs
from rapid_search import LayerSpec as L
from rapid_search.runtime.ops import bipartite_soft_matching, importance_merge, importance_prune, merge_wavg, redundancy_prune

pytestmark = pytest.mark.cuda

DEVICE = torch.device(os.environ.get("RAPID_CUDA_TEST_DEVICE", "cuda"))
CPU = torch.device("cpu")

FIXED = ("prune", "merge", "tome", "evit", "mixed", "tofu", "all_ops")
THRESH = ("prune_thr", "merge_thr", "mixed_thr")
HALF = (torch.float16, torch.bfloat16)


def _device_missing() -> str | None:
    if DEVICE.type != "cuda":
        return None
    if not torch.cuda.is_available():
        return "no CUDA device visible (torch.cuda.is_available() is False)"
    if DEVICE.index is not None and DEVICE.index >= torch.cuda.device_count():
        return f"{DEVICE} requested but only {torch.cuda.device_count()} CUDA device(s) visible"
    return None


@pytest.fixture(scope="module", autouse=True)
def _need_device():
    """Skip without the device; fail instead under ``RAPID_REQUIRE_CUDA=1`` (scripts/gpu_check.sh)."""
    why = _device_missing()
    if why is not None:
        if os.environ.get("RAPID_REQUIRE_CUDA") == "1":
            pytest.fail(f"RAPID_REQUIRE_CUDA=1 but {why}", pytrace=False)
        pytest.skip(why)


@pytest.fixture(autouse=True)
def _no_tf32():
    """Strict float32 on the device: TF32 matmuls/convolutions would differ from the CPU by ~1e-3."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.fixture(scope="module")
def pairs():
    """family -> (CPU model, device model), float64 and float32 copies made on first use."""
    cache: dict = {}

    def get(family: str, dtype: torch.dtype):
        key = (family, dtype)
        if key not in cache:
            cpu = FAMILIES[family]().to(dtype)
            cache[key] = (cpu, copy.deepcopy(cpu).to(DEVICE))
        return cache[key]

    return get


def _schedule(model, kind: str, thr: float = 0.5) -> rs.Schedule:
    """The schedules of tests/test_runtime.py: fixed counts per op, and threshold mixes."""
    info = rs.ModelInfo.from_model(model)
    D, T = info.depth, info.num_tokens - info.num_prefix_tokens
    r = T // 8
    if kind == "prune":
        return rs.as_schedule([L("prune", r)] * D, model)
    if kind == "merge":
        return rs.as_schedule([L("merge", r, None, 0.25)] * D, model)
    if kind == "tome":
        return rs.tome_schedule(model, r)
    if kind == "evit":
        return rs.as_schedule([L("evit", r)] * D, model)
    if kind == "mixed":
        return rs.rapid_schedule(model, 0.5)
    if kind == "tofu":
        return rs.variant_schedule(rs.rapid_schedule(model, 0.5), model, kind="tofu")
    if kind == "all_ops":
        cycle = [L("prune", r), L("tome", r), L("merge", r, None, 0.5), L("evit", r), L()]
        return rs.as_schedule([cycle[i % len(cycle)] for i in range(D)], model)
    r = T // 10
    if kind == "prune_thr":
        layers = [L("prune", T, thr), L("merge", r, None, 0.25), L("evit", r), L("merge", T, thr, 0.5)]
    elif kind == "merge_thr":
        layers = [L("merge", T, thr, 0.25), L("merge", r, thr - 0.2, 0.5), L("evit", r), L("merge", T, thr, 0.25)]
    elif kind == "mixed_thr":
        layers = [L("evit", r), L("prune", T, thr), L("merge", T, thr - 0.1, 0.25), L("evit", r)]
    else:
        raise ValueError(kind)
    return rs.as_schedule((layers + [L()] * D)[:D], model)


def _forward(model, x, schedule, *, trace_source=True):
    """Output, counts ``(B, D + 1)``, sizes and source map of one forward under ``schedule`` (on CPU)."""
    with rs.applied(model, schedule, trace_source=trace_source), torch.no_grad():
        y = model(x)
        counts, sizes, source = rs.last_token_counts(model), rs.last_sizes(model), rs.last_source(model)
    cpu = lambda t: None if t is None else t.detach().to(CPU)  # noqa: E731
    return cpu(y), counts, cpu(sizes), cpu(source)


def _spread_threshold(model, x, kind) -> float:
    """The threshold (from a grid) whose final counts differ most across the batch, on the CPU."""
    best = None
    for thr in (0.7, 0.6, 0.5):
        _, counts, _, _ = _forward(model, x, _schedule(model, kind, thr), trace_source=False)
        spread = len(set(counts[:, -1].tolist()))
        if best is None or spread > best[0]:
            best = (spread, thr)
    return best[1]


def _assert_same_run(cpu_out, dev_out, *, rtol, atol):
    y0, c0, s0, src0 = cpu_out
    y1, c1, s1, src1 = dev_out
    assert torch.equal(c0, c1), f"token counts differ: CPU {c0.tolist()} vs {DEVICE} {c1.tolist()}"
    assert (s0 is None) == (s1 is None)
    if s0 is not None:
        assert torch.equal(s0, s1), "token sizes differ"
    if src0 is not None:
        assert torch.equal(src0, src1), "source maps (which patches each token covers) differ"
    assert torch.isfinite(y1).all()
    torch.testing.assert_close(y1, y0, rtol=rtol, atol=atol)


# ---- device == CPU ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("kind", FIXED)
def test_fixed_schedules_match_cpu_float64(pairs, family, kind):
    cpu, dev = pairs(family, torch.float64)
    s = _schedule(cpu, kind)
    x = images(cpu, 3, dtype=torch.float64)
    ref = _forward(cpu, x, s)
    out = _forward(dev, x.to(DEVICE), s)
    _assert_same_run(ref, out, rtol=1e-7, atol=1e-9)
    assert out[1].tolist() == [rs.token_counts(rs.ModelInfo.from_model(cpu), s)] * 3


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("kind", THRESH)
def test_threshold_schedules_match_cpu_and_are_batch_independent(pairs, family, kind):
    """Ragged per-image counts: the device picks the same tokens as the CPU, and a batch of 4 gives
    each image's single-image result on the device."""
    cpu, dev = pairs(family, torch.float64)
    x = images(cpu, 4, dtype=torch.float64)
    s = _schedule(cpu, kind, _spread_threshold(cpu, x, kind))
    ref = _forward(cpu, x, s)
    assert len(set(ref[1][:, -1].tolist())) > 1, "counts must differ across the batch for this test to mean anything"
    out = _forward(dev, x.to(DEVICE), s)
    _assert_same_run(ref, out, rtol=1e-7, atol=1e-9)
    xd = x.to(DEVICE)
    singles = [_forward(dev, xd[i : i + 1], s, trace_source=False) for i in range(len(x))]
    assert torch.equal(out[1], torch.cat([o[1] for o in singles]))
    torch.testing.assert_close(out[0], torch.cat([o[0] for o in singles]), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("kind", ("mixed", "all_ops", "tome"))
def test_float32_matches_cpu(pairs, family, kind):
    cpu, dev = pairs(family, torch.float32)
    s = _schedule(cpu, kind)
    x = images(cpu, 3)
    _assert_same_run(_forward(cpu, x, s), _forward(dev, x.to(DEVICE), s), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fixed_schedules_batch_independent_float32(pairs, family):
    _, dev = pairs(family, torch.float32)
    s = _schedule(dev, "all_ops")
    x = images(dev, 4).to(DEVICE)
    batched = _forward(dev, x, s, trace_source=False)
    singles = [_forward(dev, x[i : i + 1], s, trace_source=False) for i in range(4)]
    assert torch.equal(batched[1], torch.cat([o[1] for o in singles]))
    torch.testing.assert_close(batched[0], torch.cat([o[0] for o in singles]), rtol=1e-4, atol=1e-5)


# ---- remove() and the empty schedule --------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_empty_schedule_and_remove_on_device(pairs, family):
    _, dev = pairs(family, torch.float32)
    x = images(dev, 2).to(DEVICE)
    state, params = module_state(dev), {k: v.clone() for k, v in dev.state_dict().items()}
    with torch.no_grad():
        ref = dev(x)
        with rs.applied(dev, rs.empty_schedule(dev)):
            assert torch.equal(dev(x), ref)  # timm's own Block.forward on the identity fast path
        rs.apply(dev, _schedule(dev, "all_ops"), trace_source=True)
        reduced = dev(x)
        assert reduced.device == x.device and torch.isfinite(reduced).all() and not torch.equal(reduced, ref)
        assert rs.last_source(dev).device == x.device and rs.last_token_counts(dev).device == CPU
        rs.remove(dev)
        assert not rs.is_patched(dev) and module_state(dev) == state
        for k, v in dev.state_dict().items():
            assert v.device == x.device and torch.equal(v, params[k]), k
        assert torch.equal(dev(x), ref)


# ---- float16 / bfloat16 ----------------------------------------------------------------------------------


def _half_supported(dtype: torch.dtype) -> bool:
    if DEVICE.type != "cuda":
        return True
    if dtype == torch.bfloat16:
        return torch.cuda.is_bf16_supported()
    return True


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("kind", FIXED)
def test_half_precision_fixed_schedules(pairs, family, dtype, kind):
    """``model.to(dtype)``: runs, finite, the cost model's counts, sizes in the model's dtype; and
    where it keeps the same tokens as float32 (same source map), as close to float32 as the
    unreduced model is (half precision may reorder near-tied similarities of these tiny random
    models and so keep other tokens: then only the former hold)."""
    if not _half_supported(dtype):
        pytest.skip(f"{dtype} is not supported on {DEVICE}")
    _, dev32 = pairs(family, torch.float32)
    dev = copy.deepcopy(dev32).to(dtype)
    s = _schedule(dev32, kind)
    x = images(dev32, 3).to(DEVICE)
    with torch.no_grad():
        base_err = _rel_err(dev(x.to(dtype)), dev32(x))  # rounding alone, no reduction
    ref, _, _, src32 = _forward(dev32, x, s)
    y, counts, sizes, src = _forward(dev, x.to(dtype), s)
    assert y.dtype == dtype and torch.isfinite(y).all()
    assert sizes is None or (sizes.dtype == dtype and torch.isfinite(sizes).all())
    assert counts.tolist() == [rs.token_counts(rs.ModelInfo.from_model(dev32), s)] * 3
    if torch.equal(src.float(), src32):
        assert _rel_err(y, ref) <= 3 * base_err + 1e-3


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("family", ("test_vit", "distilled", "avg_nocls", "reg4"))
def test_autocast_fixed_and_threshold_schedules(pairs, family, dtype):
    """float32 weights under ``torch.autocast``: the patched blocks run in half precision too."""
    if not _half_supported(dtype):
        pytest.skip(f"{dtype} is not supported on {DEVICE}")
    _, dev = pairs(family, torch.float32)
    info = rs.ModelInfo.from_model(dev)
    x = images(dev, 4).to(DEVICE)
    for kind in ("mixed", "all_ops", "mixed_thr"):
        s = _schedule(dev, kind)
        with torch.autocast(DEVICE.type, dtype=dtype):
            y, counts, sizes, _ = _forward(dev, x, s, trace_source=False)
        assert torch.isfinite(y).all() and (sizes is None or torch.isfinite(sizes).all())
        if not s.has_threshold:
            assert counts.tolist() == [rs.token_counts(info, s)] * 4
        else:  # thresholds: counts may move with the rounding, but stay within the schedule's bounds
            assert (counts >= torch.tensor(rs.token_counts(info, s))).all() and (counts[:, 0] == info.num_tokens).all()
            assert (counts[:, 1:] <= counts[:, :-1]).all()


# ---- the pure ops on padded batches -----------------------------------------------------------------------

PADDED_OPS = {
    "merge": lambda m, i, nv: importance_merge(m, i, 4, num_prefix=1, protect=0.25, n_valid=nv),
    "merge_thr": lambda m, i, nv: importance_merge(m, i, 6, num_prefix=1, protect=0.5, threshold=0.1, n_valid=nv),
    "evit": lambda m, i, nv: importance_prune(i, 5, num_prefix=1, n_valid=nv),
    "prune": lambda m, i, nv: redundancy_prune(m, 3, num_prefix=1, n_valid=nv),
    "prune_thr_all": lambda m, i, nv: redundancy_prune(m, 50, num_prefix=1, threshold=0.2, n_valid=nv),
}


@pytest.mark.parametrize("name", sorted(PADDED_OPS))
@pytest.mark.parametrize("counts", [[23, 15, 9], [12, 23, 20], [3, 23, 2]])
def test_padded_ops_match_cpu(name, counts):
    g = torch.Generator().manual_seed(0)
    N, C, P = 23, 6, 1
    metric = torch.randn(len(counts), N, C, generator=g, dtype=torch.float64)
    imp = torch.rand(len(counts), N - P, generator=g, dtype=torch.float64)
    x = torch.randn(len(counts), N, 5, generator=g, dtype=torch.float64)
    size = torch.ones(len(counts), N, 1, dtype=torch.float64)
    for i, n in enumerate(counts):
        size[i, n:] = 0
    nv = torch.tensor(counts)
    op = PADDED_OPS[name]
    red = op(metric, imp, nv)
    out, new = merge_wavg(red, x, size)
    red_d = op(metric.to(DEVICE), imp.to(DEVICE), nv.to(DEVICE))
    out_d, new_d = merge_wavg(red_d, x.to(DEVICE), size.to(DEVICE))
    assert torch.equal(red_d.n_keep.cpu(), red.n_keep)
    assert torch.equal(red_d.keep_idx.cpu(), red.keep_idx)
    torch.testing.assert_close(out_d.cpu(), out, rtol=1e-12, atol=1e-12)
    assert torch.equal(new_d.cpu(), new)


@pytest.mark.parametrize("prefix", [0, 1, 2, 5])
def test_bipartite_soft_matching_matches_cpu(prefix):
    g = torch.Generator().manual_seed(prefix)
    metric = torch.randn(3, 29, 8, generator=g, dtype=torch.float64)
    x = torch.randn(3, 29, 5, generator=g, dtype=torch.float64)
    red = bipartite_soft_matching(metric, 7, num_prefix=prefix)
    red_d = bipartite_soft_matching(metric.to(DEVICE), 7, num_prefix=prefix)
    out, size = merge_wavg(red, x, None)
    out_d, size_d = merge_wavg(red_d, x.to(DEVICE), None)
    torch.testing.assert_close(out_d.cpu(), out, rtol=1e-12, atol=1e-12)
    assert torch.equal(size_d.cpu(), size)


# ---- what the search and the benchmark use on the device ---------------------------------------------


def test_latency_model_and_measurement_on_device(pairs):
    from rapid_search.tools.measure import parse_device
    from rapid_search.tools.latency import LatencyModel, measure_schedule_ms

    _, dev = pairs("test_vit", torch.float32)
    lat = LatencyModel.measure(dev, device=DEVICE, batch_size=4, repeats=2, calibrate=True, calibrate_repeats=2)
    assert lat.device == str(parse_device(str(DEVICE)))
    assert lat.base_ms is not None and lat.base_ms > 0
    assert 0 < lat.predict_ms(rs.tome_schedule(dev, 8)) <= lat.predict_ms(rs.tome_schedule(dev, 2))
    t = measure_schedule_ms(dev, rs.rapid_schedule(dev, 0.5), device=DEVICE, batch_size=4, repeats=3, warmup=1)
    assert t.repeats == 3 and t.median_ms > 0
    assert not rs.is_patched(dev)


def test_predict_on_device_matches_cpu(pairs):
    from rapid_search.tools.evaluate import predict

    cpu, dev = pairs("test_vit", torch.float64)
    x = images(cpu, 5, dtype=torch.float64)
    s = rs.rapid_schedule(cpu, 0.5, prune_threshold=0.4, merge_threshold=0.3)
    a = predict(cpu, x, s, batch_size=4)
    b = predict(dev, x, s, batch_size=4, device=DEVICE)
    assert torch.equal(a.counts, b.counts) and torch.equal(a.macs, b.macs)
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-7, atol=1e-9)
