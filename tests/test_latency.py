"""Latency prediction: measurement on a tiny ViT, monotone predictions, real timing."""

from __future__ import annotations

import pytest

import rapid_search as rs
from rapid_search import LayerSpec
from rapid_search.tools.latency import LatencyModel, LatencyModelError, _fit_nonneg_quadratic, _fixed_and_per_token, measure_schedule_ms

from helpers import FAMILIES


@pytest.fixture(scope="module")
def model():
    return FAMILIES["test_vit"]()


@pytest.fixture(scope="module")
def lat(model):
    return LatencyModel.measure(model, device="cpu", batch_size=4, repeats=2, warmup=1, grid_points=5, calibrate_repeats=2)


def test_measure_fills_every_part(lat, model):
    info = rs.ModelInfo.from_model(model)
    assert lat.info == info and lat.device == "cpu" and lat.batch_size == 4 and lat.dtype == "float32"
    assert lat.grid[0] == info.num_prefix_tokens + 1 and lat.grid[-1] == info.num_tokens and len(lat.grid) == 5
    assert all(v > 0 for v in lat.attn_ms + lat.mlp_ms)
    assert all(c >= 0 for c in lat.attn_fit + lat.mlp_fit)
    assert set(lat.op_overhead_ms) == {"prune", "merge", "tome", "evit"}
    assert all(len(v) == 2 and min(v) >= 0 for v in [*lat.op_overhead_ms.values(), lat.sized_overhead_ms])  # (fixed, per token)
    assert lat.probe_tokens[0] == info.num_tokens > lat.probe_tokens[1] > info.num_prefix_tokens + 1
    assert lat.stem_ms > 0
    assert lat.base_ms is not None and lat.base_ms > 0
    assert lat.predict_ms(None) == pytest.approx(lat.base_ms)  # calibrated to the measured unreduced forward


def test_fewer_tokens_predict_less_time(lat, model):
    preds = [lat.predict_ms(rs.tome_schedule(model, r)) for r in (1, 3, 6, 10)]  # same ops, fewer tokens each time
    assert all(a >= b for a, b in zip(preds, preds[1:]))
    assert preds[0] > preds[-1] or lat.attn_fit[1:] == lat.mlp_fit[1:] == (0.0, 0.0)
    r7, r4 = rs.rapid_schedule(model, 0.7), rs.rapid_schedule(model, 0.4)
    if [layer.op for layer in r7.layers] == [layer.op for layer in r4.layers]:
        assert lat.predict_ms(r4) <= lat.predict_ms(r7)
    # lists of LayerSpec (as the search's projection passes them) work as well as schedules
    assert lat.predict_ms(list(r4.layers)) == lat.predict_ms(r4)


def test_prediction_formula():
    info = rs.ModelInfo.from_model(FAMILIES["test_vit"]())
    N, L = info.num_tokens, info.depth
    lat = LatencyModel(
        info=info, device="cpu", batch_size=1, dtype="float32", grid=[2, N], attn_ms=[1.0, 2.0], mlp_ms=[1.0, 2.0],
        attn_fit=(1.0, 0.01, 0.0), mlp_fit=(0.5, 0.02, 0.0), stem_ms=3.0,
        op_overhead_ms={"prune": (0.4, 0.1 / N), "merge": (0.7, 0.0), "tome": (0.0, 0.3 / N), "evit": (0.2, 0.0)},
        sized_overhead_ms=(0.05, 0.05 / N), probe_tokens=(N, N // 2), scale=2.0,
    )  # fmt: skip
    block = 1.0 + 0.01 * N + 0.5 + 0.02 * N
    assert lat.predict_ms(None, calibrated=False) == pytest.approx(3.0 + L * block)
    assert lat.predict_ms(None) == pytest.approx(2 * (3.0 + L * block))
    # one tome block first: it and every later block run with token sizes in flight
    layers = [LayerSpec("tome", 10)] + [LayerSpec()] * (L - 1)
    n1 = N - 10
    want = 3.0 + (1.0 + 0.01 * N + 0.5 + 0.02 * n1 + 0.3) + (L - 1) * (1.0 + 0.01 * n1 + 0.5 + 0.02 * n1 + 0.05 + 0.05 * n1 / N)
    assert lat.predict_ms(layers, calibrated=False) == pytest.approx(want)
    # a prune block: no sizes in flight afterwards
    layers = [LayerSpec("prune", 10)] + [LayerSpec()] * (L - 1)
    want = 3.0 + (1.0 + 0.01 * N + 0.5 + 0.02 * n1 + 0.5) + (L - 1) * (1.0 + 0.01 * n1 + 0.5 + 0.02 * n1)
    assert lat.predict_ms(layers, calibrated=False) == pytest.approx(want)
    with pytest.raises(LatencyModelError, match="one entry per block"):
        lat.predict_ms([LayerSpec()] * (L + 1))


def test_nonneg_fit_is_monotone_on_noisy_data():
    c = _fit_nonneg_quadratic([2, 30, 60, 100], [5.0, 4.0, 9.0, 8.5])  # noise would make a free fit dip
    assert all(v >= 0 for v in c)
    c = _fit_nonneg_quadratic([1, 2, 3, 4], [3.0, 5.0, 7.0, 9.0])
    assert c == pytest.approx((1.0, 2.0, 0.0), abs=1e-9)


def test_overhead_is_split_into_fixed_and_per_token():
    assert _fixed_and_per_token((200, 100), (3.0, 2.0)) == pytest.approx((1.0, 0.01))  # 1 ms + 0.01 ms per token
    assert _fixed_and_per_token((200, 100), (2.0, 2.0)) == pytest.approx((2.0, 0.0))  # batch 1: all fixed cost
    assert _fixed_and_per_token((200, 100), (2.0, 0.0)) == pytest.approx((0.0, 0.01))  # all per token
    assert _fixed_and_per_token((200, 100), (1.5, 2.0)) == pytest.approx((1.5, 0.0))  # noise: slope < 0
    assert _fixed_and_per_token((200, 100), (4.0, 0.5)) == pytest.approx((0.0, 0.02))  # never a negative fixed cost
    assert _fixed_and_per_token((200, 100), (-0.1, -0.2)) == (0.0, 0.0)


def test_measure_schedule_ms(model):
    base = measure_schedule_ms(model, None, device="cpu", batch_size=2, repeats=3, warmup=1)
    red = measure_schedule_ms(model, rs.rapid_schedule(model, 0.5), device="cpu", batch_size=2, repeats=3, warmup=1)
    assert base.median_ms > 0 and red.median_ms > 0 and red.repeats == 3 and red.batch_size == 2
    assert not rs.is_patched(model)  # the schedule was removed again


def test_refuses_a_patched_model(model):
    with rs.applied(model, rs.tome_schedule(model, 2)):
        with pytest.raises(LatencyModelError, match="remove"):
            LatencyModel.measure(model, device="cpu", batch_size=1, repeats=1)
        with pytest.raises(LatencyModelError, match="remove"):
            measure_schedule_ms(model, None, device="cpu", batch_size=1, repeats=1)
