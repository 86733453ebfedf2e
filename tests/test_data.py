"""Image folders -> preprocessed tensors and ImageNet-1k labels (rapid_search.tools.data)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

import rapid_search.tools.data as data_mod
from rapid_search.tools.data import DataError, ImageSet, folder_fingerprint, imagenet_class_index, imagenet_label_names, list_images, load_images

#: Small eval transform so that the synthetic tests stay fast.
CFG: dict[str, Any] = {
    "input_size": (3, 32, 32),
    "interpolation": "bilinear",
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
    "crop_pct": 1.0,
    "crop_mode": "center",
}

SHARED = Path(os.environ.get("RAPID_SHARED", Path(__file__).resolve().parents[1] / ".." / "shared"))


def _img(path: Path, size: tuple[int, int] = (40, 30), seed: int = 0, fmt: str | None = None) -> Path:
    """Write a random RGB image of ``size`` (W, H) to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, format=fmt)
    return path


def _tree(root: Path, wnids: list[str], per_class: int, size: tuple[int, int] = (20, 20)) -> Path:
    for k, w in enumerate(wnids):
        for j in range(per_class):
            _img(root / w / f"{w}_{j}.jpg", size=size, seed=100 * k + j)
    return root


# ---- ImageNet-1k classes ------------------------------------------------------------------------
def test_class_index_matches_timm_imagenetinfo() -> None:
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    index = imagenet_class_index()
    assert len(index) == 1000
    assert index["n01440764"] == 0 and index["n01443537"] == 1
    assert info.index_to_label_name(0) == "n01440764" and info.index_to_label_name(1) == "n01443537"
    assert all(info.index_to_label_name(i) == w for w, i in index.items())
    names = imagenet_label_names()
    assert len(names) == 1000 and names[0].startswith("tench") and names[1].startswith("goldfish")


# ---- layouts ------------------------------------------------------------------------------------
def test_wnid_tree_labels_are_imagenet_indices_not_folder_order(tmp_path: Path) -> None:
    # n15075141 (toilet tissue) is the last ImageNet-1k class: sorted-folder order would call it 2
    _img(tmp_path / "n01443537" / "a.jpg", seed=1)
    _img(tmp_path / "n01443537" / "sub" / "b.png", seed=2)  # recursive inside a class folder
    _img(tmp_path / "n01440764" / "c.JPEG", seed=3)
    _img(tmp_path / "n15075141" / "d.jpg", seed=4)
    (tmp_path / "n15075141" / "notes.txt").write_text("not an image")
    s = load_images(tmp_path, data_config=CFG)
    assert s.images.shape == (4, 3, 32, 32) and s.images.dtype == torch.float32
    assert s.labels is not None and s.labels.dtype == torch.int64
    by_name = {Path(p).name: int(y) for p, y in zip(s.paths, s.labels)}
    assert by_name == {"c.JPEG": 0, "a.jpg": 1, "b.png": 1, "d.jpg": 999}
    assert s.paths == sorted(s.paths) and s.skipped == []
    assert s.data_config["input_size"] == (3, 32, 32)


def test_flat_folder_is_unlabelled_and_accepts_common_extensions(tmp_path: Path) -> None:
    names = ["a.JPG", "b.jpeg", "c.PNG", "d.bmp", "e.webp", "f.tif", "g.TIFF", "h.gif"]
    fmts = ["JPEG", "JPEG", "PNG", "BMP", "WEBP", "TIFF", "TIFF", "GIF"]
    for k, (n, f) in enumerate(zip(names, fmts)):
        _img(tmp_path / n, seed=k, fmt=f)
    (tmp_path / "readme.txt").write_text("x")
    _img(tmp_path / ".hidden.jpg")
    s = load_images(tmp_path, data_config=CFG, workers=2)
    assert s.labels is None
    assert [Path(p).name for p in s.paths] == names
    assert s.images.shape == (8, 3, 32, 32) and torch.isfinite(s.images).all()


def test_non_wnid_subfolders_are_an_unlabelled_tree(tmp_path: Path) -> None:
    _img(tmp_path / "cats" / "x.jpg")
    _img(tmp_path / "dogs" / "deep" / "y.png")
    _img(tmp_path / "z.jpg")
    s = load_images(tmp_path, data_config=CFG)
    assert s.labels is None and len(s) == 3
    assert [Path(p).relative_to(tmp_path).as_posix() for p in s.paths] == ["cats/x.jpg", "dogs/deep/y.png", "z.jpg"]


def test_folder_fingerprint_is_by_content_not_path(tmp_path: Path) -> None:
    """Two copies of one image set in different folders match (the search's workers share a study by
    it); a file renamed, resized or added changes it; other files do not count."""
    for root in (tmp_path / "a", tmp_path / "elsewhere" / "b"):
        _img(root / "cats" / "x.jpg")
        _img(root / "y.png", seed=1)
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    first = folder_fingerprint(tmp_path / "a")
    assert first.startswith("2 files ") and first == folder_fingerprint(tmp_path / "elsewhere" / "b")
    (tmp_path / "a" / "y.png").rename(tmp_path / "a" / "z.png")
    renamed = folder_fingerprint(tmp_path / "a")
    _img(tmp_path / "a" / "z.png", size=(41, 30), seed=1)
    resized = folder_fingerprint(tmp_path / "a")
    _img(tmp_path / "a" / "w.jpg")
    assert len({first, renamed, resized, folder_fingerprint(tmp_path / "a")}) == 4
    with pytest.raises(DataError, match="does not exist"):
        folder_fingerprint(tmp_path / "missing")


def test_model_data_config_sets_the_transform(tmp_path: Path) -> None:
    import timm
    from timm.data import resolve_model_data_config

    model = timm.create_model("test_vit")
    _img(tmp_path / "a.png", size=(300, 200))
    s = load_images(tmp_path, model=model)
    assert tuple(s.images.shape[1:]) == tuple(resolve_model_data_config(model)["input_size"])
    # the given data_config wins over the model's
    assert load_images(tmp_path, model=model, data_config=CFG).images.shape == (1, 3, 32, 32)


# ---- bad files ----------------------------------------------------------------------------------
def test_corrupt_truncated_and_tiny_images_are_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)
    _img(tmp_path / "good1.jpg", seed=1)
    _img(tmp_path / "good2.png", seed=2)
    (tmp_path / "corrupt.jpg").write_bytes(np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes())
    full = _img(tmp_path / "full.jpg", size=(128, 128), seed=3).read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (tmp_path / "full.jpg").unlink()
    _img(tmp_path / "tiny.png", size=(4, 4))
    (tmp_path / "empty.png").write_bytes(b"")

    s = load_images(tmp_path, data_config=CFG, workers=2)
    assert [Path(p).name for p in s.paths] == ["good1.jpg", "good2.png"]
    reasons = {Path(p).name: r for p, r in s.skipped}
    assert set(reasons) == {"corrupt.jpg", "truncated.jpg", "tiny.png", "empty.png"}
    assert "UnidentifiedImageError" in reasons["corrupt.jpg"]
    assert "truncated" in reasons["truncated.jpg"]
    assert "4x4" in reasons["tiny.png"] and "min_size" in reasons["tiny.png"]
    assert all("\n" not in r for r in reasons.values())
    # a lower min_size keeps the tiny image
    assert "tiny.png" in [Path(p).name for p in load_images(tmp_path, data_config=CFG, min_size=2).paths]


# ---- limit --------------------------------------------------------------------------------------
WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361", "n01494475", "n01496331"]


def test_limit_is_stratified_seeded_and_deterministic(tmp_path: Path) -> None:
    _tree(tmp_path, WNIDS, per_class=3)
    index = imagenet_class_index()
    s = load_images(tmp_path, data_config=CFG, limit=6, seed=0)
    assert s.labels is not None and sorted(s.labels.tolist()) == sorted(index[w] for w in WNIDS)
    s4 = load_images(tmp_path, data_config=CFG, limit=4, seed=0)
    assert s4.labels is not None and len(set(s4.labels.tolist())) == 4
    s8 = load_images(tmp_path, data_config=CFG, limit=8, seed=0)
    assert s8.labels is not None and set(np.bincount(s8.labels.numpy())[[index[w] for w in WNIDS]].tolist()) == {1, 2}
    # deterministic, in sorted order, independent of the thread count
    again = load_images(tmp_path, data_config=CFG, limit=6, seed=0, workers=1)
    assert again.paths == s.paths == sorted(s.paths)
    assert torch.equal(again.images, s.images) and torch.equal(again.labels, s.labels)  # type: ignore[arg-type]
    picks = {tuple(load_images(tmp_path, data_config=CFG, limit=6, seed=k).paths) for k in range(4)}
    assert len(picks) > 1  # the seed matters
    assert len(load_images(tmp_path, data_config=CFG, limit=1000)) == 18


def test_limit_on_flat_folder_and_selection_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k in range(10):
        _img(tmp_path / f"{k:02d}.png", size=(20, 20), seed=k)
    calls: list[Path] = []
    real = data_mod._decode

    def counting(path: Path, **kw: Any) -> Any:
        calls.append(path)
        return real(path, **kw)

    monkeypatch.setattr(data_mod, "_decode", counting)
    s = load_images(tmp_path, data_config=CFG, limit=3, seed=5)
    assert len(s) == 3 and s.labels is None and len(calls) == 3
    assert s.paths == load_images(tmp_path, data_config=CFG, limit=3, seed=5).paths


def test_limit_returns_fewer_when_chosen_images_are_corrupt(tmp_path: Path) -> None:
    _img(tmp_path / "a.png")
    (tmp_path / "b.jpg").write_bytes(b"not a jpeg")
    s = load_images(tmp_path, data_config=CFG, limit=2)
    assert len(s) == 1 and len(s.skipped) == 1


# ---- ImageSet -----------------------------------------------------------------------------------
def test_subset_by_indices_slice_and_mask(tmp_path: Path) -> None:
    _tree(tmp_path, WNIDS[:3], per_class=2)
    s = load_images(tmp_path, data_config=CFG)
    assert s.labels is not None
    sub = s.subset([4, 0])
    assert sub.paths == [s.paths[4], s.paths[0]] and torch.equal(sub.images, s.images[[4, 0]])
    assert torch.equal(sub.labels, s.labels[[4, 0]])  # type: ignore[arg-type]
    assert s.subset(slice(0, 2)).paths == s.paths[:2]
    mask = torch.tensor([True, False] * 3)
    assert s.subset(mask).paths == s.paths[::2]
    assert len(s.subset([])) == 0
    with pytest.raises(DataError, match="out of range"):
        s.subset([6])
    with pytest.raises(DataError):
        ImageSet(images=torch.zeros(2, 3, 4, 4), labels=None, paths=["a"])


# ---- errors -------------------------------------------------------------------------------------
def test_errors_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"does not exist — pass --data with an ImageFolder tree"):
        load_images(tmp_path / "missing", data_config=CFG)
    (tmp_path / "file.jpg").write_bytes(b"x")
    with pytest.raises(DataError, match="not a directory"):
        load_images(tmp_path / "file.jpg", data_config=CFG)
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="no image files"):
        load_images(empty, data_config=CFG)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jpg").write_bytes(b"garbage")
    (bad / "b.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"none of the 2 selected image\(s\).*could be read"):
        load_images(bad, data_config=CFG)
    good = tmp_path / "good"
    _img(good / "a.png")
    with pytest.raises(DataError, match="pass model="):
        load_images(good)
    for limit in (0, -3):
        with pytest.raises(DataError, match="positive number"):
            load_images(good, data_config=CFG, limit=limit)
    with pytest.raises(DataError, match="min_size"):
        load_images(good, data_config=CFG, min_size=0)


def test_layout_errors(tmp_path: Path) -> None:
    mixed = tmp_path / "mixed"
    _img(mixed / "n01440764" / "a.jpg")
    _img(mixed / "cats" / "b.jpg")
    with pytest.raises(DataError, match="mixes WordNet-id class folders with folder"):
        list_images(mixed)
    loose = tmp_path / "loose"
    _img(loose / "n01440764" / "a.jpg")
    _img(loose / "b.jpg")
    with pytest.raises(DataError, match="loose image"):
        list_images(loose)
    unknown = tmp_path / "unknown"
    _img(unknown / "n99999999" / "a.jpg")
    with pytest.raises(DataError, match="not ImageNet-1k WordNet ids"):
        list_images(unknown)
    # an empty non-wnid folder beside the class folders is harmless
    ok = tmp_path / "ok"
    _img(ok / "n01440764" / "a.jpg")
    (ok / "cache").mkdir()
    assert list_images(ok)[1] == [0]


def test_error_messages_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_images(tmp_path / "missing", data_config=CFG)
    assert "\n" not in str(info.value)


# ---- real images --------------------------------------------------------------------------------
@pytest.mark.real
def test_real_eval_folder_limit_50() -> None:
    root = SHARED / "data" / "imagenet-eval"
    if not root.is_dir():
        pytest.skip(f"real images not found at {root} — set RAPID_SHARED to the shared/ folder")
    import timm

    model = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    s = load_images(root, model=model, limit=50, seed=0)
    assert s.images.shape == (50, 3, 224, 224) and s.images.dtype == torch.float32
    assert s.labels is not None and s.labels.dtype == torch.int64
    assert int(s.labels.min()) >= 0 and int(s.labels.max()) <= 999
    assert len(set(s.labels.tolist())) == 50
    index = imagenet_class_index()
    assert all(index[Path(p).parent.name] == int(y) for p, y in zip(s.paths, s.labels))
    assert s.skipped == []
