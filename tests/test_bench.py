"""Benchmark bookkeeping (rapid_search.tools.bench) on the tiny test_vit and synthetic image folders."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import rapid_search as rs
from rapid_search.tools.bench import (
    METHODS,
    TOME_VARIANTS,
    BenchError,
    add_arguments,
    main,
    markdown_table,
    match_searched,
    method_schedule,
    parse_ratios,
    run_bench,
    schedule_for_spec,
    write_outputs,
)

WNIDS = ("n01440764", "n01443537", "n01484850", "n01491361")  # ImageNet-1k indices 0, 1, 2, 3
RATIOS = (0.9, 0.5, 0.3)  # 30% is below test_vit's cheapest schedules: unreachable for every method


def _folder(root: Path, per_class: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for wnid in WNIDS:
        d = root / wnid
        d.mkdir(parents=True)
        for i in range(per_class):
            h, w = rng.integers(150, 260, size=2)
            Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")).save(d / f"{wnid}_{i}.jpg")
    return root


# one torch thread and the seeded test_vit ``model``: fixtures in conftest.py
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("imgs")
    return _folder(base / "calib", 2, seed=1), _folder(base / "eval", 3, seed=2)


@pytest.fixture(scope="module")
def result(model: torch.nn.Module, folders: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    from rapid_search.tools.data import load_images

    tmp = tmp_path_factory.mktemp("searched")
    searched_file = rs.rapid_schedule(model, 0.5).with_meta(provenance={"method": "rapid-search", "data": str(folders[0])}).save(tmp / "s50.yaml")
    info = rs.ModelInfo.from_model(model)
    searched, notes = match_searched([searched_file], info, RATIOS)
    assert list(searched) == [0.5] and not notes
    imgs = load_images(folders[1], model=model)
    return run_bench(model, imgs.images, imgs.labels, ratios=RATIOS, searched=searched, batch_size=8, warmup=0, repeats=1, n_boot=200)


def test_parse_ratios() -> None:
    assert parse_ratios("90,70,50") == (0.9, 0.7, 0.5)
    assert parse_ratios("0.35, 30%") == (0.35, 0.3)
    with pytest.raises(argparse.ArgumentTypeError):
        parse_ratios("abc")
    with pytest.raises(argparse.ArgumentTypeError):
        parse_ratios("150")


@pytest.mark.parametrize("ratio", [0.9, 0.7, 0.5, 0.4, 0.35, 0.34, 0.3])
def test_every_method_meets_its_ratio_or_is_unreachable(model: torch.nn.Module, ratio: float) -> None:
    info = rs.ModelInfo.from_model(model)
    for method in METHODS[:-1]:
        try:
            s = method_schedule(method, info, ratio)
        except rs.UnreachableBudget:
            assert ratio < 0.4  # test_vit cannot go much below 35%
            continue
        assert rs.schedule_macs(info, s) / info.base_macs <= ratio


def test_variants_share_rapid_counts(model: torch.nn.Module) -> None:
    info = rs.ModelInfo.from_model(model)
    for ratio in (0.9, 0.7, 0.5, 0.4):
        rapid = method_schedule("rapid", info, ratio)
        evit = method_schedule("evit", info, ratio)
        assert rs.token_counts(info, evit) == rs.token_counts(info, rapid)
        assert all(layer.op in ("evit", "none") for layer in evit.layers)
        tofu = method_schedule("tofu", info, ratio)
        assert all(layer.protect in (None, 0.0) for layer in tofu.layers)
        assert [layer.op for layer in tofu.layers] == [layer.op for layer in rapid.layers]
        if "refit" in tofu.provenance:  # RAPID's counts cost more without protection: more tokens removed, never fewer
            assert all(t.r >= r.r for t, r in zip(tofu.layers, rapid.layers))
        else:
            assert rs.token_counts(info, tofu) == rs.token_counts(info, rapid)
    assert schedule_for_spec("rapid@50", model) == method_schedule("rapid", info, 0.5)


def test_rows_bookkeeping(result: dict) -> None:
    rows = result["rows"]
    assert len(rows) == len(RATIOS) * len(METHODS)
    assert {(r["ratio"], r["method"]) for r in rows} == {(q, m) for q in RATIOS for m in METHODS}
    for r in rows:
        if r["status"] == "ok":
            assert r["achieved_ratio"] <= r["ratio"]
            assert r["gflops"] == pytest.approx(r["achieved_ratio"] * result["info"]["base_gflops"], rel=1e-4)
            assert r["gflops"] == pytest.approx(r["analytic_gflops"], rel=1e-9)  # executed == analytic for fixed counts
            assert 0.0 <= r["top1"] <= 1.0 and 0.0 <= r["agreement"] <= 1.0
            assert len(r["pred"]) == result["setup"]["images"] == 12
            assert r["images_per_s"] > 0 and r["speedup"] > 0
            assert r["speedup_of_ideal"] == pytest.approx(r["speedup"] * r["achieved_ratio"], rel=1e-3)
        else:
            assert r["status"] in ("unreachable", "not run")
            assert "top1" not in r and "gflops" not in r  # no number at another cost
            assert r["reason"]
    by = {(r["ratio"], r["method"]): r for r in rows}
    assert all(by[(0.3, m)]["status"] == "unreachable" for m in METHODS if m != "searched")
    assert by[(0.9, "searched")]["status"] == "not run"
    assert by[(0.5, "searched")]["status"] == "ok"
    # the searched file holds the hand-set schedule: the same predictions, evaluated once
    assert by[(0.5, "searched")]["pred"] == by[(0.5, "rapid")]["pred"]
    base = result["base"]
    assert base["agreement"] == 1.0 and base["ratio"] == 1.0 and len(result["labels"]) == 12


def test_comparisons_against_best_tome(result: dict) -> None:
    comps = {(c["ratio"], c["method"]): c for c in result["comparisons"] if c["kind"] == "vs-best-tome"}
    assert set(comps) == {(0.9, "rapid"), (0.5, "rapid"), (0.5, "searched")}
    pairs = {(c["ratio"], c["method"], c["reference"]) for c in result["comparisons"] if c["kind"] == "pair"}
    assert pairs == {(q, "rapid", m) for q in (0.9, 0.5) for m in ("tofu", "evit", "unreduced")} | {
        (0.5, "searched", "rapid"),
        (0.5, "searched", "unreduced"),
    }
    labels = np.asarray(result["labels"])
    by = {(r["ratio"], r["method"]): r for r in result["rows"]}
    for (ratio, method), c in comps.items():
        ref = by[(ratio, c["reference"])]
        assert c["reference"] in TOME_VARIANTS
        assert all(ref["top1"] >= by[(ratio, m)]["top1"] for m in TOME_VARIANTS)
        a = np.asarray(by[(ratio, method)]["pred"]) == labels
        b = np.asarray(ref["pred"]) == labels
        assert c["diff"] == pytest.approx(a.mean() - b.mean())
        assert (c["b"], c["c"]) == (int((a & ~b).sum()), int((~a & b).sum()))
        assert c["ci_low"] <= c["diff"] <= c["ci_high"] and 0.0 <= c["p_value"] <= 1.0
    # what the reduction loses: against the unreduced predictions, on the true labels
    base = np.asarray(result["base"]["pred"]) == labels
    for c in (c for c in result["comparisons"] if c["reference"] == "unreduced"):
        a = np.asarray(by[(c["ratio"], c["method"])]["pred"]) == labels
        assert c["diff"] == pytest.approx(a.mean() - base.mean())
        assert (c["b"], c["c"]) == (int((a & ~base).sum()), int((~a & base).sum()))


def test_writers(result: dict, tmp_path: Path) -> None:
    paths = write_outputs(result, tmp_path / "out")
    md = paths["table"].read_text()
    assert "unreachable" in md and "not run" in md and "ToMe (constant r)" in md and "| 100% | **unreduced**" in md
    assert md.count("\n| 30% |") == len(METHODS)  # unreachable rows, no pairs at 30%
    assert "RAPID (hand-set) vs ToFu-style" in md and "RAPID (hand-set) vs unreduced" in md
    data = json.loads(paths["json"].read_text())
    assert data["rows"] == result["rows"]
    with Image.open(paths["plot"]) as im:
        assert im.format == "PNG" and im.size[0] > 500 and im.size[1] > 400
    assert markdown_table(result) == md


def test_match_searched_tolerance(model: torch.nn.Module, tmp_path: Path) -> None:
    info = rs.ModelInfo.from_model(model)
    s = rs.rapid_schedule(model, 0.5)
    p = s.save(tmp_path / "a.yaml")
    ach = s.budget.achieved["ratio"]
    chosen, notes = match_searched([p], info, (0.9, round(ach - 0.015, 4)))
    assert chosen == {} and "matches no benchmark ratio" in notes[0]
    near = round(ach + 0.005, 4)
    chosen, _ = match_searched([p], info, (0.9, near))  # within 1 point
    assert list(chosen) == [near]


def test_cli_main(folders: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    calib, data = folders
    p = argparse.ArgumentParser()
    add_arguments(p)
    common = ["--model", "test_vit", "--no-pretrained", "--data", str(data), "--ratios", "50", "--batch-size", "8"]
    common += ["--repeats", "1", "--time-limit", "0", "--warmup", "0", "--n-boot", "100", "--quiet"]
    args = p.parse_args(common + ["--calib", str(calib), "--out-dir", str(tmp_path / "b")])
    assert main(args) == 0
    for name in ("table.md", "results.json", "pareto.png"):
        assert (tmp_path / "b" / name).is_file()
    data_json = json.loads((tmp_path / "b" / "results.json").read_text())
    assert "--calib" in data_json["setup"]["command"] and data_json["setup"]["calib_images"] == 8
    # calibrating on the evaluation images is refused
    with pytest.raises(BenchError, match="same folder"):
        main(p.parse_args(common + ["--calib", str(data)]))
    model = timm.create_model("test_vit")
    bad = rs.rapid_schedule(model, 0.5).with_meta(provenance={"method": "rapid-search", "data": str(data)}).save(tmp_path / "bad.yaml")
    with pytest.raises(BenchError, match="calibrated on the evaluation folder"):
        main(p.parse_args(common + ["--searched", str(bad)]))


def test_cli_repeats_0_skips_timing_and_dtype(folders: tuple[Path, Path], tmp_path: Path) -> None:
    """--repeats 0 evaluates without timing (no KeyError); --dtype bfloat16 runs and is recorded."""
    _, data = folders
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(
        ["--model", "test_vit", "--no-pretrained", "--data", str(data), "--ratios", "50", "--batch-size", "8", "--repeats", "0",
         "--n-boot", "100", "--quiet", "--dtype", "bfloat16", "--out-dir", str(tmp_path / "b")]
    )
    assert main(args) == 0
    res = json.loads((tmp_path / "b" / "results.json").read_text())
    assert res["setup"]["dtype"] == "bfloat16" and "--dtype bfloat16" in res["setup"]["command"]
    assert all("speedup" not in r for r in res["rows"]) and "median_ms" not in res["base"]
    assert any(r["status"] == "ok" and r["top1"] is not None for r in res["rows"])
    assert "| — | — |" in (tmp_path / "b" / "table.md").read_text()


def test_timing_flags() -> None:
    from rapid_search.tools.bench import median_ci, timing_flag
    from rapid_search.tools.measure import Timing

    base = Timing.from_times([10.0, 10.1, 9.9, 10.0, 10.05, 9.95])
    assert median_ci([1.0, 2.0]) == float("inf") and median_ci([5.0] * 6) == 0.0
    assert timing_flag(Timing.from_times([5.0, 5.05, 4.95, 5.0, 5.02, 4.98]), base, 2.0) is None  # at the ideal
    assert timing_flag(Timing.from_times([4.0, 4.05, 3.95, 4.0, 4.02, 3.98]), base, 2.0) == "above ideal"
    assert timing_flag(Timing.from_times([5.0, 9.0, 3.0, 5.0, 7.0, 4.0]), base, 2.0) == "spread too wide"
    assert timing_flag(base, Timing.from_times([10.0, 20.0, 5.0, 12.0, 8.0, 15.0]), None) == "spread too wide"
