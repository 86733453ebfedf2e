"""The schedule contract: YAML round trip, atomic save, validation messages, as_schedule forms."""

from __future__ import annotations

import copy
import os
import stat
from dataclasses import replace

import pytest
import timm
import torch
import yaml

import rapid_search as rs
from rapid_search import LayerSpec, Schedule, ScheduleError
from rapid_search.runtime.schedule import FORMAT
from rapid_search.runtime.presets import make_schedule


@pytest.fixture(scope="module")
def model():
    return timm.create_model("test_vit").eval()  # depth 6, 101 tokens, 1 prefix token


@pytest.fixture(scope="module")
def info(model):
    return rs.ModelInfo.from_model(model)


@pytest.fixture(scope="module")
def sched(model):
    """A schedule using every op, thresholds, budget, scores and provenance."""
    layers = [
        LayerSpec("prune", 20, 0.75),
        LayerSpec("prune", 10),
        LayerSpec("merge", 8, 0.125, 0.25),
        LayerSpec("merge", 6, None, 0.5, "max"),
        LayerSpec("evit", 4),
        LayerSpec(),
    ]
    s = make_schedule(rs.ModelInfo.from_model(model), layers, method="hand", ratio=0.5, note="x")
    return s.with_meta(scores={"calib_top1": 0.7913, "kl": 1e-3, "n": 64})


def _base(model) -> dict:
    """Plain data for a valid fixed-count schedule of ``model`` (mutated by the error tests)."""
    return rs.tome_for_ratio(model, 0.8).to_dict()


def _err(d) -> str:
    with pytest.raises(ScheduleError) as e:
        Schedule.from_dict(d)
    return str(e.value)


# ---- round trip -------------------------------------------------------------------------------


def test_yaml_round_trip_lossless(sched):
    text = sched.to_yaml()
    back = Schedule.from_yaml(text)
    assert back == sched
    assert back.to_yaml() == text  # byte-identical second dump
    assert yaml.safe_load(text)["format"] == FORMAT


@pytest.mark.parametrize(
    "make",
    [
        lambda m: rs.rapid_schedule(m, 0.5),
        lambda m: rs.rapid_schedule(m, 0.6, prune_threshold=0.6, merge_threshold=-0.25),
        lambda m: rs.tome_for_ratio(m, 0.5, inflect=-1.0),
        lambda m: rs.variant_schedule(rs.rapid_schedule(m, 0.5), m, kind="tofu"),
        lambda m: rs.variant_schedule(rs.rapid_schedule(m, 0.5), m, kind="evit"),
        lambda m: rs.empty_schedule(m),
    ],
)
def test_file_round_trip_presets(model, make, tmp_path):
    s = make(model)
    p = s.save(tmp_path / "s.yaml")
    first = p.read_bytes()
    back = Schedule.load(p)
    assert back == s
    back.save(p)
    assert p.read_bytes() == first
    assert rs.load_schedule(p) == s


def test_round_trip_extreme_floats(model):
    s = replace(
        rs.tome_schedule(model, 2),
        layers=(LayerSpec("prune", 3, 0.1 + 0.2),) + (LayerSpec("merge", 2, -1.0, 0.0),) + (LayerSpec(),) * 4,
    ).validate()
    back = Schedule.from_yaml(s.to_yaml())
    assert back == s and back.layers[0].threshold == 0.1 + 0.2  # repr-exact floats


# ---- atomic save ------------------------------------------------------------------------------


def test_save_leaves_no_temp_files(sched, tmp_path):
    p = sched.save(tmp_path / "sub" / "dir" / "s.yaml")  # parents created
    assert sorted(x.name for x in p.parent.iterdir()) == ["s.yaml"]
    sched.save(p)  # overwrite
    assert sorted(x.name for x in p.parent.iterdir()) == ["s.yaml"]


@pytest.mark.parametrize("fail", ["replace", "fsync"])
def test_failed_save_keeps_old_file(sched, model, tmp_path, monkeypatch, fail):
    p = tmp_path / "s.yaml"
    old = rs.empty_schedule(model)
    old.save(p)
    before = p.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(f"rapid_search.runtime.schedule.os.{fail}", boom)
    with pytest.raises(OSError, match="disk full"):
        sched.save(p)
    monkeypatch.undo()
    assert p.read_bytes() == before
    assert Schedule.load(p) == old
    assert sorted(x.name for x in tmp_path.iterdir()) == ["s.yaml"]  # temp file cleaned up


def test_saved_file_has_default_permissions(sched, tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    p = sched.save(tmp_path / "s.yaml")
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask


# ---- validation: every error names its field ---------------------------------------------------


def test_valid_base_loads(model):
    assert Schedule.from_dict(_base(model)) == rs.tome_for_ratio(model, 0.8)


def test_unknown_top_level_key(model):
    d = _base(model)
    d["colour"] = "red"
    msg = _err(d)
    assert "schedule" in msg and "colour" in msg


def test_unknown_model_key(model):
    d = _base(model)
    d["model"]["patch_size"] = 16
    msg = _err(d)
    assert msg.startswith("model") and "patch_size" in msg


def test_unknown_layer_key(model):
    d = _base(model)
    d["layers"][2]["ratio"] = 0.5
    msg = _err(d)
    assert "layers[2]" in msg and "ratio" in msg


def test_missing_key(model):
    d = _base(model)
    del d["model"]["depth"]
    assert "depth" in _err(d)
    d = _base(model)
    del d["layers"][1]["r"]
    assert "layers[1].r" in _err(d)


@pytest.mark.parametrize("bad", ["3", 2.5, True, None, [3]])
def test_r_wrong_type(model, bad):
    d = _base(model)
    d["layers"][1]["r"] = bad
    msg = _err(d)
    assert "layers[1].r" in msg and "whole number" in msg


def test_r_negative(model):
    d = _base(model)
    d["layers"][3]["r"] = -2
    msg = _err(d)
    assert "layers[3].r" in msg and "negative" in msg


def test_r_on_none(model):
    d = _base(model)
    d["layers"][0] = {"block": 0, "op": "none", "r": 4}
    assert "layers[0]" in _err(d)


@pytest.mark.parametrize("bad", ["squash", "Tome", 3, None])
def test_unknown_op(model, bad):
    d = _base(model)
    d["layers"][4]["op"] = bad
    msg = _err(d)
    assert "layers[4].op" in msg


@pytest.mark.parametrize("bad", [1.5, -1.01, float("nan"), float("inf"), "0.5", True])
def test_threshold_out_of_range_or_wrong_type(model, bad):
    d = _base(model)
    d["layers"][0] = {"block": 0, "op": "prune", "r": 3, "threshold": bad}
    msg = _err(d)
    assert "layers[0].threshold" in msg


@pytest.mark.parametrize("thr", [-1, -1.0, 1, 1.0, 0])
def test_threshold_bounds_inclusive(model, thr):
    d = _base(model)
    d["layers"] = [{"block": 0, "op": "prune", "r": 3, "threshold": thr}] + [{"block": i, "op": "none"} for i in range(1, 6)]
    s = Schedule.from_dict(d)
    assert s.layers[0].threshold == thr and isinstance(s.layers[0].threshold, float)


@pytest.mark.parametrize("op", ["tome", "evit", "none"])
def test_threshold_on_op_without_threshold(model, op):
    d = _base(model)
    d["layers"][5] = {"block": 5, "op": op, "r": 0 if op == "none" else 2, "threshold": 0.5}
    msg = _err(d)
    assert "layers[5].threshold" in msg and op in msg


def test_protect_missing_for_merge(model):
    d = _base(model)
    d["layers"][2] = {"block": 2, "op": "merge", "r": 3, "threshold": None}
    msg = _err(d)
    assert "layers[2].protect" in msg and "required" in msg


@pytest.mark.parametrize("bad", [1.0, 1.5, -0.1, "0.5", float("nan")])
def test_protect_out_of_range(model, bad):
    d = _base(model)
    d["layers"][2] = {"block": 2, "op": "merge", "r": 3, "threshold": None, "protect": bad}
    assert "layers[2].protect" in _err(d)


@pytest.mark.parametrize("op", ["prune", "tome", "evit"])
def test_protect_on_other_op(model, op):
    d = _base(model)
    d["layers"][2] = {"block": 2, "op": op, "r": 3, "protect": 0.25}
    msg = _err(d)
    assert "layers[2].protect" in msg and op in msg


def test_merged_norm_is_written_only_when_set(model, sched):
    """``merged_norm: max`` round-trips; a merge layer without the key (every file written before it
    existed) reads as ``mean`` and is written back without it, byte for byte."""
    text = sched.to_yaml()
    assert text.count("merged_norm: max") == 1 and "merged_norm: mean" not in text
    assert [l.merged_norm for l in Schedule.from_yaml(text).layers] == ["mean", "mean", "mean", "max", "mean", "mean"]
    d = _base(model)
    d["layers"][2] = {"block": 2, "op": "merge", "r": 3, "threshold": None, "protect": 0.25}
    s = Schedule.from_dict(d)
    assert s.layers[2].merged_norm == "mean" and s.to_dict()["layers"][2] == d["layers"][2]
    assert {l.merged_norm for l in rs.rapid_schedule(model, 0.5).layers if l.op == "merge"} == {"max"}  # the hand-set default
    assert {l.merged_norm for l in rs.rapid_schedule(model, 0.5, merged_norm="mean").layers} == {"mean"}
    shown = sched.describe().splitlines()
    assert shown[3].endswith("protect=0.50 merged_norm=max") and "merged_norm" not in shown[2]


@pytest.mark.parametrize("bad", ["avg", "MAX", 1, None, True])
def test_merged_norm_unknown_value(model, bad):
    d = _base(model)
    d["layers"][2] = {"block": 2, "op": "merge", "r": 3, "threshold": None, "protect": 0.25, "merged_norm": bad}
    msg = _err(d)
    assert "layers[2].merged_norm" in msg and "mean, max" in msg


@pytest.mark.parametrize("op", ["prune", "tome", "evit", "none"])
def test_merged_norm_on_other_op(model, op):
    d = _base(model)
    d["layers"][2] = {"block": 2, "op": op, "merged_norm": "max", **({} if op == "none" else {"r": 3})}
    msg = _err(d)
    assert "layers[2].merged_norm" in msg and op in msg and "merge only" in msg


def test_similarity_is_written_only_when_set(model):
    """``similarity: tokens`` round-trips on prune and merge layers; a layer without the key (every
    file written before it existed) reads as ``keys`` and is written back without it, byte for byte."""
    layers = [LayerSpec("prune", 10, similarity="tokens"), LayerSpec("prune", 5), LayerSpec("merge", 6, None, 0.5, "max", "tokens"),
              LayerSpec("merge", 4, None, 0.5), LayerSpec("tome", 2), LayerSpec()]
    s = make_schedule(rs.ModelInfo.from_model(model), layers, method="hand")
    text = s.to_yaml()
    assert text.count("similarity: tokens") == 2 and "similarity: keys" not in text
    assert [l.similarity for l in Schedule.from_yaml(text).layers] == ["tokens", "keys", "tokens", "keys", "keys", "keys"]
    assert Schedule.from_yaml(text).to_yaml() == text
    d = _base(model)
    d["layers"][2] = {"block": 2, "op": "prune", "r": 3, "threshold": None}
    assert Schedule.from_dict(d).layers[2].similarity == "keys" and Schedule.from_dict(d).to_dict()["layers"][2] == d["layers"][2]
    hand = rs.rapid_schedule(model, 0.5)
    assert {l.similarity for l in hand.layers if l.reduces} == {"tokens"}  # the hand-set default
    assert {l.similarity for l in rs.rapid_schedule(model, 0.5, similarity="keys").layers} == {"keys"}
    shown = s.describe().splitlines()
    assert shown[0].endswith("similarity=tokens") and "similarity" not in shown[1]
    assert shown[2].endswith("protect=0.50 merged_norm=max similarity=tokens")


@pytest.mark.parametrize("bad", ["values", "TOKENS", 1, None, True])
def test_similarity_unknown_value(model, bad):
    d = _base(model)
    d["layers"][2] = {"block": 2, "op": "prune", "r": 3, "threshold": None, "similarity": bad}
    msg = _err(d)
    assert "layers[2].similarity" in msg and "keys, tokens" in msg


@pytest.mark.parametrize("op", ["tome", "evit", "none"])
def test_similarity_on_other_op(model, op):
    d = _base(model)
    d["layers"][2] = {"block": 2, "op": op, "similarity": "tokens", **({} if op == "none" else {"r": 3})}
    msg = _err(d)
    assert "layers[2].similarity" in msg and op in msg and "prune and merge only" in msg


@pytest.mark.parametrize("blocks", [[0, 2, 1, 3, 4, 5], [1, 2, 3, 4, 5, 6], [0, 0, 1, 2, 3, 4]])
def test_block_out_of_order(model, blocks):
    d = _base(model)
    for entry, b in zip(d["layers"], blocks):
        entry["block"] = b
    msg = _err(d)
    assert "block" in msg and "order" in msg


@pytest.mark.parametrize("index,bad", [(1, True), (2, 2.0)])
def test_block_wrong_type(model, index, bad):
    d = _base(model)
    d["layers"][index]["block"] = bad
    assert "block" in _err(d)


@pytest.mark.parametrize("n", [5, 7])
def test_wrong_layer_count(model, n):
    d = _base(model)
    layers = d["layers"]
    d["layers"] = layers[:n] if n < len(layers) else layers + [{"block": i, "op": "none"} for i in range(len(layers), n)]
    msg = _err(d)
    assert "layers" in msg and str(n) in msg and "depth" in msg


def test_empty_layers(model):
    d = _base(model)
    d["layers"] = []
    assert "layers" in _err(d)


def test_r_larger_than_patch_tokens_left(model):
    d = _base(model)  # 100 patch tokens
    d["layers"] = [{"block": i, "op": "none"} for i in range(6)]
    d["layers"][0] = {"block": 0, "op": "prune", "r": 50, "threshold": None}  # -> 50 patch tokens left
    d["layers"][1] = {"block": 1, "op": "merge", "r": 51, "threshold": None, "protect": 0.0}
    msg = _err(d)
    assert "layers[1].r" in msg and "50" in msg
    d["layers"][1]["r"] = 50  # exactly the tokens left: allowed (capped at runtime)
    Schedule.from_dict(d)


def test_r_larger_than_all_patch_tokens(model):
    d = _base(model)
    d["layers"][0] = {"block": 0, "op": "evit", "r": 101}
    assert "layers[0].r" in _err(d)


def test_tome_after_threshold_layer(model):
    d = _base(model)
    d["layers"][1] = {"block": 1, "op": "prune", "r": 5, "threshold": 0.5}
    msg = _err(d)
    assert "layers[2]" in msg and "tome" in msg and "threshold" in msg
    d["layers"][1]["threshold"] = None  # a fixed-count prune before tome is fine
    Schedule.from_dict(d)


@pytest.mark.parametrize("fmt", ["rapid-schedule/v2", "rapid-schedule/v0", 1, None])
def test_wrong_format_version(model, fmt):
    d = _base(model)
    d["format"] = fmt
    msg = _err(d)
    assert "format" in msg


@pytest.mark.parametrize(
    "field,bad",
    [("depth", 0), ("depth", "6"), ("num_tokens", -1), ("embed_dim", 6.0), ("num_prefix_tokens", 101), ("name", "")],
)
def test_bad_fingerprint_values(model, field, bad):
    d = _base(model)
    d["model"][field] = bad
    assert f"model.{field}" in _err(d)


@pytest.mark.parametrize("field,bad", [("kind", "joules"), ("target", -1.0), ("target", "1"), ("achieved", [1])])
def test_bad_budget(model, field, bad):
    d = _base(model)
    d["budget"][field] = bad
    assert f"budget.{field}" in _err(d)


@pytest.mark.parametrize("field", ["scores", "provenance"])
def test_bad_meta(model, field):
    d = _base(model)
    d[field] = [1, 2]
    assert field in _err(d)


# ---- YAML / file errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "format: rapid-schedule/v1\nlayers: [{block: 0, op: prune\n",  # unclosed flow mapping
        "format: [\n",
        "a: b: c\n",
        "\tformat: x\n",
        "!!python/object/apply:os.system ['true']\n",  # safe_load only
    ],
)
def test_malformed_yaml(text):
    with pytest.raises(ScheduleError, match="not valid YAML"):
        Schedule.from_yaml(text, source="f.yaml")


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n"])
def test_empty_file(tmp_path, text):
    p = tmp_path / "s.yaml"
    p.write_text(text)
    with pytest.raises(ScheduleError, match="empty"):
        Schedule.load(p)


@pytest.mark.parametrize("text", ["just a string\n", "- 1\n- 2\n", "42\n"])
def test_not_a_mapping(text):
    with pytest.raises(ScheduleError, match="mapping"):
        Schedule.from_yaml(text)


def test_truncated_yaml_at_every_line(sched):
    lines = sched.to_yaml().splitlines(keepends=True)
    first_layer = next(i for i, line in enumerate(lines) if line.startswith("- {block: 0"))
    last_layer = next(i for i, line in enumerate(lines) if line.startswith("- {block: 5"))
    for cut in range(0, last_layer + 1):
        text = "".join(lines[:cut])
        with pytest.raises(ScheduleError):
            Schedule.from_yaml(text)
    # cut in the middle of a flow mapping: a YAML error naming the line
    text = "".join(lines[:first_layer]) + lines[first_layer][:12]
    with pytest.raises(ScheduleError, match=f"not valid YAML at line {first_layer + 1}"):
        Schedule.from_yaml(text)


def test_missing_file(tmp_path):
    with pytest.raises(ScheduleError, match="does not exist"):
        Schedule.load(tmp_path / "nope.yaml")


def test_unreadable_file(tmp_path):
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ScheduleError, match=r"bin\.yaml: not UTF-8 text \(byte 0 cannot be decoded; is it a text file\?\) — pass a schedule"):
        Schedule.load(tmp_path / "bin.yaml")
    with pytest.raises(ScheduleError, match="is a directory, not a file"):
        Schedule.load(tmp_path)  # a directory


def test_load_error_names_file_and_field(model, tmp_path):
    d = _base(model)
    d["layers"][1]["r"] = -1
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    with pytest.raises(ScheduleError) as e:
        Schedule.load(p)
    assert str(p) in str(e.value) and "layers[1].r" in str(e.value)


# ---- schedule for another model -------------------------------------------------------------------


def _tiny(**kw):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    args = dict(img_size=64, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=10)
    args.update(kw)
    return VisionTransformer(**args).eval()


@pytest.mark.parametrize(
    "other,field",
    [
        (dict(depth=5), "depth"),
        (dict(img_size=48), "num_tokens"),
        # 7 x 8 patches + class + 8 registers = 65 tokens, as the 8 x 8 + class model: only the prefix differs
        (dict(img_size=(56, 64), reg_tokens=8), "num_prefix_tokens"),
        (dict(embed_dim=16), "embed_dim"),
    ],
)
def test_schedule_for_other_model_rejected(other, field, tmp_path):
    a, b = _tiny(), _tiny(**other)
    fa, fb = rs.ModelInfo.from_model(a).fingerprint(), rs.ModelInfo.from_model(b).fingerprint()
    assert getattr(fa, field) != getattr(fb, field)
    s = rs.tome_schedule(a, 2)
    path = s.save(tmp_path / "a.yaml")
    for form in (s, path, str(path), s.to_dict()):
        with pytest.raises(ScheduleError, match=field):
            rs.as_schedule(form, b)
        with pytest.raises(ScheduleError, match=field):
            rs.apply(b, form)
        assert not rs.is_patched(b)
    rs.as_schedule(s, a)  # fine on its own model


def test_mutated_fingerprint_rejected(model):
    s = rs.tome_schedule(model, 2)
    bad = replace(s, model=replace(s.model, num_prefix_tokens=2))
    with pytest.raises(ScheduleError, match="num_prefix_tokens"):
        rs.apply(model, bad)
    assert not rs.is_patched(model)


# ---- as_schedule: every documented form ------------------------------------------------------------


def test_as_schedule_forms(model, info, tmp_path):
    ref = rs.tome_schedule(model, 4)
    assert rs.as_schedule(4, model).layers == ref.layers
    assert rs.as_schedule(4, info).layers == ref.layers  # ModelInfo works too
    dec = rs.as_schedule((6, -0.5), model)
    assert dec.layers == rs.tome_schedule(model, 6, inflect=-0.5).layers
    assert [layer.r for layer in dec.layers] == [9, 7, 6, 5, 4, 3]  # ToMe's parse_r: int(9 - 1.2 * i)
    per = rs.as_schedule([5, 4, 0, 3], model)  # shorter list: padded with 0
    assert [(layer.op, layer.r) for layer in per.layers] == [("tome", 5), ("tome", 4), ("none", 0), ("tome", 3), ("none", 0), ("none", 0)]
    specs = [LayerSpec("prune", 10), LayerSpec("merge", 5, 0.3, 0.5)] + [LayerSpec()] * 4
    assert rs.as_schedule(specs, model).layers == tuple(specs)
    assert rs.as_schedule(tuple(specs), model).layers == tuple(specs)
    assert rs.as_schedule(ref.to_dict(), model) == ref
    path = ref.save(tmp_path / "s.yaml")
    assert rs.as_schedule(path, model) == ref
    assert rs.as_schedule(str(path), model) == ref
    assert rs.as_schedule(ref, model) is ref
    none = rs.as_schedule(None, model)
    assert none.layers == (LayerSpec(),) * 6 and not none.reduces
    assert rs.as_schedule(0, model).layers == none.layers


def test_as_schedule_clamps_list_of_layerspec(model):
    s = rs.as_schedule([LayerSpec("tome", 80)] + [LayerSpec()] * 5, model)
    assert s.layers[0] == LayerSpec("tome", 50)  # the YAML says what runs


@pytest.mark.parametrize("bad", [True, 2.5, "nonexistent.yaml", object(), {1, 2}, [1.5, 2]])
def test_as_schedule_rejects(model, bad):
    with pytest.raises(ScheduleError):
        rs.as_schedule(bad, model)


def test_as_schedule_validates_schedule_objects(model):
    s = rs.tome_schedule(model, 2)
    bad = replace(s, layers=s.layers[:-1])  # Schedule() itself does not validate
    with pytest.raises(ScheduleError, match="depth"):
        rs.as_schedule(bad, model)
    bad = replace(s, layers=(LayerSpec("merge", 3),) + s.layers[1:])  # merge without protect
    with pytest.raises(ScheduleError, match="protect"):
        rs.as_schedule(bad, model)


def test_layerspec_validate_direct():
    LayerSpec("merge", 2, None, 0.0).validate()
    with pytest.raises(ScheduleError, match="layer.op"):
        LayerSpec("fold", 2).validate()
    assert copy.deepcopy(LayerSpec("prune", 1, 0.5)) == LayerSpec("prune", 1, 0.5)


@pytest.mark.parametrize(
    "bad,field",
    [(LayerSpec("merge", 3), "protect"), (LayerSpec("fold", 3), "op"), (LayerSpec("prune", "3"), "r"), (LayerSpec("prune", -3), "r")],
)
def test_as_schedule_validates_layerspec_lists(model, bad, field):
    with pytest.raises(ScheduleError, match=rf"layers\[0\]\.{field}"):
        rs.as_schedule([bad] + [LayerSpec()] * 5, model)


def test_hand_set_prunes_in_the_first_block_and_merges_from_the_switch(model, info):
    """``rapid_schedule``: one prune block, nothing until the switch, merges after; a budget one prune
    block cannot reach takes more prune blocks (up to the switch) instead of being refused."""
    deit = rs.ModelInfo.from_model(timm.create_model("deit_tiny_patch16_224"))
    for ratio in (0.7, 0.5, 0.35):
        s = rs.rapid_schedule(deit, ratio)
        assert [l.op for l in s.layers][:4] == ["prune", "none", "none", "merge"], ratio
        assert s.provenance["prune_blocks"] == 1 and s.budget.achieved["ratio"] <= ratio
    old = rs.rapid_schedule(deit, 0.5, prune_blocks=3)
    assert [l.op for l in old.layers][:4] == ["prune", "prune", "prune", "merge"]
    assert [l.op for l in rs.rapid_schedule(deit, 0.7, prune_blocks=0).layers][:4] == ["none", "none", "none", "merge"]
    assert rs.rapid_schedule(info, 0.5).provenance["prune_blocks"] == 1  # test_vit: depth 6, switch 2
    tight = rs.rapid_schedule(info, 0.4)  # below one prune block's reach on test_vit
    assert tight.provenance["prune_blocks"] == 2 and [l.op for l in tight.layers][:2] == ["prune", "prune"]
    assert tight.budget.achieved["ratio"] <= 0.4
    with pytest.raises(rs.UnreachableBudget, match="raise the budget"):
        rs.rapid_schedule(info, 0.4, prune_blocks=1)  # an explicit count is kept
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="prune_blocks"):
            rs.rapid_schedule(info, 0.5, prune_blocks=bad)
