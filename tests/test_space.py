"""Search space: validation, sampling and projection onto the budget."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import optuna
import pytest
import timm

from rapid_search import model_info, schedule_macs
from rapid_search.search.space import DEFAULT_SPACE, SearchSpace, SearchSpaceError, layers_for, project
from rapid_search.search.study import cheapest


@pytest.fixture(scope="module")
def info():
    return model_info(timm.create_model("deit_tiny_patch16_224"))


def test_default_space_loads_and_is_documented():
    space = SearchSpace.load()
    assert space.switch.low == 0.0 and space.switch.high == 1.0
    assert space.prune_threshold.modes == ("off", "on")
    text = DEFAULT_SPACE.read_text()
    assert text.count("#") > 10  # every choice is explained in the file


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "space.yaml"
    p.write_text(text)
    return p


GOOD = DEFAULT_SPACE.read_text()
SPAN_LINE = "prune_span: {low: 0.0, high: 1.0}\n"


@pytest.mark.parametrize(
    "edit, needle",
    [
        (("format: rapid-search-space/v1", "format: v0"), "format"),
        (("decay: {low: -0.9, high: 0.9}", "decay: {low: 0.9, high: -0.9}"), "decay"),
        (("decay: {low: -0.9, high: 0.9}", "decay: {low: -0.9}"), "decay"),
        (("decay: {low: -0.9, high: 0.9}", "decay: {low: -0.9, high: 0.9, step: 1}"), "unknown key"),
        (("protect: {low: 0.0, high: 0.6}", "protect: {low: 0.0, high: 1.5}"), "protect"),
        (("protect: {low: 0.0, high: 0.6}", "protect: fast"), "protect"),
        (("prune_threshold: {modes: [off, on], low: 0.5, high: 0.98}", "prune_threshold: {modes: [maybe], low: 0.5, high: 0.98}"), "modes"),
        (("merge_threshold: {modes: [off, on], low: 0.3, high: 0.95}", "merge_threshold: 3.0"), "merge_threshold"),
        (("switch: {low: 0.0, high: 1.0}", "switchh: {low: 0.0, high: 1.0}"), "unknown key"),
        (("prune_weight: {low: 0.25, high: 4.0, log: true}", "prune_weight: {low: 0.0, high: 4.0, log: true}"), "prune_weight"),
    ],
)
def test_invalid_spaces_name_the_field(tmp_path, edit, needle):
    old, new = edit
    assert old in GOOD
    with pytest.raises(SearchSpaceError, match=needle):
        SearchSpace.load(_write(tmp_path, GOOD.replace(old, new)))


def test_malformed_and_missing_files(tmp_path):
    with pytest.raises(SearchSpaceError, match="not valid YAML"):
        SearchSpace.load(_write(tmp_path, "switch: {low: [0\n"))
    with pytest.raises(SearchSpaceError, match="does not exist"):
        SearchSpace.load(tmp_path / "nope.yaml")
    with pytest.raises(SearchSpaceError, match="mapping"):
        SearchSpace.load(_write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(SearchSpaceError, match="missing"):
        SearchSpace.load(_write(tmp_path, "format: rapid-search-space/v1\nswitch: 0.5\n"))


def test_fixed_values_and_fingerprint(tmp_path):
    text = GOOD.replace("protect: {low: 0.0, high: 0.6}", "protect: 0.3").replace(
        "prune_threshold: {modes: [off, on], low: 0.5, high: 0.98}", "prune_threshold: off"
    )
    space = SearchSpace.load(_write(tmp_path, text))
    assert space.protect.fixed and space.protect.low == 0.3
    assert space.prune_threshold.modes == ("off",)
    assert space.fingerprint() != SearchSpace.load().fingerprint()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    t = study.ask()
    shape = space.suggest(t, 12)
    assert shape["protect"] == 0.3 and shape["prune_threshold"] is None
    assert "protect" not in t.params


def test_merged_norm_fixed_searched_or_refused(tmp_path, info):
    """The default space fixes MLERP (``max``); a list searches it; absent means the default."""
    assert SearchSpace.load().merged_norm == ("max",)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    t = study.ask()
    shape = SearchSpace.load().suggest(t, 12)
    assert shape["merged_norm"] == "max" and "merged_norm" not in t.params
    assert {l.merged_norm for l in project(info, shape, 0.5 * info.base_macs)[0] if l.op == "merge"} == {"max"}
    both = SearchSpace.load(_write(tmp_path, GOOD.replace("merged_norm: max", "merged_norm: [mean, max]")))
    seen = set()
    for _ in range(12):
        t = study.ask()
        seen.add(both.suggest(t, 12)["merged_norm"])
        assert t.params["merged_norm"] in ("mean", "max")
    assert seen == {"mean", "max"}
    mean = SearchSpace.load(_write(tmp_path, GOOD.replace("merged_norm: max", "merged_norm: mean")))
    assert len({s.fingerprint() for s in (SearchSpace.load(), both, mean)}) == 3
    absent = SearchSpace.load(_write(tmp_path, GOOD.replace("merged_norm: max", "")))
    assert absent.merged_norm == ("max",) and absent.fingerprint() == SearchSpace.load().fingerprint()
    # a study made before merged_norm and similarity existed (plain averages, keys) is joined with merged_norm: mean, similarity: keys
    before = SearchSpace.load(
        _write(tmp_path, GOOD.replace("merged_norm: max", "merged_norm: mean").replace("similarity: tokens", "similarity: keys").replace(SPAN_LINE, ""))
    )
    old = {k: getattr(before, k).__dict__ for k in ("switch", "prune_weight", "decay", "protect", "prune_threshold", "merge_threshold")}
    assert before.fingerprint() == hashlib.sha256(json.dumps(old, sort_keys=True, default=list).encode()).hexdigest()[:16]
    assert dataclasses.replace(mean, merged_norm=("max",)).fingerprint() == SearchSpace.load().fingerprint()
    for bad in ("avg", "[max, max]", "[]", "1"):
        with pytest.raises(SearchSpaceError, match="merged_norm .* must be one of mean, max"):
            SearchSpace.load(_write(tmp_path, GOOD.replace("merged_norm: max", f"merged_norm: {bad}")))


def test_similarity_fixed_searched_or_refused(tmp_path, info):
    """The default space compares prune and merge layers' tokens by the residual stream; a list searches it."""
    assert SearchSpace.load().similarity == ("tokens",)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    t = study.ask()
    shape = SearchSpace.load().suggest(t, 12)
    assert shape["similarity"] == "tokens" and "similarity" not in t.params
    layers = project(info, shape, 0.5 * info.base_macs)[0]
    assert {l.similarity for l in layers if l.op in ("prune", "merge")} == {"tokens"}
    both = SearchSpace.load(_write(tmp_path, GOOD.replace("similarity: tokens", "similarity: [keys, tokens]")))
    seen = {both.suggest(study.ask(), 12)["similarity"] for _ in range(12)}
    assert seen == {"keys", "tokens"}
    keys = SearchSpace.load(_write(tmp_path, GOOD.replace("similarity: tokens", "similarity: keys")))
    assert len({s.fingerprint() for s in (SearchSpace.load(), both, keys)}) == 3
    assert {l.similarity for l in project(info, keys.suggest(study.ask(), 12), 0.5 * info.base_macs)[0] if l.reduces} == {"keys"}
    absent = SearchSpace.load(_write(tmp_path, GOOD.replace("similarity: tokens", "")))
    assert absent.similarity == ("tokens",) and absent.fingerprint() == SearchSpace.load().fingerprint()
    for bad in ("values", "[keys, keys]", "[]", "1"):
        with pytest.raises(SearchSpaceError, match="similarity .* must be one of keys, tokens"):
            SearchSpace.load(_write(tmp_path, GOOD.replace("similarity: tokens", f"similarity: {bad}")))


@pytest.mark.parametrize("ratio", [0.7, 0.5, 0.35])
def test_projection_meets_and_uses_the_budget(info, ratio):
    space = SearchSpace.load().without_thresholds()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    target = ratio * info.base_macs
    met = 0
    for _ in range(25):
        shape = space.suggest(study.ask(), info.depth)
        res = project(info, shape, target)
        if res is None:
            continue
        layers, cost = res
        met += 1
        assert cost == schedule_macs(info, layers) <= target
        # the budget is used: one more token anywhere would exceed it, or the shape is saturated
        assert cost >= 0.97 * target or cost == schedule_macs(info, layers_for(info, shape, 1e6))
    assert met >= 15


def test_cheapest_ratio_is_a_floor(info):
    space = SearchSpace.load()
    floor, _ = cheapest(info, space)
    assert 0.05 < floor < 0.35
    shape = {"switch": 0, "prune_weight": 1.0, "decay": 0.0, "protect": 0.0}
    assert project(info, shape, (floor - 0.01) * info.base_macs) is None


def test_a_shape_may_give_its_own_per_block_weights(info):
    """``weights`` in a shape replace the linear profile (benchmarks/free_counts.py searches them)."""
    w = [0.0] * info.depth
    w[2], w[7] = 3.0, 1.0  # reduce in two blocks only, three times as many in the first
    shape = {"switch": 3, "protect": 0.0, "weights": w}
    layers, cost = project(info, shape, 0.8 * info.base_macs)
    r = [l.r if l.reduces else 0 for l in layers]
    assert [i for i, c in enumerate(r) if c] == [2, 7] and cost <= 0.8 * info.base_macs
    assert abs(r[2] - 3 * r[7]) <= 2  # proportional up to the rounding and the give-back of one token per block
    assert [l.op for l in layers][2] == "prune" and layers[7].op == "merge"
    with pytest.raises(SearchSpaceError, match="one weight per block"):
        project(info, {**shape, "weights": w[:-1]}, 0.8 * info.base_macs)


def test_prune_span_searched_absent_or_refused(tmp_path, info):
    """``prune_span``: the default space searches where pruning stops; blocks from there to the switch
    reduce nothing; a space without the key prunes in every block before the switch, as before it existed."""
    space = SearchSpace.load()
    assert (space.prune_span.low, space.prune_span.high) == (0.0, 1.0)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(40):
        t = study.ask()
        shape = space.suggest(t, 12)
        assert 0.0 <= t.params["prune_span"] <= 1.0
        fit = project(info, {**shape, "prune_threshold": None, "merge_threshold": None}, 0.7 * info.base_macs)
        if fit is None:  # e.g. switch at the end and no prune block: nothing reduces
            continue
        layers = fit[0]
        stop = round(shape["prune_span"] * shape["switch"])
        ops = [l.op for l in layers]
        assert all(o in ("prune", "none") for o in ops[:stop]) and set(ops[stop : shape["switch"]]) <= {"none"}
        assert all(o in ("merge", "none") for o in ops[shape["switch"] :])
        seen.add(stop < shape["switch"])
    assert seen == {True, False}  # both gaps and no gaps are drawn
    absent = SearchSpace.load(_write(tmp_path, GOOD.replace(SPAN_LINE, "")))
    assert absent.prune_span == dataclasses.replace(space.prune_span, low=1.0, high=1.0)
    assert absent.fingerprint() != space.fingerprint()
    t = study.ask()
    shape = absent.suggest(t, 12)
    assert "prune_span" not in t.params and shape["prune_span"] == 1.0
    shape.update(switch=3, decay=0.0, prune_weight=1.0, prune_threshold=None, merge_threshold=None)
    assert [l.op for l in layers_for(info, shape, 5.0)][:4] == ["prune", "prune", "prune", "merge"]
    for bad in ("{low: 0.0, high: 1.5}", "{low: -0.1, high: 1.0}", "often"):
        with pytest.raises(SearchSpaceError, match="prune_span"):
            SearchSpace.load(_write(tmp_path, GOOD.replace(SPAN_LINE, f"prune_span: {bad}\n")))


@pytest.mark.parametrize("ratio, prune_blocks", [(0.7, 1), (0.5, 1), (0.35, 1), (0.25, 2), (0.17, 3)])
def test_hand_set_warm_start_is_the_hand_set_schedule(info, ratio, prune_blocks):
    """The search's hand-set warm start (trial parameters) projects onto exactly ``rapid_schedule``,
    also below one prune block's reach, where both take more prune blocks."""
    from rapid_search import rapid_schedule
    from rapid_search.runtime.presets import make_schedule
    from rapid_search.search.study import hand_params, project_hand_set

    shape = {**hand_params(info), "prune_threshold": None, "merge_threshold": None}
    (layers, _), used = project_hand_set(info, shape, ratio * info.base_macs)
    hand = rapid_schedule(info, ratio)
    assert make_schedule(info, layers, method="x").layers == hand.layers
    assert hand.provenance["prune_blocks"] == prune_blocks == round(used["prune_span"] * used["switch"])
    assert [l.op for l in hand.layers][: prune_blocks + 1] == ["prune"] * prune_blocks + ["none" if prune_blocks < 3 else "merge"]
    if prune_blocks > 1:
        assert project(info, shape, ratio * info.base_macs) is None  # one prune block alone cannot reach it
    assert project_hand_set(info, shape, 0.1 * info.base_macs)[0] is None  # below even the widest: none
