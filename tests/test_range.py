"""Range budgets: one study over ``35%..70%GFLOPs``, export at any budget in it, ``front``; ToMe's (r, -1)."""

from __future__ import annotations

import numpy as np
import optuna
import pytest
import timm

import rapid_search as rs
from rapid_search.cli import main
from rapid_search.search.budget import BudgetError, parse_budget
from rapid_search.search.space import project
from rapid_search.storage import open_storage
from rapid_search.search.study import latency_correction
from rapid_search.tools.latency import LatencyModel
from rapid_search.tools.front import FrontPoint, pareto_front

from helpers import search_argv


def _official_parse_r(num_layers: int, r: int, inflect: float) -> list[int]:
    """facebookresearch/ToMe ``tome.utils.parse_r`` for ``(r, inflect)``, as documented there."""
    min_val = int(r * (1.0 - inflect))
    max_val = 2 * r - min_val
    step = (max_val - min_val) / (num_layers - 1)
    return [int(min_val + step * i) for i in range(num_layers)]


@pytest.mark.parametrize("r", [1, 2, 3, 5, 8])
def test_tome_decreasing_is_the_papers_r_minus_one(r):
    model = timm.create_model("test_vit")
    info = rs.model_info(model)
    s = rs.tome_schedule(model, r, inflect=-1.0)
    want = _official_parse_r(info.depth, r, -1.0)
    assert want[0] == 2 * r and want[-1] == 0
    assert [layer.r if layer.op == "tome" else 0 for layer in s.layers] == want  # no count clamped at these r
    assert rs.as_schedule((r, -1), model).layers == s.layers
    fitted = rs.tome_for_ratio(model, 0.6, inflect=-1.0)
    assert fitted.provenance["method"] == "tome-decreasing" and fitted.provenance["inflect"] == -1.0
    assert rs.tome_for_ratio(model, 0.6, inflect=-0.5).provenance["method"] == "tome-inflect-0.5"


@pytest.mark.parametrize(
    "text, canonical, ends",
    [
        ("35%..70%GFLOPs", "35%..70%GFLOPs", ("35%GFLOPs", "70%GFLOPs")),
        (" 35% .. 70% gflops ", "35%..70%GFLOPs", ("35%GFLOPs", "70%GFLOPs")),
        ("35%GFLOPs..70%GFLOPs", "35%..70%GFLOPs", ("35%GFLOPs", "70%GFLOPs")),
        ("0.4..0.9GFLOPs", "0.4..0.9GFLOPs", ("0.4GFLOPs", "0.9GFLOPs")),
        ("40%..80%latency", "40%..80%latency", ("40%latency", "80%latency")),
        ("5..9ms", "5..9ms", ("5ms", "9ms")),
    ],
)
def test_range_forms(text, canonical, ends):
    spec = parse_budget(text)
    assert spec.canonical == canonical and parse_budget(canonical.lower()).canonical == canonical
    assert tuple(e.canonical for e in spec.ends()) == ends
    assert spec.lo == pytest.approx(parse_budget(ends[0]).value) and spec.value == pytest.approx(parse_budget(ends[1]).value)


@pytest.mark.parametrize(
    "text, message",
    [
        ("70%..35%GFLOPs", "must go from low to high — use e.g. 35%..70%GFLOPs"),
        ("50%..50%GFLOPs", "must go from low to high"),
        ("35%..0.9GFLOPs", "mixes units (35%GFLOPs and 0.9GFLOPs) — give both ends in one"),
        ("35%latency..70%GFLOPs", "mixes units"),
        ("35..70%GFLOPs", "mixes units (35GFLOPs and 70%GFLOPs)"),
        ("0%..50%GFLOPs", "must be positive"),
        ("35%..120%GFLOPs", "reduces nothing"),
        ("35%..50%..70%GFLOPs", "is not understood"),
        ("..50%GFLOPs", "is not understood"),
    ],
)
def test_range_rejections(text, message):
    with pytest.raises(BudgetError) as e:
        parse_budget(text)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_pareto_front_keeps_the_non_dominated():
    pts = [FrontPoint(0, 1.0, -0.5, "a"), FrontPoint(1, 0.5, -0.9, "a"), FrontPoint(2, 0.7, -0.95, "a"), FrontPoint(3, 0.9, -0.4, "a"),
           FrontPoint(4, 0.5, -1.0, "a")]
    assert [p.trial for p in pareto_front(pts)] == [1, 3]


@pytest.fixture(scope="module")
def range_study(tiny_search, tmp_path_factory):
    """A 18-trial test_vit study over 40%..70%GFLOPs (journal storage; fixed counts; one rung: no early stopping), run from the CLI."""
    root = tmp_path_factory.mktemp("range")
    journal = f"journal:{root / 'r.journal'}"
    space = root / "space.yaml"  # fixed counts: on random weights threshold trials mostly miss the budget
    space.write_text("format: rapid-search-space/v1\nswitch: {low: 0.0, high: 1.0}\nprune_weight: {low: 0.25, high: 4.0, log: true}\n"
                     "decay: {low: -0.9, high: 0.9}\nprotect: {low: 0.0, high: 0.6}\nprune_threshold: off\nmerge_threshold: off\n")
    assert main(search_argv(tiny_search, "r", "--storage", journal, "--out", str(root / "hi.yaml"), "--rungs", "1", "--space", str(space), budget="40%..70%GFLOPs", trials="18")) == 0
    study = optuna.load_study(study_name="r", storage=open_storage(journal, study_name="r"))
    return root, journal, study


def test_range_search_covers_the_range(range_study):
    root, _, study = range_study
    info = rs.model_info(timm.create_model("test_vit"))
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    fracs = sorted(t.user_attrs["gflops"] * 1e9 / info.base_macs for t in done)
    assert len(done) >= 10
    assert fracs[0] <= 0.45 and fracs[-1] >= 0.65  # both ends reached
    assert all(0.40 * 0.97 <= f <= 0.70 + 1e-9 for f in fracs)  # every trial within the range
    thirds = [sum(lo <= f < hi for f in fracs) for lo, hi in ((0, 0.5), (0.5, 0.6), (0.6, 1))]
    assert min(thirds) >= 2, thirds  # spread over it, not piled at one end
    warm = [(t.user_attrs.get("warm_start"), t.user_attrs.get("range_frac")) for t in study.trials[:11]]
    assert warm == [("rapid-hand-set", k / 8) for k in range(9)] + [("tome", 0.5), ("tome-decreasing", 0.5)]
    hand = sorted((t.user_attrs["target"], t.user_attrs["score"]) for t in done if t.user_attrs.get("warm_start") == "rapid-hand-set")
    assert len(hand) == 9 and hand[0][1] < hand[-1][1]
    searched = [t for t in done if t.number >= 11]
    assert searched
    for t in done:  # the sampler's value is the gain over hand-set at the trial's own target; the raw score is kept
        assert t.user_attrs["score"] == pytest.approx(-t.user_attrs["kl"])
        gain = 0.0 if t.number < 9 else t.user_attrs["score"] - np.interp(t.user_attrs["target"], *zip(*hand))
        assert t.value == pytest.approx(gain, abs=1e-9)
    s = rs.Schedule.load(root / "hi.yaml")
    assert s.budget.spec == "70%GFLOPs" and s.budget.achieved["gflops"] <= s.budget.target + 1e-9


@pytest.mark.parametrize("budget", ["40%GFLOPs", "50%GFLOPs", "absolute 65%"])
def test_export_inside_the_range_meets_it(range_study, budget, capsys):
    root, journal, study = range_study
    info = rs.model_info(timm.create_model("test_vit"))
    if budget == "absolute 65%":  # an absolute budget inside the range
        budget = f"{0.65 * info.base_gflops:.6f}GFLOPs"
    target = parse_budget(budget)
    target_g = target.value * info.base_gflops if target.relative else target.value
    out = root / f"e-{budget}.yaml"
    assert main(["export", "--study-name", "r", "--storage", journal, "--budget", budget, "--out", str(out)]) == 0
    s = rs.Schedule.load(out)
    assert s.budget.achieved["gflops"] <= target_g + 1e-9 and rs.schedule_macs(info, s) <= target_g * 1e9 * 1.000001
    # the best calibration score among the trials that meet it
    ok = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and t.user_attrs.get("gflops", 9) <= target_g + 1e-12]
    best = max(ok, key=lambda t: t.user_attrs["score"])
    assert s.provenance["trial"] == best.number
    fresh = optuna.load_study(study_name="r", storage=open_storage(journal, study_name="r"))
    assert any(e["budget"] == target.canonical and e["trial"] == best.number for e in fresh.user_attrs["exports"])


@pytest.mark.parametrize(
    "budget, message",
    [
        ("30%GFLOPs", "budget 30%GFLOPs is outside the study's range 40%..70%GFLOPs — export a budget inside it"),
        ("80%GFLOPs", "outside the study's range 40%..70%GFLOPs"),
        ("40%..50%GFLOPs", "export writes one schedule — give --budget one budget inside the study's range 40%..70%GFLOPs"),
        ("50%latency", "outside the study's range 40%..70%GFLOPs"),
    ],
)
def test_export_outside_the_range_is_one_line(range_study, budget, message, capsys):
    root, journal, _ = range_study
    out = root / "never.yaml"
    assert main(["export", "--study-name", "r", "--storage", journal, "--budget", budget, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not out.exists()


def test_front_writes_table_and_png(range_study, capsys):
    root, journal, study = range_study
    assert main(["export", "--study-name", "r", "--storage", journal, "--budget", "45%GFLOPs", "--out", str(root / "f.yaml")]) == 0
    capsys.readouterr()
    png = root / "front.png"
    assert main(["front", "--study-name", "r", "--storage", journal, "--out", str(png)]) == 0
    out = capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = out.splitlines()
    assert lines[0].startswith("calibration front:") and lines[-1] == f"front written to {png}"
    rows = [line.split() for line in lines[2:-1]]
    costs, kls = [float(r[0]) for r in rows], [float(r[1]) for r in rows]
    assert len(rows) >= 2 and costs == sorted(costs) and kls == sorted(kls, reverse=True)  # cheaper trials score worse on the front
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    for r in rows:  # no finished trial dominates a front trial
        t = study.trials[int(r[2])]
        assert not any(o.user_attrs["gflops"] <= t.user_attrs["gflops"] and o.user_attrs["score"] > t.user_attrs["score"] for o in done)


def test_front_bad_input_is_one_line(range_study, tmp_path, capsys):
    root, journal, _ = range_study
    assert main(["front", "--study-name", "nope", "--storage", journal, "--out", str(tmp_path / "f.png")]) == 2
    assert "no study named 'nope'" in capsys.readouterr().err
    assert main(["front", "--study-name", "r", "--storage", journal, "--out", str(tmp_path)]) == 2  # a directory
    err = capsys.readouterr().err
    assert "--out" in err and err.count("\n") == 1
    for name in ("front.txt", "front"):  # was a PNG under that name
        assert main(["front", "--study-name", "r", "--storage", journal, "--out", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert "end the name with one of: .png, .pdf, .svg" in err and err.count("\n") == 1 and not (tmp_path / name).exists()


def test_front_writes_the_format_its_name_ends_with(range_study, tmp_path, capsys):
    root, journal, _ = range_study
    for name, magic in (("front.pdf", b"%PDF"), ("front.svg", b"<?xml")):
        assert main(["front", "--study-name", "r", "--storage", journal, "--out", str(tmp_path / name)]) == 0
        assert (tmp_path / name).read_bytes().startswith(magic)
    capsys.readouterr()


class _MacsClock:
    """A deterministic stand-in for the device clock (a tiny model's CPU timings are mostly
    overhead and noise): 1 ms per MMAC, a 2% spread."""

    scale, base_ms = 1.0, None  # as LatencyModel's: the search re-anchors predictions to its unreduced timing

    def __init__(self, info):
        self.info = info

    def _ms(self, layers):
        return rs.schedule_macs(self.info, [rs.LayerSpec()] * self.info.depth if layers is None else getattr(layers, "layers", layers)) / 1e6

    def predict_ms(self, layers, **_):
        return self.scale * self._ms(layers)

    anchor = LatencyModel.anchor

    def timing(self, schedule):
        ms = self._ms(schedule)
        return type("Timing", (), {"median_ms": ms, "iqr_ms": 0.02 * ms, "times_ms": (ms,)})()


def _fake_device(monkeypatch, model, truth, seen=None):
    """Latency searches use ``model`` as their latency model and ``truth`` as the device clock
    (``seen``, when given, collects each timing's ``compile`` flag)."""
    from rapid_search.tools import latency

    def timing(m, schedule, **k):
        if seen is not None:
            seen.append(k.get("compile"))
        return truth.timing(schedule)

    monkeypatch.setattr(latency.LatencyModel, "measure", classmethod(lambda cls, *a, **k: model))
    monkeypatch.setattr(latency, "measure_schedule_ms", timing)
    monkeypatch.setattr(latency, "measure_against_unreduced", lambda m, schedule, **k: (timing(m, schedule, **k), truth.timing(None)))


def _latency_argv(tiny_search, tmp_path, name, *extra, **change):
    """``(argv, journal)`` of a tiny latency search (batch 4, 8 images, one rung) writing ``tmp_path/NAME.yaml``."""
    journal = f"journal:{tmp_path / (name + '.journal')}"
    argv = search_argv(tiny_search, name, "--storage", journal, "--out", str(tmp_path / f"{name}.yaml"), "--rungs", "1", *extra,
                       batch_size="4", calib_images="8", **change)  # fmt: skip
    return argv, journal


def test_latency_range_search_and_export(tiny_search, tmp_path, capsys, monkeypatch):
    """``40%..90%latency``: trials drawn over the measured range, export at a latency inside it takes
    only trials drawn for that target or a tighter one (so they keep the timing margin)."""
    clock = _MacsClock(rs.model_info(timm.create_model("test_vit")))
    _fake_device(monkeypatch, clock, clock)
    argv, journal = _latency_argv(tiny_search, tmp_path, "l", budget="40%..90%latency", trials="10")
    assert main(argv) == 0, capsys.readouterr().err
    study = optuna.load_study(study_name="l", storage=open_storage(journal, study_name="l"))
    hi = study.user_attrs["target"]  # the creator's 90% of its measured unreduced latency
    targets = [t.user_attrs["target"] for t in study.trials if "target" in t.user_attrs]
    assert min(targets) == pytest.approx(hi * 40 / 90) and max(targets) == pytest.approx(hi)
    out = tmp_path / "e.yaml"
    assert main(["export", "--study-name", "l", "--storage", journal, "--budget", "70%latency", "--out", str(out)]) == 0, capsys.readouterr().err
    s = rs.Schedule.load(out)
    assert s.budget.spec == "70%latency" and s.budget.target == pytest.approx(hi * 70 / 90, rel=1e-5)
    assert study.trials[s.provenance["trial"]].user_attrs["target"] <= hi * 70 / 90 * (1 + 1e-9)
    assert main(["export", "--study-name", "l", "--storage", journal, "--budget", "95%latency", "--out", str(out)]) == 2
    assert "outside the study's range 40%..90%latency" in capsys.readouterr().err


def test_refine_a_range_study_at_one_budget(range_study, tiny_search, tmp_path, capsys):
    """``search --budget 50%GFLOPs`` on a range study: the hand-set shape and its best shapes (by gain)
    go first, projected onto 50%, then sampled shapes at 50%; the schedule written is the best trial meeting 50%."""
    root, _, before = range_study
    (tmp_path / "r.journal").write_bytes((root / "r.journal").read_bytes())  # a copy: the fixture's study stays as it was
    journal = f"journal:{tmp_path / 'r.journal'}"
    n = len(before.trials)
    argv = search_argv(tiny_search, "r", "--storage", journal, "--out", str(tmp_path / "at50.yaml"), "--rungs", "1", "--space",
                       str(root / "space.yaml"), budget="50%GFLOPs", trials=str(n + 4))
    assert main(argv) == 0, capsys.readouterr().err
    study = optuna.load_study(study_name="r", storage=open_storage(journal, study_name="r"))
    info = rs.model_info(timm.create_model("test_vit"))
    new = study.trials[n:]
    assert len(new) == 4 and all(t.user_attrs["target"] == pytest.approx(0.5 * info.base_macs) for t in new)
    ranked = sorted((t for t in before.trials if t.state == optuna.trial.TrialState.COMPLETE and t.number >= 11), key=lambda t: -t.value)
    assert [t.user_attrs["refines"] for t in new[:3]] == [0] + [t.number for t in ranked[:2]]  # hand-set, then the best gains
    assert new[0].user_attrs["warm_start"] == "rapid-hand-set" and new[0].value == 0.0
    assert [t.params for t in new[1:3]] == [t.params for t in ranked[:2]]
    s = rs.Schedule.load(tmp_path / "at50.yaml")
    ok = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and t.user_attrs["gflops"] <= 0.5 * info.base_gflops + 1e-12]
    assert s.provenance["trial"] == max(ok, key=lambda t: t.user_attrs["score"]).number
    assert s.budget.spec == "50%GFLOPs" and s.budget.achieved["gflops"] <= 0.5 * info.base_gflops + 1e-9
    bad = search_argv(tiny_search, "r", "--storage", journal, "--space", str(root / "space.yaml"), budget="38%GFLOPs", trials=str(n + 5))
    assert main(bad) == 2 and "is outside study 'r''s range 40%..70%GFLOPs" in capsys.readouterr().err


class _LoadedCalibration(_MacsClock):
    """A latency model calibrated while the machine was three times as busy as when the unreduced model is timed."""

    scale = 3.0


def test_latency_floor_is_judged_against_the_measured_unreduced(tiny_search, tmp_path, capsys, monkeypatch):
    """A latency model calibrated under other load than the unreduced timing is re-anchored to that
    timing: a reachable budget is searched and met, and the floor named agrees with the measured unreduced latency."""
    info = rs.model_info(timm.create_model("test_vit"))
    loaded, truth = _LoadedCalibration(info), _MacsClock(info)
    _fake_device(monkeypatch, loaded, truth)
    base_ms = truth.timing(None).median_ms
    argv, _ = _latency_argv(tiny_search, tmp_path, "f", budget="90%latency", trials="1")
    assert main(argv) == 0, capsys.readouterr().err
    assert loaded.predict_ms(None) == pytest.approx(base_ms) and loaded.base_ms == base_ms
    loaded.scale = 3.0
    argv[argv.index("--budget") + 1] = "5%latency"
    argv[argv.index("--study-name") + 1] = "g"
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "below the fastest schedule" in err and f"unreduced {base_ms:.2f} ms" in err and err.count("\n") == 1


class _Pessimist(_MacsClock):
    """A latency model that credits a reduction with only 60% of the time it saves on the device (as
    the real model over-predicted aggressive schedules at batch 1 on a loaded CPU)."""

    def predict_ms(self, layers, **_):
        base = self._ms(None)
        return self.scale * (base - 0.6 * (base - self._ms(layers)))


def test_latency_search_learns_the_models_error_from_timed_trials(tiny_search, tmp_path, capsys, monkeypatch):
    """Every trial of a latency search is timed on the device, and later trials' projections use the
    predicted savings rescaled by measured / predicted: a budget the pessimistic model alone calls out of
    reach is searched, and the written schedule uses it and meets it."""
    info = rs.model_info(timm.create_model("test_vit"))
    model, truth = _Pessimist(info), _MacsClock(info)
    _fake_device(monkeypatch, model, truth)
    argv, journal = _latency_argv(tiny_search, tmp_path, "p", budget="60%latency", trials="8")
    assert main(argv) == 0, capsys.readouterr().err
    target = 0.6 * truth._ms(None)
    hand = {"switch": 2, "prune_weight": 1.0, "decay": 0.0, "protect": 0.5, "prune_threshold": None, "merge_threshold": None}
    assert project(info, hand, target * 0.98, cost=model.predict_ms) is None  # by the model alone: out of reach
    s = rs.Schedule.load(tmp_path / "p.yaml")
    assert 0.85 * target <= truth._ms(s) <= target and s.budget.achieved["latency_ms"] == pytest.approx(truth._ms(s), abs=5e-5)  # recorded to 4 decimals
    study = optuna.load_study(study_name="p", storage=open_storage(journal, study_name="p"))
    timed = [t for t in study.trials if "measured_ms" in t.user_attrs]
    base = truth._ms(None)
    savings = [(base - t.user_attrs["measured_ms"]) / (base - t.user_attrs["model_ms"]) for t in timed]
    assert len(timed) >= 6 and latency_correction(study, base) == pytest.approx(np.median(savings)) == pytest.approx(1 / 0.6)
    over = [t for t in timed if t.user_attrs["measured_ms"] > target]
    assert all(t.state == optuna.trial.TrialState.PRUNED and t.constraints["budget"] > 0 for t in over)  # timed over the target: not scored


def test_compiled_latency_search_is_corrected_by_one_compiled_timing(tiny_search, tmp_path, capsys, monkeypatch):
    """``--compile``: trials are not timed (each would compile), so one compiled timing of the
    hand-set schedule at the start rescales every prediction: the written schedule still uses the budget."""
    info = rs.model_info(timm.create_model("test_vit"))
    model, truth = _Pessimist(info), _MacsClock(info)
    compiled: list = []
    _fake_device(monkeypatch, model, truth, seen=compiled)
    argv, journal = _latency_argv(tiny_search, tmp_path, "c", "--compile", "--progress", "plain", budget="70%latency", trials="6")
    assert main(argv) == 0, capsys.readouterr().err
    assert "predicted savings are scaled by 1.667" in capsys.readouterr().err  # the stand-in credits 60% of each saving
    target = 0.7 * truth._ms(None)
    s = rs.Schedule.load(tmp_path / "c.yaml")
    assert 0.85 * target <= truth._ms(s) <= target
    study = optuna.load_study(study_name="c", storage=open_storage(journal, study_name="c"))
    assert not any("measured_ms" in t.user_attrs for t in study.trials) and all(compiled)  # every timing compiled, no trial timed
