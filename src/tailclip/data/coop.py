"""The CoOp few-shot datasets from CoOp's fixed splits (`split_zhou_*.json`; FGVC-Aircraft from its variant
lists), with CoOp's class-name normalisations. K-shot sampling: `data.shots` + `data.seed` (see fewshot.py).

Root: the dataset's own folder (e.g. `$DATA/oxford_pets`) or CoOp's `$DATA` folder holding it. Download
instructions and layouts: https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md (also in data/README.md).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import DataConfig
from ..errors import DataError
from .base import FileImages, Split, Task
from .common import display_name, finish_task, require_root
from .registry import register_dataset

log = logging.getLogger(__name__)

COOP_DATASETS_MD = "https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md"
COOP_SPLITS = "split files: https://github.com/KaiyangZhou/CoOp (links in DATASETS.md)"

# CoOp renames (applied when it wrote the split files; re-applied here so self-made splits match).
CALTECH_NEW_CNAMES = {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike"}
EUROSAT_NEW_CNAMES = {
    "AnnualCrop": "Annual Crop Land",
    "Forest": "Forest",
    "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road",
    "Industrial": "Industrial Buildings",
    "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land",
    "Residential": "Residential Buildings",
    "River": "River",
    "SeaLake": "Sea or Lake",
}


@dataclass(frozen=True)
class CoOpSpec:
    """Where one CoOp dataset keeps its files, and what it is."""

    name: str  # our registry name
    coop_dir: str  # CoOp's folder name under $DATA
    image_dir: str  # image folder inside it ("" = the dataset folder itself)
    split_file: str
    description: str
    source: str
    renames: dict[str, str] = field(default_factory=dict)


SPECS = [
    CoOpSpec(
        "caltech101",
        "caltech-101",
        "101_ObjectCategories",
        "split_zhou_Caltech101.json",
        "Caltech101 (CoOp split): 100 object classes, 4,128 / 1,649 / 2,465 train/val/test.",
        "https://data.caltech.edu/records/20086 (101_ObjectCategories)",
        CALTECH_NEW_CNAMES,
    ),
    CoOpSpec(
        "oxford_pets",
        "oxford_pets",
        "images",
        "split_zhou_OxfordPets.json",
        "Oxford-IIIT Pets (CoOp split): 37 breeds, 2,944 / 736 / 3,669 train/val/test.",
        "https://www.robots.ox.ac.uk/~vgg/data/pets/ (images.tar.gz)",
    ),
    CoOpSpec(
        "stanford_cars",
        "stanford_cars",
        "",
        "split_zhou_StanfordCars.json",
        "Stanford Cars (CoOp split): 196 models, 6,509 / 1,635 / 8,041 train/val/test.",
        "http://ai.stanford.edu/~jkrause/cars/car_dataset.html (cars_train/, cars_test/)",
    ),
    CoOpSpec(
        "oxford_flowers",
        "oxford_flowers",
        "jpg",
        "split_zhou_OxfordFlowers.json",
        "Oxford Flowers-102 (CoOp split): 102 species, 4,093 / 1,633 / 2,463 train/val/test.",
        "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/ (102flowers.tgz -> jpg/)",
    ),
    CoOpSpec(
        "food101",
        "food-101",
        "images",
        "split_zhou_Food101.json",
        "Food-101 (CoOp split): 101 dishes, 50,500 / 20,200 / 30,300 train/val/test.",
        "https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/",
    ),
    CoOpSpec(
        "sun397",
        "sun397",
        "SUN397",
        "split_zhou_SUN397.json",
        "SUN397 (CoOp split): 397 scene classes, 15,880 / 3,970 / 19,850 train/val/test.",
        "http://vision.princeton.edu/projects/2010/SUN/SUN397.tar.gz",
    ),
    CoOpSpec(
        "dtd",
        "dtd",
        "images",
        "split_zhou_DescribableTextures.json",
        "Describable Textures (CoOp split): 47 textures, 2,820 / 1,128 / 1,692 train/val/test.",
        "https://www.robots.ox.ac.uk/~vgg/data/dtd/ (dtd-r1.0.1.tar.gz)",
    ),
    CoOpSpec(
        "eurosat",
        "eurosat",
        "2750",
        "split_zhou_EuroSAT.json",
        "EuroSAT RGB (CoOp split): 10 land-cover classes, 13,500 / 5,400 / 8,100 train/val/test.",
        "http://madm.dfki.de/files/sentinel/EuroSAT.zip (folder 2750/)",
        EUROSAT_NEW_CNAMES,
    ),
    CoOpSpec(
        "ucf101",
        "ucf101",
        "UCF-101-midframes",
        "split_zhou_UCF101.json",
        "UCF101 middle frames (CoOp split): 101 actions, 7,639 / 1,898 / 3,783 train/val/test.",
        "UCF-101-midframes.zip linked from CoOp's DATASETS.md",
    ),
]


def _hint(layout: str, source: str) -> str:
    return f"Expected {layout}; images from {source}; {COOP_SPLITS}; see {COOP_DATASETS_MD}."


def _dataset_dir(root: Path, coop_dir: str, marker: str) -> Path | None:
    """The folder holding `marker`: root itself, or CoOp's `$DATA/<coop_dir>`."""
    for d in (root, root / coop_dir):
        if (d / marker).is_file():
            return d
    return None


def read_coop_split(path: Path, image_root: Path, renames: dict[str, str]) -> tuple[list[str], dict[str, Split]]:
    """Parse a `split_zhou_*.json` ({split: [[relative_path, label, classname], ...]}) into class names + splits."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read split file {path}: {exc}") from None
    names: dict[int, str] = {}
    splits: dict[str, Split] = {}
    for split_name in ("train", "val", "test"):
        rows = data.get(split_name)
        if rows is None:
            continue
        paths, labels = [], []
        for row in rows:
            try:
                rel, label, cname = row
                label = int(label)
            except (TypeError, ValueError):
                raise DataError(f"{path}: {split_name} entry {row!r} is not [path, label, classname]") from None
            cname = display_name(renames.get(cname, cname))
            if names.setdefault(label, cname) != cname:
                raise DataError(f"{path}: label {label} is named both {names[label]!r} and {cname!r}")
            paths.append(rel)
            labels.append(label)
        splits[split_name] = Split(FileImages(str(image_root), paths), np.asarray(labels, dtype=np.int64))
    if "train" not in splits or "test" not in splits:
        raise DataError(f"{path}: needs 'train' and 'test' lists, has {sorted(data)}")
    if sorted(names) != list(range(len(names))):
        missing = sorted(set(range(max(names) + 1)) - set(names))
        raise DataError(f"{path}: labels are not 0..{max(names)}; no image has label(s) {missing[:10]}")
    return [names[i] for i in range(len(names))], splits


def _make_json_builder(spec: CoOpSpec) -> Callable[[DataConfig], Task]:
    layout = f"<root>/{spec.split_file} and <root>/{spec.image_dir or '<images>'}/ (root = $DATA/{spec.coop_dir})"
    hint = _hint(layout, spec.source)

    def build(cfg: DataConfig) -> Task:
        root = require_root(cfg, hint)
        d = _dataset_dir(root, spec.coop_dir, spec.split_file)
        if d is None:
            looked = f"{root / spec.split_file}, {root / spec.coop_dir / spec.split_file}"
            raise DataError(
                f"dataset {spec.name!r}: missing split file {spec.split_file} (looked for {looked}). {hint}"
            )
        image_root = d / spec.image_dir if spec.image_dir else d
        if not image_root.is_dir():
            raise DataError(f"dataset {spec.name!r}: missing image folder {image_root}. {hint}")
        names, splits = read_coop_split(d / spec.split_file, image_root, spec.renames)
        return finish_task(cfg, names, splits, f"coop_{spec.name}", meta={"split_file": str(d / spec.split_file)})

    build.__name__ = f"build_{spec.name}"
    build.__doc__ = f"{spec.description}\n\n    Layout: {layout}. Images: {spec.source}.\n"
    return build


for _spec in SPECS:
    register_dataset(_spec.name)(_make_json_builder(_spec))


FGVC_SOURCE = "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz"


@register_dataset("fgvc_aircraft")
def build_fgvc_aircraft(cfg: DataConfig) -> Task:
    """FGVC-Aircraft variants (CoOp split): 100 classes, 3,334 / 3,333 / 3,333 train/val/test.

    Layout: `fgvc-aircraft-2013b/data/` (CoOp renames it `$DATA/fgvc_aircraft/`) with images/<id>.jpg,
    variants.txt (class order) and images_variant_{train,val,test}.txt (`<id> <variant name>` lines).
    Source: https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz
    """
    hint = _hint("<root>/variants.txt, <root>/images_variant_{train,val,test}.txt, <root>/images/", FGVC_SOURCE)
    root = require_root(cfg, hint)
    d = _dataset_dir(root, "fgvc_aircraft", "variants.txt") or _dataset_dir(root, "data", "variants.txt")
    if d is None:
        raise DataError(f"dataset 'fgvc_aircraft': missing file {root / 'variants.txt'}. {hint}")
    names = [ln.strip() for ln in (d / "variants.txt").read_text(encoding="utf-8").splitlines() if ln.strip()]
    index = {n: i for i, n in enumerate(names)}
    splits: dict[str, Split] = {}
    for split_name in ("train", "val", "test"):
        path = d / f"images_variant_{split_name}.txt"
        if not path.is_file():
            raise DataError(f"dataset 'fgvc_aircraft': missing file {path}. {hint}")
        paths, labels = [], []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            image_id, _, variant = line.strip().partition(" ")
            if variant not in index:
                raise DataError(f"{path}:{lineno}: variant {variant!r} is not in {d / 'variants.txt'}")
            paths.append(f"{image_id}.jpg")
            labels.append(index[variant])
        splits[split_name] = Split(FileImages(str(d / "images"), paths), np.asarray(labels, dtype=np.int64))
    return finish_task(cfg, names, splits, "coop_fgvc_aircraft", meta={"split_dir": str(d)})
