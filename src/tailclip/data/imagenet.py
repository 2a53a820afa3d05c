"""ImageNet (CoOp few-shot protocol) and its distribution-shift test sets -V2, -Sketch, -A, -R.

Class names are CLIP's ImageNet names (shipped; identical to open_clip's IMAGENET_CLASSNAMES). -A and -R hold
200 of the 1000 classes and are scored on those 200 (a 200-way task, as CLIP / CoOp / GLA evaluate them);
`task.meta["imagenet_class_indices"]` maps their labels to ImageNet's 1000 indices for models with a
1000-way head (take `logits[:, indices]`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..config import DataConfig
from ..errors import DataError
from .base import Split, Task
from .common import finish_task, folder_split, imagenet_classes, require_root, resource_text
from .registry import register_dataset

log = logging.getLogger(__name__)

IMAGENET_SOURCE = (
    "ILSVRC-2012 from https://image-net.org (val images sorted into <wnid>/ folders, e.g. with valprep.sh)"
)


def subset_wnids(name: str) -> list[str]:
    """The 200 wnids of ImageNet-A (`imagenet_a`) or ImageNet-R (`imagenet_r`), in ImageNet label order."""
    return [ln.strip() for ln in resource_text(f"imagenet/{name}_wnids.txt").splitlines() if ln.strip()]


def _pick_dir(candidates: list[Path], class_dirs: list[str], dataset: str, hint: str) -> Path:
    """The first candidate folder that holds at least one of the expected class folders."""
    for d in candidates:
        if d.is_dir() and any((d / c).is_dir() for c in class_dirs):
            return d
    looked = ", ".join(str(c) for c in candidates)
    raise DataError(f"dataset {dataset!r}: no class folders found (looked in {looked}). {hint}")


def _class_folders(base: Path, class_dirs: list[str], dataset: str, hint: str) -> Split:
    missing = [c for c in class_dirs if not (base / c).is_dir()]
    if missing:
        raise DataError(
            f"dataset {dataset!r}: {len(missing)} class folder(s) missing under {base}, e.g. "
            f"{', '.join(str(base / m) for m in missing[:5])}. {hint}"
        )
    return folder_split(base, class_dirs)


@register_dataset("imagenet")
def build_imagenet(cfg: DataConfig) -> Task:
    """ImageNet-1k: 1.28M train, 50,000 test (the official val set, which serves as the test split).

    Layout: `<root>/images/{train,val}/<wnid>/*.JPEG` (CoOp's `$DATA/imagenet`; root may also be `$DATA`) or
    `<root>/{train,val}/<wnid>/`.
    There is no val split: the official val images are the test split and are never used for a choice. With
    data.shots = K the few-shot val is drawn from the train images left after the K-shot draw (K per class, 20
    for K >= 32, as GLA's released code does; see data/fewshot.py), disjoint from the K-shot train images.
    """
    hint = f"Expected <root>/images/train/<wnid>/ and <root>/images/val/<wnid>/; images: {IMAGENET_SOURCE}."
    root = require_root(cfg, hint)
    wnids, names = imagenet_classes()
    # root itself, or CoOp's $DATA (holding imagenet/), so one --root serves ImageNet and the CoOp datasets
    candidates = [root / "images", root / "imagenet" / "images", root / "imagenet", root]
    base = next((c for c in candidates if (c / "train").is_dir()), root)
    splits = {}
    for split_name, folder in (("train", "train"), ("test", "val")):
        if not (base / folder).is_dir():
            raise DataError(f"dataset 'imagenet': missing folder {base / folder}. {hint}")
        splits[split_name] = _class_folders(base / folder, list(wnids), "imagenet", hint)
    return finish_task(cfg, names, splits, "imagenet80")


@register_dataset("imagenet-v2")
def build_imagenet_v2(cfg: DataConfig) -> Task:
    """ImageNetV2 matched-frequency (test only): 10,000 images, 1000 classes.

    Layout: `<root>/imagenetv2-matched-frequency-format-val/<0..999>/*.jpeg` (or root = that folder), from
    https://huggingface.co/datasets/vaishaal/ImageNetV2 (imagenetv2-matched-frequency.tar.gz).
    """
    hint = (
        "Expected <root>/imagenetv2-matched-frequency-format-val/<0..999>/ from "
        "https://huggingface.co/datasets/vaishaal/ImageNetV2."
    )
    root = require_root(cfg, hint)
    _, names = imagenet_classes()
    dirs = [str(i) for i in range(1000)]
    base = _pick_dir([root / "imagenetv2-matched-frequency-format-val", root], dirs, cfg.name, hint)
    present = [d for d in dirs if (base / d).is_dir()]
    if len(present) != 1000:
        log.warning("imagenet-v2: %d of 1000 class folders present under %s", len(present), base)
    test = folder_split(base, present, [int(d) for d in present])
    return finish_task(cfg, names, {"test": test}, "imagenet80")


@register_dataset("imagenet-sketch")
def build_imagenet_sketch(cfg: DataConfig) -> Task:
    """ImageNet-Sketch (test only): 50,889 sketches, 1000 classes.

    Layout: `<root>/images/<wnid>/*.JPEG` (CoOp renames `sketch/` to `images/`; `sketch/` or root itself work
    too), from https://github.com/HaohanWang/ImageNet-Sketch.
    """
    hint = (
        "Expected <root>/images/<wnid>/ (or <root>/sketch/<wnid>/) from https://github.com/HaohanWang/ImageNet-Sketch."
    )
    root = require_root(cfg, hint)
    wnids, names = imagenet_classes()
    base = _pick_dir([root / "images", root / "sketch", root], list(wnids), cfg.name, hint)
    test = _class_folders(base, list(wnids), cfg.name, hint)
    return finish_task(cfg, names, {"test": test}, "imagenet80")


def _subset_task(cfg: DataConfig, which: str, folder: str, source: str) -> Task:
    hint = f"Expected <root>/{folder}/<wnid>/ (200 class folders) from {source}."
    root = require_root(cfg, hint)
    wnids, names = imagenet_classes()
    subset = subset_wnids(which)
    index = {w: i for i, w in enumerate(wnids)}
    base = _pick_dir([root / folder, root], subset, cfg.name, hint)
    test = _class_folders(base, subset, cfg.name, hint)
    indices = [index[w] for w in subset]
    meta = {"imagenet_class_indices": indices, "wnids": subset}
    return finish_task(cfg, [names[i] for i in indices], {"test": test}, "imagenet80", meta)


@register_dataset("imagenet-a")
def build_imagenet_a(cfg: DataConfig) -> Task:
    """ImageNet-A (test only): 7,500 natural adversarial images, scored on its 200 classes.

    Layout: `<root>/imagenet-a/<wnid>/*.jpg` (CoOp's `$DATA/imagenet-adversarial`) or root = that folder, from
    https://github.com/hendrycks/natural-adv-examples (imagenet-a.tar).
    """
    return _subset_task(cfg, "imagenet_a", "imagenet-a", "https://github.com/hendrycks/natural-adv-examples")


@register_dataset("imagenet-r")
def build_imagenet_r(cfg: DataConfig) -> Task:
    """ImageNet-R (test only): 30,000 renditions, scored on its 200 classes.

    Layout: `<root>/imagenet-r/<wnid>/*.jpg` (CoOp's `$DATA/imagenet-rendition`) or root = that folder, from
    https://github.com/hendrycks/imagenet-r (imagenet-r.tar).
    """
    return _subset_task(cfg, "imagenet_r", "imagenet-r", "https://github.com/hendrycks/imagenet-r")
