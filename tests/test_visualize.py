"""Token visualisation (rapid_search.tools.visualize) on the tiny test_vit."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import rapid_search as rs
from rapid_search.tools.bench import method_schedule
from rapid_search.tools.visualize import add_arguments, default_layers, labels_from_source, main, render, token_labels


# one torch thread and the seeded test_vit ``model``: fixtures in conftest.py
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def image_file(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "img.jpg"
    Image.fromarray((rng.random((190, 240, 3)) * 255).astype("uint8")).save(path)
    return path


def _assert_partition(labels: np.ndarray, grid: tuple[int, int]) -> None:
    """Every patch has exactly one label: -1 (pruned) or a group id in 0..G-1, all used."""
    assert labels.shape == grid and labels.dtype == np.int64
    assert (labels >= -1).all()
    ids = np.unique(labels[labels >= 0])
    assert ids.tolist() == list(range(len(ids)))  # contiguous ids, no empty group
    # groups are numbered in raster order of their first patch
    flat = labels.ravel()
    first = [int(np.argmax(flat == g)) for g in ids]
    assert first == sorted(first)


def test_labels_from_source_hand_made() -> None:
    # 1 prefix token, 2x3 grid; tokens: cls, {p0,p1}, {p2}, {p4,p5} ; p3 pruned
    src = torch.zeros(4, 7)
    src[0, 0] = 1
    src[1, 1] = src[1, 2] = 1
    src[2, 3] = 1
    src[3, 5] = src[3, 6] = 1
    labels = labels_from_source(src, num_prefix=1, grid=(2, 3))
    assert labels.tolist() == [[0, 0, 1], [-1, 2, 2]]
    _assert_partition(labels, (2, 3))
    assert labels_from_source(None, num_prefix=1, grid=(2, 3)).tolist() == [[0, 1, 2], [3, 4, 5]]


def test_labels_from_source_rejects_non_partitions() -> None:
    src = torch.zeros(3, 5)
    src[1, 1] = src[1, 2] = 1
    src[2, 2] = 1  # patch 1 covered twice
    with pytest.raises(ValueError, match="not a partition"):
        labels_from_source(src, num_prefix=1, grid=(2, 2))
    with pytest.raises(ValueError, match="grid"):
        labels_from_source(torch.zeros(3, 5), num_prefix=1, grid=(3, 3))
    with pytest.raises(ValueError, match="one image"):
        labels_from_source(torch.zeros(1, 3, 5), num_prefix=1, grid=(2, 2))


@pytest.mark.parametrize("method", ["rapid", "tome", "tofu", "evit"])
def test_labels_partition_grid_and_match_token_counts(model: torch.nn.Module, method: str) -> None:
    sched = method_schedule(method, model, 0.5)
    info = rs.ModelInfo.from_model(model)
    counts = rs.token_counts(info, sched)  # tokens entering each block, then the final count
    depth = len(model.blocks)
    labels = token_labels(model, torch.randn(1, 3, 160, 160), sched, layers=range(depth))
    assert not rs.is_patched(model)
    pruned_before = 0
    for k in range(depth):
        lab = labels[k]
        _assert_partition(lab, (10, 10))
        groups = len(np.unique(lab[lab >= 0]))
        assert groups + info.num_prefix_tokens == counts[k + 1]  # one group per surviving patch token
        pruned = int((lab < 0).sum())
        assert pruned >= pruned_before  # a pruned patch never comes back
        pruned_before = pruned
    if method == "tome":
        assert pruned_before == 0  # merging only
    if method == "evit":
        assert all(len(np.unique(lab[lab >= 0])) == int((lab >= 0).sum()) for lab in labels.values())  # pruning only


def test_default_layers() -> None:
    assert default_layers(12) == (2, 5, 8, 11)
    assert default_layers(6)[-1] == 5 and len(default_layers(6)) == 4
    assert default_layers(2) == (0, 1)


def test_render_writes_png(model: torch.nn.Module, image_file: Path, tmp_path: Path) -> None:
    out = render(model, image_file, rs.rapid_schedule(model, 0.4), layers=(1, 3, 5), out=tmp_path / "vis" / "t.png", dpi=60)
    assert out.exists()
    with Image.open(out) as im:
        im.verify()
    with Image.open(out) as im:
        assert im.format == "PNG"
        w, h = im.size
        assert 300 <= w <= 4000 and 100 <= h <= 2000 and w > h  # a row of 4 panels
    with pytest.raises(ValueError, match="outside"):
        render(model, image_file, None, layers=(9,), out=tmp_path / "bad.png")


@pytest.mark.parametrize("name, magic", [("t.pdf", b"%PDF"), ("t.svg", b"<?xml"), ("T.JPG", b"\xff\xd8\xff")])
def test_render_writes_the_format_its_name_ends_with(model: torch.nn.Module, image_file: Path, tmp_path: Path, name: str, magic: bytes) -> None:
    """The format follows the ending (any case), written to exactly that path."""
    out = render(model, image_file, rs.rapid_schedule(model, 0.4), layers=(1,), out=tmp_path / name, dpi=40)
    assert out == tmp_path / name and out.read_bytes().startswith(magic)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["img.jpg", name])  # no temporary file left, no second file


def test_a_figure_that_fails_to_draw_leaves_the_old_file(tmp_path: Path) -> None:
    """save_figure draws in memory first: a failing draw never truncates or replaces the file."""
    from rapid_search.outputs import OutputError, save_figure

    class Broken:
        def savefig(self, buf, **kw):
            buf.write(b"\x89PNG half")
            raise RuntimeError("renderer died")

    old = tmp_path / "fig.png"
    old.write_bytes(b"old figure")
    with pytest.raises(RuntimeError, match="renderer died"):
        save_figure(Broken(), old)
    assert old.read_bytes() == b"old figure" and [p.name for p in tmp_path.iterdir()] == ["fig.png"]
    with pytest.raises(OutputError, match="name the file with one of those endings"):
        save_figure(Broken(), tmp_path / "fig.txt")


def test_every_figure_format_offered_can_be_written(tmp_path: Path) -> None:
    """FIGURE_FORMATS is what the error messages offer: matplotlib must write each here."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rapid_search.outputs import FIGURE_FORMATS, save_figure

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    try:
        for fmt in FIGURE_FORMATS:
            assert save_figure(fig, tmp_path / f"f.{fmt}", dpi=30).stat().st_size > 100, fmt
    finally:
        plt.close(fig)


def test_cli_main(image_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = argparse.ArgumentParser()
    add_arguments(p)
    out = tmp_path / "cli.png"
    args = p.parse_args(
        ["--model", "test_vit", "--no-pretrained", "--schedule", "tome@50", "--image", str(image_file), "--out", str(out), "--layers", "0,5"]
    )
    assert main(args) == 0
    assert out.exists() and "wrote" in capsys.readouterr().out
