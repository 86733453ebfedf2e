"""Every timm model is either supported or refused with one line — never another exception.

Models are built on the meta device (no weights, no compute). By default the ViT-family modules
(every name in them) are built with ``depth=2`` (block types do not vary with depth in these
classes), and every other timm module with its first model at full size: the suite stays fast.
``RAPID_COVERAGE=all`` builds **every** name ``timm.list_models()`` gives at full size (minutes);
the report (accepted per family class) is printed either way (``pytest -s``). The facts the cost
model reads (``ModelInfo``) are read for every accepted model, except that by default hybrid
(CNN-stem) embeddings, whose cost is counted on fake tensors, are left to ``test_families``.
"""

from __future__ import annotations

import collections
import os
import warnings

import pytest
import timm
import torch

import rapid_search as rs
from rapid_search.runtime.families import family_name

#: timm modules whose models are (or subclass) VisionTransformer, Eva, Beit, VisionTransformerRelPos, NaFlexVit.
VIT_MODULES = (
    "vision_transformer",
    "vision_transformer_hybrid",
    "vision_transformer_relpos",
    "vision_transformer_sam",
    "deit",
    "eva",
    "beit",
    "naflexvit",
    "vitamin",
)
VIT_CLASSES = ("VisionTransformer", "Eva", "Beit", "VisionTransformerRelPos", "NaFlexVit")
DONE_WHEN = (
    "eva02_tiny_patch14_224",
    "vit_base_patch16_siglip_224",
    "beit_base_patch16_224",
    "vit_small_patch16_rope_224",
    "vit_relpos_small_patch16_224",
    "vit_small_patch16_18x2_224",
    "vit_base_patch16_dinov3",
)
FULL = os.environ.get("RAPID_COVERAGE") == "all"


def _names() -> list[tuple[str, bool]]:
    """(model name, build with depth=2)."""
    if FULL:
        return [(n, False) for n in timm.list_models()]
    out = []
    for mod in timm.list_modules():
        names = timm.list_models(module=mod)
        if mod in VIT_MODULES:
            out += [(n, True) for n in names]
        elif names:
            out.append((names[0], False))
    return out


def _build(name: str, shallow: bool):
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        if shallow:
            try:
                return timm.create_model(name, depth=2)
            except Exception:  # noqa: BLE001 - e.g. per-block settings sized for the full depth
                pass
        return timm.create_model(name)


def test_every_model_is_supported_or_refused_in_one_line():
    names = _names()
    assert len(names) > (1000 if FULL else 350)
    classes, accepted, families = collections.Counter(), collections.Counter(), collections.Counter()
    unbuildable, refusals, crashes = {}, collections.Counter(), []
    for name, shallow in names:
        try:
            model = _build(name, shallow)
        except Exception as e:  # noqa: BLE001 - timm itself cannot build it (e.g. missing optional deps)
            unbuildable[name] = f"{type(e).__name__}: {e}"[:120]
            continue
        cls = type(model).__name__
        classes[cls] += 1
        try:
            rs.check_model(model)
            if FULL or type(model.patch_embed).__name__ == "PatchEmbed":  # hybrid stems are counted on fake tensors: slow
                info = rs.ModelInfo.from_model(model)  # every fact the cost model reads is there
                assert info.num_tokens > info.num_prefix_tokens >= 0 and info.base_macs > 0
            accepted[cls] += 1
            families[family_name(model)] += 1
        except rs.UnsupportedModelError as e:
            msg = str(e)
            if "\n" in msg or not msg:
                crashes.append(f"{name}: refusal is not one line: {msg!r}")
            if cls in VIT_CLASSES:
                refusals[msg.split(" — ")[0][:100]] += 1
        except Exception as e:  # noqa: BLE001 - the point of the test
            crashes.append(f"{name}: {type(e).__name__}: {e}"[:300])
        del model
    vit_total = sum(classes[c] for c in VIT_CLASSES)
    vit_ok = sum(accepted[c] for c in VIT_CLASSES)
    report = [f"{'full' if FULL else 'default'} coverage: {len(names)} names, {len(unbuildable)} not buildable by timm"]
    report += [f"  {c}: {accepted[c]} / {classes[c]} accepted" for c in sorted(classes, key=lambda c: -classes[c]) if accepted[c] or c in VIT_CLASSES]
    report += [f"  ViT family ({', '.join(VIT_CLASSES)}): {vit_ok} / {vit_total} = {vit_ok / max(vit_total, 1):.1%}"]
    report += [f"  adapters: {dict(families)}"] + [f"  refused {n}x: {m}" for m, n in refusals.most_common()]
    report += [f"  not buildable: {n}: {why}" for n, why in unbuildable.items()]
    print("\n".join(report))
    assert not crashes, "\n".join(crashes)
    assert vit_ok >= 0.9 * vit_total, "\n".join(report)


@pytest.mark.parametrize("name", DONE_WHEN)
def test_done_when_models_accepted_at_full_size(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    rs.check_model(model)
    info = rs.ModelInfo.from_model(model)
    for s in (rs.rapid_schedule(info, 0.5), rs.tome_for_ratio(info, 0.5)):
        assert s.budget.achieved["ratio"] <= 0.5


def test_refusals_name_the_reason():
    from timm.models.vision_transformer import ParallelScalingBlock, VisionTransformer

    cases = (
        (torch.nn.Linear(2, 2), "not a timm VisionTransformer"),
        (VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, block_fn=ParallelScalingBlock), "same input"),
    )
    with torch.device("meta"):
        cases += ((timm.create_model("naflexvit_base_patch16_gap"), "NaFlexVit"),)
    for model, match in cases:
        with pytest.raises(rs.UnsupportedModelError, match=match):
            rs.check_model(model)
    with pytest.raises(rs.UnsupportedModelError, match="not a torch module"):
        rs.check_model("vit_base_patch16_224")
