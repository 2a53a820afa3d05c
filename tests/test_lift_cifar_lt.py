"""CIFAR-100-LT keeps the images the literature keeps: LDAM's `IMBALANCECIFAR100` (used as is by LIFT), checked
against a direct transcription of its rule on a fake CIFAR-100 pickle whose pixels encode each image's index."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from tailclip.config import DataConfig
from tailclip.data import build_task
from tailclip.data.cifar import lt_profile, select_lt

PER_CLASS = 30


def ldam_kept(targets: list[int], imb_factor: float) -> list[int]:
    """LDAM's gen_imbalanced_data, transcribed: global numpy seed 0, classes in order, one shuffle each."""
    img_max = len(targets) / 100
    img_num_per_cls = [int(img_max * (imb_factor ** (i / (100 - 1.0)))) for i in range(100)]
    targets_np = np.array(targets, dtype=np.int64)
    np.random.seed(0)
    kept: list[int] = []
    for the_class, the_img_num in zip(np.unique(targets_np), img_num_per_cls):
        idx = np.where(targets_np == the_class)[0]
        np.random.shuffle(idx)
        kept.extend(idx[:the_img_num].tolist())
    return kept


@pytest.fixture(scope="module")
def cifar(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """Fake pickles: 30 train images per class in a shuffled class order; red + green encode the image index."""
    root = tmp_path_factory.mktemp("cifar-lt")
    d = root / "cifar-100-python"
    d.mkdir()
    with open(d / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"class_{i:02d}" for i in range(100)]}, f)
    train_labels = np.random.default_rng(5).permutation(np.repeat(np.arange(100), PER_CLASS))
    for part, labels in (("train", train_labels), ("test", np.repeat(np.arange(100), 2))):
        i = np.arange(len(labels))
        data = np.zeros((len(labels), 3, 32, 32), dtype=np.uint8)
        data[:, 0], data[:, 1] = (i % 256)[:, None, None], (i // 256)[:, None, None]
        with open(d / part, "wb") as f:
            pickle.dump({"data": data.reshape(len(labels), -1), "fine_labels": labels.tolist()}, f)
    return root, train_labels


@pytest.mark.parametrize("beta", [100, 50, 10])
def test_default_keeps_the_literature_images(cifar: tuple[Path, np.ndarray], beta: int) -> None:
    root, labels = cifar
    expected = sorted(ldam_kept(labels.tolist(), 1 / beta))
    state = np.random.get_state()
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    train, val, _ = select_lt(labels, beta, seed=None)
    assert np.array_equal(np.random.get_state()[1], before)  # the global generator is left alone
    np.random.set_state(state)
    assert train.tolist() == expected
    assert not set(val) - set(range(len(labels)))

    task = build_task(DataConfig(name="cifar100-lt", root=str(root), imbalance_ratio=beta, seed=7))
    split = task.split("train")
    pixels = (split.images.load(i).getpixel((0, 0)) for i in range(len(split)))
    kept = sorted(int(p[0]) + 256 * int(p[1]) for p in pixels)
    assert kept == expected and split.labels.tolist() == labels[sorted(expected)].tolist()
    assert task.class_counts.tolist() == lt_profile(PER_CLASS, 100, beta).tolist()
    assert task.meta["lt_order"].startswith("literature") and task.meta["lt_seed"] == 0


def test_seeded_order_is_an_option(cifar: tuple[Path, np.ndarray]) -> None:
    root, _ = cifar
    default = build_task(DataConfig(name="cifar100-lt", root=str(root), seed=1))
    seeded = [build_task(DataConfig(name="cifar100-lt-seeded", root=str(root), seed=s)) for s in (1, 1, 2)]
    assert seeded[0].class_counts.tolist() == default.class_counts.tolist()
    assert seeded[0].meta["lt_order"] == "seeded" and seeded[2].meta["lt_seed"] == 2

    def pixels(task) -> list[tuple]:
        split = task.split("train")
        return [split.images.load(i).getpixel((0, 0)) for i in range(0, len(split), 7)]

    assert pixels(seeded[0]) == pixels(seeded[1]) != pixels(seeded[2])
    assert pixels(seeded[0]) != pixels(default)
