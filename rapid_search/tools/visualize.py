"""Token visualisation: which patches a schedule keeps, prunes or merges, layer by layer.

``rapid-search visualize --model deit_tiny_patch16_224 --schedule rapid@50 --image cat.jpg --out vis.png``
writes the (preprocessed) image plus one panel per chosen block: patches whose tokens were
pruned are blacked out, groups of patches merged into one token are drawn as coloured regions
with boundaries (as in the ToMe paper's figures), and patches still carried by their own token
show the image.

The pure core is :func:`labels_from_source`: from the source map of one layer (which input
tokens each surviving token covers) it computes a per-patch label array ``(H_p, W_p)`` with
``-1`` for pruned patches and a group id otherwise, so the groups partition the patch grid.

Example:
    >>> import timm, rapid_search
    >>> from rapid_search.tools.visualize import token_labels
    >>> model = timm.create_model("test_vit").eval()
    >>> import torch
    >>> labels = token_labels(model, torch.randn(1, 3, 160, 160), rapid_search.rapid_schedule(model, 0.5), layers=(5,))
    >>> labels[5].shape
    (10, 10)
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from .data import load_image
from ..runtime.patch import applied, last_source
from ..runtime.presets import as_schedule
from ..runtime.schedule import Schedule

__all__ = [
    "LayerLabels",
    "labels_from_source",
    "token_labels",
    "default_layers",
    "colour_labels",
    "render",
    "add_arguments",
    "main",
]

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class LayerLabels:
    """The partition of the patch grid after one block.

    Attributes:
        block: Block index (0-based); the labels describe the tokens leaving this block.
        labels: ``(H_p, W_p)`` int64: ``-1`` pruned, otherwise the id of the token covering the
            patch (ids are ``0..G-1`` in raster order of each group's first patch).
        tokens: Tokens leaving the block, prefix tokens included.
    """

    block: int
    labels: IntArray
    tokens: int

    @property
    def pruned(self) -> int:
        """Patches whose token was dropped."""
        return int((self.labels < 0).sum())

    @property
    def merged_groups(self) -> int:
        """Groups of two or more patches."""
        ids, sizes = np.unique(self.labels[self.labels >= 0], return_counts=True)
        return int((sizes > 1).sum())


def labels_from_source(source: Optional[Union[torch.Tensor, npt.ArrayLike]], *, num_prefix: int, grid: tuple[int, int]) -> IntArray:
    """Per-patch labels from one image's source map.

    Args:
        source: ``(N, N0)`` 0/1 map: row ``j`` marks the input tokens (prefix tokens first, then
            patches in raster order) that surviving token ``j`` covers; ``None`` means nothing
            was reduced yet (every patch is its own token).
        num_prefix: Prefix tokens (class, distillation, registers) at the start of both axes.
        grid: Patch grid ``(H_p, W_p)``; ``N0 - num_prefix`` must equal ``H_p * W_p``.

    Returns:
        ``(H_p, W_p)`` int64 array: ``-1`` where no surviving token covers the patch (pruned),
        otherwise the group id, numbered ``0..G-1`` in raster order of each group's first patch.

    Raises:
        ValueError: The map does not fit the grid, or a patch is covered by two tokens.
    """
    hp, wp = grid
    T = hp * wp
    if source is None:
        return np.arange(T, dtype=np.int64).reshape(hp, wp)
    s = source.detach().cpu().numpy() if isinstance(source, torch.Tensor) else np.asarray(source)
    if s.ndim != 2:
        raise ValueError(f"source must be (N, N0) for one image, got shape {s.shape} — index the batch first (source[0])")
    if s.shape[1] - num_prefix != T:
        raise ValueError(f"source covers {s.shape[1] - num_prefix} patches but the grid {hp}x{wp} has {T} — pass the model's patch grid")
    cover = s[:, num_prefix:] > 0.5  # (N, T) token j covers patch t
    per_patch = cover.sum(0)  # (T,)
    if (per_patch > 1).any():
        t = int(np.argmax(per_patch > 1))
        raise ValueError(f"patch {t} is covered by {int(per_patch[t])} tokens — the source map is not a partition (pass last_source of one image)")
    owner = np.where(per_patch == 1, cover.argmax(0), -1)  # (T,) token index or -1
    labels = np.full(T, -1, dtype=np.int64)
    remap: dict[int, int] = {}
    for t in range(T):  # renumber in raster order of first patch
        o = int(owner[t])
        if o >= 0:
            labels[t] = remap.setdefault(o, len(remap))
    return labels.reshape(hp, wp)


def default_layers(depth: int, count: int = 4) -> tuple[int, ...]:
    """``count`` blocks spread over the depth, ending at the last: ``(2, 5, 8, 11)`` for 12."""
    count = max(1, min(count, depth))
    return tuple(sorted({round(depth * (k + 1) / count) - 1 for k in range(count)}))


def _grid(model: nn.Module) -> tuple[int, int]:
    g = getattr(model.patch_embed, "grid_size", None)
    if g is None:
        n = int(model.patch_embed.num_patches)
        side = int(round(n**0.5))
        return side, side
    return int(g[0]), int(g[1])


@torch.inference_mode()
def token_labels(model: nn.Module, image: torch.Tensor, schedule: Any, *, layers: Sequence[int]) -> dict[int, IntArray]:
    """Per-patch labels after each chosen block for one image.

    Args:
        model: A timm ViT (unpatched or patched; it is left unpatched afterwards).
        image: ``(1, 3, H, W)`` preprocessed image at the model's input size.
        schedule: Anything :func:`rapid_search.as_schedule` accepts.
        layers: Block indices (0-based); labels describe the tokens leaving each block.

    Returns:
        ``{block: (H_p, W_p) int64 labels}`` (see :func:`labels_from_source`).
    """
    return {k: v.labels for k, v in _layer_labels(model, image, schedule, layers=layers).items()}


def _layer_labels(model: nn.Module, image: torch.Tensor, schedule: Any, *, layers: Sequence[int]) -> dict[int, LayerLabels]:
    depth = len(model.blocks)
    bad = [k for k in layers if not 0 <= int(k) < depth]
    if bad:
        raise ValueError(f"layers {bad} are outside 0..{depth - 1} — pick blocks of this {depth}-block model")
    if image.ndim != 4 or image.shape[0] != 1:
        raise ValueError(f"image must be one preprocessed image (1, 3, H, W), got {tuple(image.shape)} — use image[None]")
    sched = as_schedule(schedule, model)
    grid, P = _grid(model), int(model.num_prefix_tokens)
    captured: dict[int, tuple[Optional[torch.Tensor], int]] = {}
    wanted = set(int(k) for k in layers)
    was_training = model.training
    model.eval()
    with applied(model, sched, trace_source=True):
        handles = []
        for k in wanted:

            def hook(_m: nn.Module, _inp: Any, out: torch.Tensor, k: int = k) -> None:
                src = last_source(model)  # the map after block k (the forward updates it in place)
                captured[k] = (None if src is None else src[0].detach().clone(), int(out.shape[1]))

            handles.append(model.blocks[k].register_forward_hook(hook))
        try:
            device = next(model.parameters()).device
            model(image.to(device))
        finally:
            for h in handles:
                h.remove()
    model.train(was_training)
    return {
        k: LayerLabels(block=k, labels=labels_from_source(captured[k][0], num_prefix=P, grid=grid), tokens=captured[k][1])
        for k in sorted(wanted)
    }


def _palette(n: int) -> FloatArray:
    """``(n, 3)`` distinct, saturated colours in [0, 1] (golden-ratio hue steps)."""
    import colorsys

    sv = ((0.85, 0.95), (0.55, 1.0), (0.95, 0.7))  # vary saturation/value too, so many groups stay distinct
    cols = [colorsys.hsv_to_rgb((0.13 + i * 0.618034) % 1.0, *sv[i % 3]) for i in range(n)]
    return np.array(cols, dtype=np.float64).reshape(n, 3)


def colour_labels(image: FloatArray, labels: IntArray, *, alpha: float = 0.55) -> FloatArray:
    """Paint one panel: pruned patches dark, merged groups coloured with boundaries.

    Args:
        image: ``(H, W, 3)`` RGB in [0, 1] at the model's input size.
        labels: ``(H_p, W_p)`` labels from :func:`labels_from_source`.
        alpha: Opacity of a merged group's colour over the image.

    Returns:
        ``(H, W, 3)`` RGB in [0, 1].
    """
    H, W, _ = image.shape
    hp, wp = labels.shape
    ph, pw = H // hp, W // wp
    pix = np.kron(labels, np.ones((ph, pw), dtype=np.int64))  # (hp*ph, wp*pw)
    out = image[: hp * ph, : wp * pw].copy()
    ids, sizes = np.unique(labels[labels >= 0], return_counts=True)
    merged = ids[sizes > 1]
    colours = _palette(len(merged))
    for colour, gid in zip(colours, merged):
        m = pix == gid
        out[m] = (1 - alpha) * out[m] + alpha * colour
    pruned = pix < 0
    grey = out[pruned].mean(-1, keepdims=True)
    out[pruned] = 0.12 * grey + 0.02  # near black, a faint trace of the image
    # boundaries between different tokens (groups, singletons, pruned areas)
    edge = np.zeros(pix.shape, dtype=bool)
    edge[:, 1:] |= pix[:, 1:] != pix[:, :-1]
    edge[1:, :] |= pix[1:, :] != pix[:-1, :]
    in_group = np.isin(pix, merged)
    edge_group = edge & (in_group | np.roll(in_group, 1, 0) | np.roll(in_group, 1, 1))
    out[edge_group] = 1.0  # white outlines around merged regions
    return np.clip(out, 0.0, 1.0)


def _load_image(model: nn.Module, image_path: Union[str, Path]) -> tuple[torch.Tensor, FloatArray]:
    """The model's eval preprocessing of one image (:func:`rapid_search.tools.data.load_image`):
    ``(1, 3, H, W)`` input and ``(H, W, 3)`` display RGB."""
    from timm.data import resolve_model_data_config

    x = load_image(image_path, model=model)[None]  # (1, 3, H, W) normalised
    cfg = resolve_model_data_config(model)
    mean = torch.tensor(cfg["mean"]).view(3, 1, 1)
    std = torch.tensor(cfg["std"]).view(3, 1, 1)
    show = (x[0] * std + mean).clamp(0, 1).permute(1, 2, 0).numpy().astype(np.float64)  # (H, W, 3)
    return x, show


def render(
    model: nn.Module,
    image_path: Union[str, Path],
    schedule: Any,
    *,
    layers: Optional[Sequence[int]] = None,
    out: Union[str, Path],
    title: Optional[str] = None,
    dpi: int = 150,
) -> Path:
    """Write a figure (atomically, in the format of ``out``'s ending: .png, .pdf, .svg, ...): the image plus one panel per chosen block.

    Args:
        model: A timm ViT with its weights.
        image_path: Image file (any PIL-readable format); preprocessed with the model's eval transform.
        schedule: Anything :func:`rapid_search.as_schedule` accepts.
        layers: Blocks to show (0-based, after the block); default four spread over the depth.
        out: Output PNG path (parent folders are created).
        title: Figure title; default names the model and schedule.
        dpi: Resolution.

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from ..outputs import save_figure

    sched: Schedule = as_schedule(schedule, model)
    layers = default_layers(len(model.blocks)) if layers is None else tuple(int(k) for k in layers)
    x, show = _load_image(model, image_path)
    panels = _layer_labels(model, x, sched, layers=layers)
    n = 1 + len(panels)
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n, 3.1), squeeze=False)
    ax0 = axes[0, 0]
    ax0.imshow(show)
    ax0.set_title(f"input ({sched.model.num_tokens} tokens)", fontsize=9)
    T = int(np.prod(_grid(model)))
    for ax, (k, ll) in zip(axes[0, 1:], panels.items()):
        ax.imshow(colour_labels(show, ll.labels))
        spec = sched.layers[k]
        op = spec.op if spec.reduces else "none"
        ax.set_title(
            f"after block {k} ({op}): {ll.tokens} tokens\n{ll.merged_groups} merged groups, {ll.pruned}/{T} patches pruned",
            fontsize=8,
        )
    for ax in axes[0]:
        ax.set_xticks([])
        ax.set_yticks([])
    ach = (sched.budget.achieved or {}).get("ratio") if sched.budget is not None else None
    method = sched.provenance.get("method", "schedule")
    cost = f", {ach:.0%} GFLOPs" if isinstance(ach, (int, float)) else ""
    fig.suptitle(title or f"{sched.model.name}: {method}{cost}", fontsize=10)
    fig.legend(
        handles=[
            Patch(facecolor=(0.03, 0.03, 0.03), label="pruned"),
            Patch(facecolor=_palette(1)[0], edgecolor="white", label="merged group (one token)"),
            Patch(facecolor=(0.8, 0.8, 0.8), label="kept, own token (image)"),
        ],
        loc="lower center",
        ncol=3,
        fontsize=8,
        frameon=False,
    )
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    try:
        return save_figure(fig, out, dpi=dpi)
    finally:
        plt.close(fig)


def _parse_layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers {text!r} must be comma-separated block indices, e.g. 2,5,8,11") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``rapid-search visualize``."""
    parser.add_argument("--model", required=True, help="timm model name, e.g. deit_tiny_patch16_224")
    parser.add_argument(
        "--schedule",
        required=True,
        help="a YAML schedule, or METHOD@PERCENT with METHOD in rapid, tome, tome-decreasing (the paper's (r, -1)), tome-inflect-0.5, tofu, evit (e.g. rapid@50)",
    )
    parser.add_argument("--image", required=True, type=Path, help="image file to show")
    parser.add_argument("--out", required=True, type=Path, help="figure to write, format from its ending: .png, .pdf, .svg, ...")
    parser.add_argument("--layers", type=_parse_layers, default=None, help="blocks to show, 0-based (default: 4 spread over the depth)")
    parser.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True, help="load timm's pretrained weights")
    parser.add_argument("--checkpoint", type=Path, default=None, help="local weights file instead of the pretrained ones")


def main(args: argparse.Namespace) -> int:
    """Run ``rapid-search visualize``; returns the exit status."""
    from .bench import schedule_for_spec
    from .loading import load_model

    from ..outputs import FIGURE_FORMATS, check_output

    check_output(  # before the model is loaded: never an input of this command, never a device, a format it can draw
        args.out, option="--out", example="patches.png", formats=FIGURE_FORMATS,
        reads=[("the --image file", args.image), ("the --schedule file", Path(args.schedule)), ("the --checkpoint file", args.checkpoint)],
    )
    model = load_model(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint)
    sched = schedule_for_spec(args.schedule, model)
    path = render(model, args.image, sched, layers=args.layers, out=args.out)
    print(f"wrote {path}")
    return 0
