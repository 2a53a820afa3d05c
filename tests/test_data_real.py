"""Loaders on the real public split lists in ../shared/data (skipped when that folder is absent).

Images are not there, but builders only read the lists, so each builder runs on the real files."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from tailclip.config import DataConfig
from tailclip.data import build_task
from tailclip.data.common import read_list_file, resource_text
from tailclip.data.coop import read_coop_split
from tailclip.data.lt import inat2018_categories

SHARED = Path(os.environ.get("TAILCLIP_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
pytestmark = pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} not present")
LT = SHARED / "lt-splits"


def test_imagenet_lt_lists() -> None:
    for name, n, per_class in (("test", 50_000, 50), ("val", 20_000, 20)):
        paths, labels = read_list_file(LT / "ImageNet_LT" / f"ImageNet_LT_{name}.txt")
        assert len(paths) == n and np.bincount(labels).tolist() == [per_class] * 1000
    shipped = resource_text("imagenet/classnames.txt")
    assert shipped == (LT / "ImageNet_LT" / "classnames.txt").read_text()


def test_places_lt_task(tmp_path: Path) -> None:
    for s in ("train", "val", "test"):
        (tmp_path / "Places_LT").mkdir(exist_ok=True)
        os.symlink(LT / "Places_LT" / f"Places_LT_{s}.txt", tmp_path / "Places_LT" / f"Places_LT_{s}.txt")
    task = build_task(DataConfig(name="places-lt", root=str(tmp_path)))
    assert [len(task.split(s)) for s in ("train", "val", "test")] == [62_500, 7_300, 36_500]
    counts = task.class_counts
    assert task.num_classes == 365 and counts.max() == 4980 and counts.min() == 5
    assert np.bincount(task.split("test").labels).tolist() == [100] * 365
    assert task.classnames[1] == "airplane cabin"


def test_inat_val_list_and_names() -> None:
    paths, labels = read_list_file(LT / "iNaturalist18" / "iNaturalist18_val.txt")
    assert len(paths) == 24_426 and labels.max() == 8141 and labels.min() == 0
    cats = json.loads((LT / "iNaturalist18" / "categories.json").read_text())
    names = {c["id"]: c["name"] for c in cats}
    assert [c["name"] for c in inat2018_categories()] == [names[i] for i in range(len(names))]


COOP = {  # file -> (our dataset, CoOp folder, image folder, train/val/test sizes, classes)
    "split_zhou_Caltech101.json": ("caltech101", "caltech-101", "101_ObjectCategories", (4128, 1649, 2465), 100),
    "split_zhou_DescribableTextures.json": ("dtd", "dtd", "images", (2820, 1128, 1692), 47),
    "split_zhou_EuroSAT.json": ("eurosat", "eurosat", "2750", (13500, 5400, 8100), 10),
    "split_zhou_OxfordFlowers.json": ("oxford_flowers", "oxford_flowers", "jpg", (4093, 1633, 2463), 102),
    "split_zhou_OxfordPets.json": ("oxford_pets", "oxford_pets", "images", (2944, 736, 3669), 37),
    "split_zhou_StanfordCars.json": ("stanford_cars", "stanford_cars", "", (6509, 1635, 8041), 196),
    "split_zhou_UCF101.json": ("ucf101", "ucf101", "UCF-101-midframes", (7639, 1898, 3783), 101),
}


@pytest.mark.parametrize("split_file", sorted(COOP))
def test_coop_split_files(tmp_path: Path, split_file: str) -> None:
    name, coop_dir, image_dir, sizes, n_classes = COOP[split_file]
    d = tmp_path / coop_dir
    (d / image_dir).mkdir(parents=True, exist_ok=True)
    shutil.copy(SHARED / "coop-splits" / split_file, d / split_file)
    task = build_task(DataConfig(name=name, root=str(tmp_path), shots=16, seed=1))
    assert task.num_classes == n_classes and len(task.split("test")) == sizes[2]
    assert all("_" not in c for c in task.classnames)
    assert task.class_counts.max() == 16 and len(task.meta["shot_indices"]["val"]) <= 4 * n_classes
    names, splits = read_coop_split(d / split_file, d, {})
    assert tuple(len(splits[s]) for s in ("train", "val", "test")) == sizes and len(names) == n_classes


def test_fgvc_train_list() -> None:
    lines = (SHARED / "coop-splits" / "images_variant_train.txt").read_text().splitlines()
    assert len(lines) == 3334 and len({ln.partition(" ")[2] for ln in lines}) == 100
