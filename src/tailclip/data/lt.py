"""ImageNet-LT, Places-LT and iNaturalist 2018 from their standard split lists (`relative/path label` lines).

The lists are looked for in `<root>`, then in a split-files folder at root (`<root>/<ListsDir>/` such as
`ImageNet_LT/`, or `<root>/splits/`); image paths in the lists are relative to `<root>`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..config import DataConfig
from ..errors import DataError
from .base import FileImages, Split, Task
from .common import display_name, find_file, finish_task, imagenet_classes, read_list_file, require_root, resource_text
from .registry import register_dataset

log = logging.getLogger(__name__)

OLTR_LISTS = "https://github.com/zhmiao/OpenLongTailRecognition-OLTR (split lists, Google Drive link in its README)"


def _list_dirs(root: Path, lists_dir: str) -> list[Path]:
    return [root, root / lists_dir, root / "splits"]


def _lt_splits(
    cfg: DataConfig,
    root: Path,
    prefix: str,
    lists_dir: str,
    files: dict[str, str],
    optional: tuple[str, ...],
    hint: str,
) -> dict[str, Split]:
    """Read one list per split; a split in `optional` may be absent (logged), the others are required."""
    splits: dict[str, Split] = {}
    for split_name, suffix in files.items():
        filename = f"{prefix}_{suffix}.txt"
        try:
            path = find_file(_list_dirs(root, lists_dir), filename, cfg.name, hint)
        except DataError:
            if split_name in optional:
                log.info("%s: no %s list, so no %s split", cfg.name, filename, split_name)
                continue
            raise
        paths, labels = read_list_file(path)
        splits[split_name] = Split(FileImages(str(root), paths), labels)
    return splits


@register_dataset("imagenet-lt")
def build_imagenet_lt(cfg: DataConfig) -> Task:
    """ImageNet-LT (Liu et al. 2019): 1000 classes, 115,846 train (1280..5 per class) / 20,000 val / 50,000 test.

    Layout: `<root>/train/<wnid>/*.JPEG` and `<root>/val/<wnid>/*.JPEG` (ILSVRC-2012 from https://image-net.org,
    val images sorted into class folders) plus ImageNet_LT_{train,val,test}.txt from the OLTR release
    (https://github.com/zhmiao/OpenLongTailRecognition-OLTR), in root or `<root>/ImageNet_LT/`.
    Class names: CLIP's ImageNet names (shipped). Templates: the 80 CLIP ImageNet templates.
    """
    hint = (
        "Get ImageNet_LT_{train,val,test}.txt from " + OLTR_LISTS + " and ILSVRC-2012 from https://image-net.org "
        "(train/<wnid>/, val/<wnid>/ under root)."
    )
    root = require_root(cfg, hint)
    files = {"train": "train", "val": "val", "test": "test"}
    splits = _lt_splits(cfg, root, "ImageNet_LT", "ImageNet_LT", files, ("val",), hint)
    _, names = imagenet_classes()
    return finish_task(cfg, names, splits, "imagenet80", meta={"source": "ImageNet-LT (OLTR lists)"})


@register_dataset("places-lt")
def build_places_lt(cfg: DataConfig) -> Task:
    """Places-LT (Liu et al. 2019): 365 classes, 62,500 train (4980..5 per class) / 7,300 val / 36,500 test.

    Layout: Places365-Standard images (http://places2.csail.mit.edu/download.html, 256x256) placed so the list
    paths resolve under root (`<root>/train/<class>/...`, `<root>/val/<class>/...`, the OLTR / LIFT layout),
    plus Places_LT_{train,val,test}.txt from the OLTR release, in root or `<root>/Places_LT/`.
    """
    hint = (
        "Get Places_LT_{train,val,test}.txt from " + OLTR_LISTS + " and the Places365-Standard images from "
        "http://places2.csail.mit.edu/download.html, placed so the list paths resolve under root."
    )
    root = require_root(cfg, hint)
    files = {"train": "train", "val": "val", "test": "test"}
    splits = _lt_splits(cfg, root, "Places_LT", "Places_LT", files, ("val",), hint)
    names = [display_name(ln.split(" ", 1)[-1]) for ln in resource_text("places_lt/classnames.txt").splitlines() if ln]
    return finish_task(cfg, names, splits, "imagenet80", meta={"source": "Places-LT (OLTR lists)"})


def inat2018_categories() -> list[dict[str, str]]:
    """The 8,142 iNaturalist 2018 categories (id order) with their taxonomy, from the shipped table."""
    lines = resource_text("inat2018/categories.tsv").splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, ln.split("\t"))) for ln in lines[1:] if ln]


@register_dataset("inat2018")
def build_inat2018(cfg: DataConfig) -> Task:
    """iNaturalist 2018: 8,142 species, 437,513 train / 24,426 test (the official val set; no separate val).

    Layout: `<root>/train_val2018/<supercategory>/<id>/*.jpg` from https://github.com/visipedia/inat_comp
    (2018, train_val2018.tar.gz) plus iNaturalist18_train.txt and iNaturalist18_val.txt (the lists of
    https://github.com/facebookresearch/classifier-balancing, also used by LIFT), in root or
    `<root>/iNaturalist18/`. As in the literature, the official val list is our test split.
    Class names: the species names of categories.json (shipped).
    """
    hint = (
        "Get iNaturalist18_{train,val}.txt from https://github.com/facebookresearch/classifier-balancing and the "
        "2018 images (train_val2018/) from https://github.com/visipedia/inat_comp."
    )
    root = require_root(cfg, hint)
    splits = _lt_splits(cfg, root, "iNaturalist18", "iNaturalist18", {"train": "train", "test": "val"}, (), hint)
    names = [c["name"] for c in inat2018_categories()]
    return finish_task(cfg, names, splits, "imagenet80", meta={"source": "iNaturalist 2018 (val list = test)"})
