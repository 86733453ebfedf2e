"""Loading image folders into one preprocessed tensor, with ImageNet-1k labels when known.

Two layouts are understood (see :func:`load_images`):

* an ImageFolder tree whose class folders are WordNet ids (``root/n01440764/xxx.jpg``):
  labelled, with labels taken from the wnid -> ImageNet-1k index mapping of timm's
  :class:`timm.data.ImageNetInfo` (never from the sorted order of the folders present, since a
  folder usually holds only a subset of the 1000 classes);
* any other folder (flat, or with sub-folders not named like WordNet ids): unlabelled, every image
  under it (recursively) is used and ``labels`` is ``None``.

Each file is decoded exactly once (optionally on a small thread pool) with the model's timm eval
transform; unreadable, truncated or tiny images are skipped and reported, never fatal.

This module needs only torch, timm, numpy, PIL and the standard library.

Example:
    >>> import timm
    >>> from rapid_search.tools.data import load_images
    >>> model = timm.create_model("deit_tiny_patch16_224")  # doctest: +SKIP
    >>> imgs = load_images("../shared/data/imagenet-calib", model=model, limit=100)  # doctest: +SKIP
    >>> imgs.images.shape, imgs.labels.shape  # doctest: +SKIP
    (torch.Size([100, 3, 224, 224]), torch.Size([100]))
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import stat
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
from ..errors import RapidSearchError

__all__ = [
    "IMAGE_EXTENSIONS",
    "DataError",
    "ImageSet",
    "folder_fingerprint",
    "imagenet_class_index",
    "imagenet_label_names",
    "list_images",
    "load_image",
    "load_images",
]

#: File name endings (lower case) read as images; matched case-insensitively.
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")

_WNID = re.compile(r"n\d{8}")

#: Keyword arguments of ``timm.data.create_transform`` that a data config may supply.
_TRANSFORM_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")

#: What PIL raises on corrupt, truncated or hostile files (UnidentifiedImageError is an OSError).
_DECODE_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError)


class DataError(RapidSearchError, ValueError):
    """The image folder cannot be used; the one-line message says what to do."""


@dataclass
class ImageSet:
    """Preprocessed images of one folder, in a deterministic order.

    Attributes:
        images: ``(N, 3, H, W)`` float32, the model's timm eval transform (resized, cropped,
            normalised).
        labels: ``(N,)`` int64 ImageNet-1k class indices (0..999), or ``None`` for unlabelled
            folders.
        paths: ``N`` file paths, ``paths[i]`` is the source of ``images[i]``.
        skipped: ``(path, reason)`` of every selected file that could not be used (unreadable,
            corrupt, truncated, smaller than ``min_size``).
        data_config: The timm data config the transform was built from (``input_size``,
            ``interpolation``, ``mean``, ``std``, ``crop_pct``, ``crop_mode``).
    """

    images: torch.Tensor
    labels: Optional[torch.Tensor]
    paths: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    data_config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise DataError(f"images must be (N, 3, H, W), got shape {tuple(self.images.shape)} — stack the preprocessed images")
        n = self.images.shape[0]
        if self.labels is not None and tuple(self.labels.shape) != (n,):
            raise DataError(f"labels must be ({n},), got shape {tuple(self.labels.shape)} — pass one label per image or None")
        if len(self.paths) != n:
            raise DataError(f"{len(self.paths)} paths for {n} images — pass one path per image")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, idx: Union[Sequence[int], slice, torch.Tensor, np.ndarray]) -> ImageSet:
        """The images at ``idx``, in that order.

        Args:
            idx: Integer indices, a slice, or a ``(N,)`` boolean mask (tensor or array).

        Returns:
            A new :class:`ImageSet` (``images`` and ``labels`` are copies, ``skipped`` and
            ``data_config`` are shared with this one).
        """
        n = len(self)
        if isinstance(idx, slice):
            index = torch.arange(n)[idx]
        else:
            index = torch.as_tensor(np.asarray(idx) if not isinstance(idx, torch.Tensor) else idx)
            if index.dtype == torch.bool:
                if tuple(index.shape) != (n,):
                    raise DataError(f"boolean mask of shape {tuple(index.shape)} for {n} images — pass a ({n},) mask")
                index = index.nonzero().flatten()
            elif index.numel() == 0:
                index = index.reshape(0).long()
            elif index.dtype.is_floating_point or index.dtype.is_complex:
                raise DataError(f"subset indices must be integers, got {index.dtype} — pass integer indices or a boolean mask")
            index = index.long().reshape(-1)
        if index.numel() and (int(index.min()) < -n or int(index.max()) >= n):
            raise DataError(f"subset index out of range for {n} images — pass indices in 0..{n - 1}")
        index = index % max(n, 1)
        rows = index.tolist()
        return ImageSet(
            images=self.images[index],
            labels=None if self.labels is None else self.labels[index],
            paths=[self.paths[i] for i in rows],
            skipped=self.skipped,
            data_config=self.data_config,
        )


# ---- ImageNet-1k classes -----------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _imagenet_info() -> Any:
    from timm.data import ImageNetInfo

    return ImageNetInfo("imagenet-1k")


@functools.lru_cache(maxsize=1)
def _class_index() -> dict[str, int]:
    # ImageNetInfo has index -> wnid (index_to_label_name) but no wnid -> index: invert the list
    return {wnid: i for i, wnid in enumerate(_imagenet_info().label_names())}


def imagenet_class_index() -> dict[str, int]:
    """WordNet id -> ImageNet-1k class index (``{'n01440764': 0, 'n01443537': 1, ...}``, 1000 entries)."""
    return dict(_class_index())


def imagenet_label_names() -> list[str]:
    """The 1000 ImageNet-1k class names (WordNet lemmas, e.g. ``'tench, Tinca tinca'``), by class index."""
    info = _imagenet_info()
    return [str(d) for d in info.label_descriptions(detailed=False)]


# ---- finding files -----------------------------------------------------------------------------
def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


class _Walk:
    """One walk over a data folder: each real directory entered once (symlink loops, a folder
    linked twice) and each real file listed once (hard links, symbolic links to the same image),
    whatever the file names' encoding; entries that cannot be examined (a symbolic link to
    itself, a dangling link, an unreadable sub-folder) are left out, never fatal."""

    def __init__(self) -> None:
        self.dirs: set[tuple[int, int]] = set()
        self.files: set[tuple[int, int]] = set()

    def enter(self, folder: Path) -> bool:
        """Whether ``folder`` is a directory not entered before (marks it entered)."""
        return _first_visit(folder, stat.S_ISDIR, self.dirs)

    def take(self, path: Path) -> bool:
        """Whether ``path`` is a regular file not listed before (marks it listed)."""
        return _first_visit(path, stat.S_ISREG, self.files)

    def images(self, folder: Path) -> list[Path]:
        """Every image file under ``folder`` (recursive, hidden entries skipped), sorted."""
        found: list[Path] = []
        todo = [folder]
        while todo:
            d = todo.pop()
            if not self.enter(d):
                continue
            try:
                entries = sorted(os.scandir(d), key=lambda e: e.name)
            except OSError:
                continue  # an unreadable sub-folder: its images are not there to use
            subdirs = []
            for e in entries:
                if e.name.startswith("."):
                    continue
                if _is_image(e.name) and self.take(Path(e.path)):
                    found.append(Path(e.path))
                elif _entry_is_dir(e):
                    subdirs.append(Path(e.path))
            todo.extend(reversed(subdirs))  # depth first, in name order
        return sorted(found)


def _first_visit(path: Path, kind: Callable[[int], bool], seen: set[tuple[int, int]]) -> bool:
    """Whether ``path`` (links followed) is of ``kind`` and its (device, inode) not in ``seen`` (added)."""
    try:
        st = os.stat(path)
    except OSError:  # a link to itself (ELOOP), dangling, no permission
        return False
    key = (st.st_dev, st.st_ino)
    if not kind(st.st_mode) or key in seen:
        return False
    seen.add(key)
    return True


def _entry_is_dir(e: "os.DirEntry[str]") -> bool:
    try:
        return e.is_dir()  # follows symbolic links
    except OSError:
        return False


def list_images(root: Union[str, os.PathLike]) -> tuple[list[Path], Optional[list[int]]]:
    """The image files of a data folder and, for a WordNet-id tree, their ImageNet-1k labels.

    ``root`` is labelled when its sub-folders that hold images are all named like WordNet ids
    (``n\\d{8}``) and it holds no images itself; it is unlabelled when none of them is (a flat
    folder, or a tree of other names, searched recursively). Hidden files and folders are ignored.

    Args:
        root: The data folder.

    Returns:
        ``(paths, labels)``: sorted paths (by class folder, then path) and one ImageNet-1k index
        per path, or ``None`` for labels when the folder is unlabelled.

    Raises:
        DataError: Missing root, not a directory, no images, a WordNet-id folder that is not an
            ImageNet-1k class, or a mix of WordNet-id folders and other images.
    """
    root = Path(root)
    hint = "pass --data with an ImageFolder tree of WordNet-id folders or a flat folder of images"
    if not root.exists():
        raise DataError(f"data folder {root} does not exist — {hint}")
    if not root.is_dir():
        raise DataError(f"data path {root} is not a directory — {hint}")
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as e:
        raise DataError(f"cannot list data folder {root} ({e.__class__.__name__}) — check its permissions") from None
    walk = _Walk()
    walk.enter(root)
    top_files = [Path(e.path) for e in entries if _is_image(e.name) and walk.take(Path(e.path))]
    subdirs = [Path(e.path) for e in entries if not e.name.startswith(".") and _entry_is_dir(e)]
    per_dir = {d: walk.images(d) for d in subdirs}
    with_images = [d for d in subdirs if per_dir[d]]
    wnid_dirs = [d for d in with_images if _WNID.fullmatch(d.name)]

    if not wnid_dirs:  # flat folder or a tree of other names: unlabelled
        paths = sorted(top_files + [p for d in with_images for p in per_dir[d]])
        if not paths:
            raise DataError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found under {root} — {hint}")
        return paths, None

    other = [d.name for d in with_images if not _WNID.fullmatch(d.name)]
    if other or top_files:
        what = f"folder(s) {', '.join(other[:3])}" if other else f"{len(top_files)} loose image(s) such as {top_files[0].name}"
        raise DataError(
            f"{root} mixes WordNet-id class folders with {what} — move every image into its WordNet-id folder, "
            "or pass a folder without WordNet-id names for unlabelled images"
        )
    index = _class_index()
    unknown = [d.name for d in wnid_dirs if d.name not in index]
    if unknown:
        raise DataError(
            f"folder(s) {', '.join(unknown[:3])} under {root} are not ImageNet-1k WordNet ids — "
            "remove them, or rename the folders for unlabelled images"
        )
    paths: list[Path] = []
    labels: list[int] = []
    for d in wnid_dirs:
        paths.extend(per_dir[d])
        labels.extend([index[d.name]] * len(per_dir[d]))
    return paths, labels


def folder_fingerprint(root: Union[str, os.PathLike]) -> str:
    """``"<count> files <hash>"``: the images :func:`list_images` finds under ``root``, by content
    (relative names and sizes), not by path: two copies of one image set in different folders match.

    Raises:
        DataError: As :func:`list_images`.
    """
    root = Path(root)
    files, _ = list_images(root)
    h = hashlib.sha256()
    for f in files:
        try:
            size = f.stat().st_size
        except OSError:
            size = -1
        h.update(f"{f.relative_to(root).as_posix()}\0{size}\n".encode("utf-8", "surrogateescape"))  # any file name
    return f"{len(files)} files {h.hexdigest()[:16]}"


# ---- selection ---------------------------------------------------------------------------------
def _select(labels: Optional[list[int]], n: int, limit: Optional[int], seed: int) -> list[int]:
    """Indices (ascending) of at most ``limit`` of ``n`` files, seeded and class-stratified."""
    if limit is None or limit >= n:
        return list(range(n))
    rng = np.random.default_rng(seed)
    if labels is None:
        return sorted(int(i) for i in rng.permutation(n)[:limit])
    by_class: dict[int, list[int]] = {}
    for i, c in enumerate(labels):
        by_class.setdefault(c, []).append(i)
    classes = sorted(by_class)
    queues = [[by_class[classes[int(k)]][int(j)] for j in rng.permutation(len(by_class[classes[int(k)]]))] for k in rng.permutation(len(classes))]
    chosen: list[int] = []
    depth = 0
    while len(chosen) < limit:  # round-robin: one image per class, in the shuffled class order
        for q in queues:
            if depth < len(q):
                chosen.append(q[depth])
                if len(chosen) == limit:
                    break
        depth += 1
    return sorted(chosen)


# ---- decoding ----------------------------------------------------------------------------------
def _resolve_config(model: Optional[nn.Module], data_config: Optional[dict[str, Any]]) -> dict[str, Any]:
    from timm.data import resolve_model_data_config

    if data_config is not None:
        cfg = dict(data_config)
    elif model is not None:
        cfg = dict(resolve_model_data_config(model))
    else:
        raise DataError("load_images needs the model's preprocessing — pass model= (a timm model) or data_config=")
    if "input_size" not in cfg:
        raise DataError("data_config has no 'input_size' — pass timm.data.resolve_model_data_config(model)")
    return {k: cfg[k] for k in _TRANSFORM_KEYS if k in cfg}


def _decode(path: Path, transform: Callable[[Any], torch.Tensor], min_size: int) -> tuple[Optional[torch.Tensor], str]:
    """Decode and preprocess one file: ``((3, H, W) tensor, '')`` or ``(None, reason)``."""
    from PIL import Image

    bomb = f"more than {Image.MAX_IMAGE_PIXELS} pixels (PIL's limit against decompression bombs)"
    try:
        with Image.open(path) as im:  # reads the header only
            w, h = im.size
            if w * h > Image.MAX_IMAGE_PIXELS:  # refused before decoding (PIL itself only warns up to twice that)
                return None, f"{w}x{h} px, {bomb}"
            im.load()
            if min(w, h) < min_size:
                return None, f"too small: {w}x{h} px, short side below min_size={min_size}"
            rgb = im.convert("RGB")
        return transform(rgb), ""
    except Image.DecompressionBombError:
        return None, bomb
    except _DECODE_ERRORS as e:
        msg = str(e).splitlines()[0] if str(e) else ""
        return None, f"unreadable: {e.__class__.__name__}" + (f": {msg}" if msg else "")


def load_images(
    root: Union[str, os.PathLike],
    *,
    model: Optional[nn.Module] = None,
    data_config: Optional[dict[str, Any]] = None,
    limit: Optional[int] = None,
    seed: int = 0,
    min_size: int = 16,
    workers: Optional[int] = None,
) -> ImageSet:
    """Decode and preprocess the images of a folder with a timm model's eval transform.

    Layouts (see :func:`list_images`): an ImageFolder tree of WordNet-id folders
    (``root/n01440764/*.jpg``, recursive within each class folder) gives ImageNet-1k labels from
    timm's ``ImageNetInfo``; a flat folder, or a tree whose folders are not WordNet ids (searched
    recursively), gives ``labels=None``. Extensions: jpg, jpeg, png, bmp, webp, tif, tiff, gif (any
    case). EXIF orientation is not applied (as timm's own ImageNet evaluation).

    With ``limit``, at most ``limit`` files are chosen *before* decoding, deterministically from
    ``seed``: for labelled folders round-robin over the classes in a seeded shuffled order (one
    seeded-random image per class, then a second, ...), so ``limit`` >= number of classes covers
    every class; otherwise a seeded random sample. The result is in sorted path order either way.

    Args:
        root: The data folder.
        model: timm model whose data config (``timm.data.resolve_model_data_config``) sets the
            preprocessing; ignored when ``data_config`` is given.
        data_config: timm data config (``input_size``, ``interpolation``, ``mean``, ``std``,
            ``crop_pct``, ``crop_mode``) to use instead of the model's.
        limit: Use at most this many images (None: all).
        seed: Seed of the ``limit`` selection.
        min_size: Skip images whose short side is below this many pixels.
        workers: Decoding threads (default ``min(4, os.cpu_count())``; 0 or 1: no pool). The
            result does not depend on it.

    Returns:
        The :class:`ImageSet`: ``images`` ``(N, 3, H, W)`` float32, ``labels`` ``(N,)`` int64 or
        None, ``paths``, ``skipped`` ``(path, reason)`` pairs and ``data_config``. ``N`` can be
        below ``limit`` when chosen files were unreadable.

    Raises:
        DataError: Missing or non-directory root, no image files, bad layout (see
            :func:`list_images`), bad options, or no readable image at all.
    """
    if limit is not None and (isinstance(limit, bool) or int(limit) != limit or limit < 1):
        raise DataError(f"limit={limit!r} must be a positive number of images — pass e.g. limit=100, or None for all")
    if min_size < 1:
        raise DataError(f"min_size={min_size!r} must be at least 1 pixel — pass e.g. min_size=16")
    if workers is not None and workers < 0:
        raise DataError(f"workers={workers!r} must be 0 or more — pass e.g. workers=4, or None for the default")
    cfg = _resolve_config(model, data_config)
    from timm.data import create_transform

    transform = create_transform(**cfg, is_training=False)
    files, file_labels = list_images(root)
    chosen = _select(file_labels, len(files), None if limit is None else int(limit), seed)
    todo = [files[i] for i in chosen]
    n_workers = min(4, os.cpu_count() or 1) if workers is None else workers

    buf: Optional[torch.Tensor] = None
    kept: list[int] = []  # positions in `chosen`
    skipped: list[tuple[str, str]] = []

    def consume(results: Any) -> None:
        nonlocal buf
        for pos, (x, reason) in enumerate(results):
            if x is None:
                skipped.append((str(todo[pos]), reason))
                continue
            if buf is None:
                buf = torch.empty((len(todo), *x.shape), dtype=torch.float32)
            elif tuple(x.shape) != tuple(buf.shape[1:]):
                raise DataError(
                    f"the transform gave {tuple(x.shape)} for {todo[pos]} but {tuple(buf.shape[1:])} before — "
                    "use a data config with a fixed input_size and centre crop"
                )
            buf[len(kept)] = x
            kept.append(pos)

    decode = functools.partial(_decode, transform=transform, min_size=min_size)
    if n_workers <= 1 or len(todo) <= 1:
        consume(map(decode, todo))
    else:
        with ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="rapid-decode") as pool:
            consume(pool.map(decode, todo))  # results come back in submission order

    if buf is None:
        first = f" (first: {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        raise DataError(f"none of the {len(todo)} selected image(s) under {root} could be read{first} — check the files or pass another --data folder")
    images = buf if len(kept) == len(todo) else buf[: len(kept)].clone()
    labels = None
    if file_labels is not None:
        labels = torch.tensor([file_labels[chosen[p]] for p in kept], dtype=torch.int64)
    return ImageSet(
        images=images,
        labels=labels,
        paths=[str(todo[p]) for p in kept],
        skipped=skipped,
        data_config=cfg,
    )


def load_image(path: Union[str, os.PathLike], *, model: Optional[nn.Module] = None, data_config: Optional[dict[str, Any]] = None) -> torch.Tensor:
    """One image through the same eval preprocessing as :func:`load_images`: ``(3, H, W)``.

    Raises:
        DataError: The file is missing or cannot be decoded.
    """
    from timm.data import create_transform

    from ..outputs import input_problem

    path = Path(path)
    problem = input_problem(path)  # missing, a directory, a device or fifo
    if problem is not None:
        raise DataError(f"image {path} {problem} — pass a JPEG/PNG file")
    x, why = _decode(path, create_transform(**_resolve_config(model, data_config), is_training=False), 1)
    if x is None:
        raise DataError(f"image {path} is {why} — pass a JPEG/PNG file")
    return x
