"""Few-shot protocols without test leakage: where the few-shot validation images come from (a dataset's own
val split, else the train images the K-shot draw left, as GLA's released ImageNet code does), that they are
disjoint from train and test, and that the draws are reproducible per seed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tailclip.config import DataConfig
from tailclip.data import apply_shots, build_task, sample_k_shot
from tailclip.data.common import imagenet_classes
from tailclip.data.coop import SPECS, read_coop_split
from tailclip.data.fewshot import fewshot_val_shots, sample_train_val
from tailclip.errors import DataError

TRAIN_PER_CLASS = {0: 12, 5: 12, 7: 3}  # class 7 is short: 3 images for K = 2 train + 2 val


def fake_imagenet(root: Path) -> Path:
    """CoOp's `$DATA/imagenet` layout: all 1000 wnid folders, a few of them holding tiny images."""
    wnids, _ = imagenet_classes()
    base = root / "imagenet" / "images"
    for split in ("train", "val"):
        for w in wnids:
            (base / split / w).mkdir(parents=True)
    for c, n in TRAIN_PER_CLASS.items():
        for i in range(n):
            Image.new("RGB", (4, 4), (c, i, 0)).save(base / "train" / wnids[c] / f"tr{i}.JPEG")
        for i in range(3):
            Image.new("RGB", (4, 4), (c, i, 9)).save(base / "val" / wnids[c] / f"te{i}.JPEG")
    return root / "imagenet"


def paths(task, split: str) -> list[str]:
    images = task.split(split).images
    return [images.ident(i) for i in range(len(images))]


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fake_imagenet(tmp_path_factory.mktemp("inet"))


def test_imagenet_fewshot_val_comes_from_train_not_test(imagenet_root: Path) -> None:
    full = build_task(DataConfig(name="imagenet", root=str(imagenet_root)))
    assert "val" not in full.splits
    task = build_task(DataConfig(name="imagenet", root=str(imagenet_root), shots=2, seed=1))
    train, val, test = (set(paths(task, s)) for s in ("train", "val", "test"))
    assert not val & test and not val & train and not train & test
    assert all("/images/train/" in p for p in val)
    assert set(paths(task, "test")) == set(paths(full, "test"))  # the test split is untouched
    # K val images per class; the short class fills train first and val with its one image left
    assert np.bincount(task.split("train").labels, minlength=8)[[0, 5, 7]].tolist() == [2, 2, 2]
    assert np.bincount(task.split("val").labels, minlength=8)[[0, 5, 7]].tolist() == [2, 2, 1]
    assert task.meta["val_source"] == "train" and set(task.meta["shot_indices"]) == {"train", "val"}
    # the K-shot train images are the same draw as without a val split
    assert task.meta["shot_indices"]["train"] == sample_k_shot(full.split("train").labels, 2, seed=1).tolist()


def test_imagenet_draw_reproducible_per_seed(imagenet_root: Path) -> None:
    def draw(seed: int) -> dict:
        return build_task(DataConfig(name="imagenet", root=str(imagenet_root), shots=4, seed=seed)).meta["shot_indices"]

    a = draw(1)
    assert a == draw(1) and a != draw(2)
    full = build_task(DataConfig(name="imagenet", root=str(imagenet_root)))
    stored = json.loads(json.dumps(a))  # as a run folder would keep them
    again = apply_shots(full, DataConfig(name="imagenet", shots=4, seed=77), indices=stored)
    few = build_task(DataConfig(name="imagenet", root=str(imagenet_root), shots=4, seed=1))
    for s in ("train", "val"):
        assert paths(again, s) == paths(few, s)
    with pytest.raises(DataError, match="share images"):
        apply_shots(full, DataConfig(name="imagenet"), indices={"train": a["train"], "val": a["train"][:2]})


def test_val_counts_follow_the_released_protocols() -> None:
    # from a val split: CoOp's min(K, 4); from train: K, and 20 from K = 32 on (GLA's released ImageNet code)
    assert [fewshot_val_shots(k, "val") for k in (1, 2, 4, 8, 16)] == [1, 2, 4, 4, 4]
    from_train = [fewshot_val_shots(k, "train") for k in (1, 2, 4, 8, 16, 31, 32, 64, 128)]
    assert from_train == [1, 2, 4, 8, 16, 31, 20, 20, 20]
    labels = np.repeat(np.arange(3), 60)
    tr, va = sample_train_val(labels, 32, fewshot_val_shots(32, "train"), seed=3)
    assert np.bincount(labels[tr]).tolist() == [32] * 3 and np.bincount(labels[va]).tolist() == [20] * 3
    assert not set(tr) & set(va)
    tr2, va2 = sample_train_val(labels, {0: 5, 1: 1}, 4, seed=3)  # long-tailed train counts; class 2 val only
    assert np.bincount(labels[tr2], minlength=3).tolist() == [5, 1, 0]
    assert np.bincount(labels[va2]).tolist() == [4, 4, 4] and not set(tr2) & set(va2)


def test_imagenet_base_to_new_val_from_train(imagenet_root: Path) -> None:
    task = build_task(DataConfig(name="imagenet-b2n", root=str(imagenet_root), shots=2, seed=1))
    train, val = set(paths(task, "train")), set(paths(task, "val"))
    assert val and not val & train and not val & set(paths(task, "test"))
    assert set(task.split("val").labels.tolist()) <= set(task.meta["base_classes"])
    assert task.meta["val_source"] == "train"
    lt = build_task(DataConfig(name="imagenet-b2n-lt", root=str(imagenet_root), shots=8, seed=1))
    assert not set(paths(lt, "val")) & set(paths(lt, "train"))
    assert np.bincount(lt.split("val").labels, minlength=8)[[0, 5]].tolist() == [4, 4]


def test_coop_fewshot_val_stays_on_the_val_split(tmp_path: Path) -> None:
    data = {s: [[f"c{y}/{s}_{i}.jpg", y, f"c{y}"] for y in range(2) for i in range(n)]
            for s, n in (("train", 8), ("val", 6), ("test", 3))}  # fmt: skip
    (tmp_path / "split_zhou_DescribableTextures.json").write_text(json.dumps(data))
    (tmp_path / "images").mkdir()
    task = build_task(DataConfig(name="dtd", root=str(tmp_path), shots=8, seed=1))
    assert task.meta["val_source"] == "val"
    assert all("/val_" in p for p in paths(task, "val")) and np.bincount(task.split("val").labels).tolist() == [4, 4]


SHARED = Path(os.environ.get("TAILCLIP_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.mark.skipif(not (SHARED / "coop-splits").is_dir(), reason="real CoOp split files not present")
def test_real_coop_splits_have_a_val_split_disjoint_from_test() -> None:
    """Every CoOp split file present has its own val split, so few-shot val never needs train or test."""
    found = 0
    for spec in SPECS:
        path = SHARED / "coop-splits" / spec.split_file
        if not path.is_file():
            continue
        found += 1
        _, splits = read_coop_split(path, Path("/images"), spec.renames)
        sets = {s: {split.images.ident(i) for i in range(len(split))} for s, split in splits.items()}
        assert set(sets) == {"train", "val", "test"}, spec.name
        assert not sets["val"] & sets["test"] and not sets["val"] & sets["train"], spec.name
        k = 16
        val = sample_k_shot(splits["val"].labels, fewshot_val_shots(k, "val"), seed=1)
        assert np.bincount(splits["val"].labels[val]).max() == 4
    assert found
