"""What many test modules share: tiny image folders and in-memory tasks, metrics.csv readers, a counting backbone,
a free port. Test modules import from here, never from each other."""

from __future__ import annotations

import csv
import socket
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tailclip.data.base import ArrayImages, Split, Task

TRAIN_COUNTS = (14, 7, 4, 2)


def make_image_folder(root: Path, counts: tuple[int, ...] = TRAIN_COUNTS, val: int = 2, test: int = 3) -> Path:
    """<root>/{train,val,test}/<class>/*.png: class c is a noisy colour, so the tiny model can learn something."""
    rng = np.random.default_rng(0)
    colours = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40), (40, 200, 200)]
    for split, per in (("train", counts), ("val", [val] * len(counts)), ("test", [test] * len(counts))):
        for c, n in enumerate(per):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = np.clip(np.array(colours[c]) + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{i}.png")
    return root


def make_class_folders(root: Path, classes: int = 3, per_class: int = 6, size: int = 32) -> Path:
    """<root>/<class>/*.png without split folders (what `tailclip predict` and a user's unsplit folder give):
    solid-colour PNGs with noise, learnable and deterministic."""
    rng = np.random.default_rng(0)
    colours = [(220, 30, 30), (30, 200, 40), (40, 60, 220), (200, 200, 30)]
    for c in range(classes):
        d = root / f"class_{c}"
        d.mkdir(parents=True)
        for i in range(per_class):
            arr = np.clip(np.array(colours[c])[None, None] + rng.normal(0, 20, (size, size, 3)), 0, 255)
            Image.fromarray(arr.astype(np.uint8)).save(d / f"{i}.png")
    return root


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as fh:
        return list(csv.DictReader(fh))


def deterministic_columns(rows: list[dict[str, str]]) -> list[tuple[str, ...]]:
    return [(r["epoch"], r["lr"], r["loss"], r["train_acc"], r["val_top1"]) for r in rows]


def tiny_task(n_train: int = 24, classes: int = 3) -> Task:
    rng = np.random.default_rng(1)

    def split(n: int) -> Split:
        y = np.arange(n) % classes
        x = (rng.random((n, 32, 32, 3)) * 80 + y[:, None, None, None] * 60).astype(np.uint8)
        return Split(ArrayImages(x, "mem"), y)

    return Task("toy", [f"thing {i}" for i in range(classes)], ["a photo of a {}."],
                {"train": split(n_train), "val": split(6), "test": split(6)})


def color_task(num_classes: int = 4, per_class: int = 6, size: int = 32, seed: int = 0, name: str = "colors") -> Task:
    """Images whose mean colour depends on the class (separable features even for a random-weight CLIP)."""
    rng = np.random.default_rng(seed)
    palette = rng.integers(0, 256, size=(num_classes, 3))

    def split(n: int, tag: str) -> Split:
        labels = np.repeat(np.arange(num_classes), n)
        imgs = np.clip(palette[labels][:, None, None, :] + rng.normal(0, 25, (len(labels), size, size, 3)), 0, 255)
        return Split(ArrayImages(imgs.astype(np.uint8), f"{name}-{tag}"), labels)

    return Task(name, [f"class {i}" for i in range(num_classes)], ["a photo of a {}."],
                {"train": split(per_class, "train"), "val": split(per_class, "val"), "test": split(per_class, "test")})


def register_color_dataset(name: str = "test-colors", num_classes: int = 4, per_class: int = 6) -> str:
    """Register an in-memory dataset (once) so api.run can build it by name; shots/seed pick K per class."""
    from tailclip.data.registry import DATASETS, register_dataset

    if name not in DATASETS:

        @register_dataset(name)
        def build(cfg):
            """TEST in-memory colour classes."""
            task = color_task(num_classes, per_class, name=name)
            if cfg.shots is not None:
                rng = np.random.default_rng(cfg.seed)
                labels = task.splits["train"].labels
                idx = np.sort(np.concatenate([rng.choice(np.nonzero(labels == c)[0], cfg.shots, replace=False)
                                              for c in range(num_classes)]))
                task.splits["train"] = task.splits["train"].subset(idx)
            return task

    return name


class CountingBackbone:
    """Wraps a backbone to count image-tower calls (a hit must not run the backbone)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.calls = 0

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def encode_image(self, images: torch.Tensor, taps=()):
        self.calls += 1
        return self.inner.encode_image(images, taps=taps)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
