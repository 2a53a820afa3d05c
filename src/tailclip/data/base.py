"""The dataset contract: a Task is class names + templates + labelled splits; a split is a list of items
that load as PIL images. Transforms are applied by `LabeledImages`, so one Task serves every backbone."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from ..errors import CorruptImageError, DataError

log = logging.getLogger(__name__)


class ImageSource(Protocol):
    """Anything that yields images by index: files on disk, arrays in memory, a procedural generator."""

    def __len__(self) -> int: ...

    def load(self, index: int) -> Image.Image:
        """Return the RGB image; raise CorruptImageError naming the file when it cannot be decoded."""
        ...

    def ident(self, index: int) -> str:
        """A stable identifier (usually the path) used in error messages, fingerprints and reports."""
        ...


class FileImages:
    """Images stored as files: `paths` are relative to `root` (or absolute)."""

    def __init__(self, root: str, paths: Sequence[str]) -> None:
        import os

        self.root = root
        self.paths = list(paths)
        self._join = os.path.join

    def __len__(self) -> int:
        return len(self.paths)

    def ident(self, index: int) -> str:
        return self._join(self.root, self.paths[index])

    def load(self, index: int) -> Image.Image:
        path = self.ident(index)
        try:
            with Image.open(path) as img:
                return img.convert("RGB")
        except FileNotFoundError:
            raise DataError(f"missing image file: {path}") from None
        except Exception as exc:  # noqa: BLE001  (PIL raises many types for broken files)
            raise CorruptImageError(path, type(exc).__name__ + ": " + str(exc)) from None

    def read_bytes(self, index: int) -> bytes:
        """The encoded file (data.decode=gpu decodes it on the GPU)."""
        path = self.ident(index)
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise DataError(f"missing image file: {path}") from None


class ArrayImages:
    """Images held in memory as a uint8 (N, H, W, 3) array (CIFAR)."""

    def __init__(self, array: np.ndarray, name: str) -> None:
        self.array = array
        self.name = name

    def __len__(self) -> int:
        return len(self.array)

    def ident(self, index: int) -> str:
        return f"{self.name}[{index}]"

    def load(self, index: int) -> Image.Image:
        return Image.fromarray(np.ascontiguousarray(self.array[index])).convert("RGB")


class SubsetImages:
    """A view of another source restricted to `indices` (K-shot samples, LT selections)."""

    def __init__(self, base: ImageSource, indices: Sequence[int]) -> None:
        self.base = base
        self.indices = [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def ident(self, index: int) -> str:
        return self.base.ident(self.indices[index])

    def load(self, index: int) -> Image.Image:
        return self.base.load(self.indices[index])

    def read_bytes(self, index: int) -> bytes:
        """The base's encoded file (file-backed bases only: see `data.decode.reads_files`)."""
        return self.base.read_bytes(self.indices[index])


@dataclass
class Split:
    """One labelled split. `labels[i]` is the class index of `images[i]`."""

    images: ImageSource
    labels: np.ndarray

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.images) != len(self.labels):
            raise DataError(f"split has {len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Sequence[int]) -> Split:
        idx = np.asarray(indices, dtype=np.int64)
        return Split(SubsetImages(self.images, idx), self.labels[idx])

    def fingerprint(self) -> str:
        """Content key for caches: identifiers + labels (cheap, no image decoding)."""
        h = hashlib.sha256()
        for i in range(len(self)):
            h.update(self.images.ident(i).encode())
            h.update(b"\0")
        h.update(self.labels.tobytes())
        return h.hexdigest()[:16]


TEST_SPLITS = ("test", "test_base", "test_new")


class TestSplitAccessError(RuntimeError):
    """A method read a test split while fitting: every choice must be made on train/val data."""

    __test__ = False  # not a pytest test class despite its name


class GuardedSplits(dict):
    """The splits of a task while a method is fitted: names stay visible (`"test" in splits`), but reading a test split
    raises, so no method can select or calibrate on the data it is scored on by accident. A named paper
    protocol that selects on test asks for it explicitly through `Task.unguarded()` and records it."""

    def __init__(self, splits: dict[str, Split], forbidden: tuple[str, ...]) -> None:
        super().__init__(splits)
        self.forbidden = forbidden

    def __getitem__(self, name: str) -> Split:
        if name in self.forbidden:
            raise TestSplitAccessError(
                f"the {name!r} split was read during fit; methods choose on train/val only (a paper protocol that "
                "selects on test must ask for it with task.unguarded() and record it in results.json)"
            )
        return super().__getitem__(name)

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        return self[name] if name in self else default  # noqa: SIM401  (self.get would recurse)

    def values(self) -> list[Split]:  # type: ignore[override]
        return [self[k] for k in self]

    def items(self) -> list[tuple[str, Split]]:  # type: ignore[override]
        return [(k, self[k]) for k in self]


@dataclass(eq=False)
class TaskInfo:
    """What a method may know about its task when it is built: names, templates, counts and the class
    partition — never the images, so nothing about the test split can leak into a method's construction."""

    name: str
    classnames: list[str]
    templates: list[str]
    class_counts: np.ndarray  # training images per class (0 for classes absent from train, e.g. new classes)
    split_names: tuple[str, ...]
    shots: int | None = None  # K of a K-shot task
    base_classes: list[int] | None = None  # base-to-new: classes seen in training
    new_classes: list[int] | None = None  # base-to-new: classes only scored at test

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    @property
    def num_train(self) -> int:
        return int(self.class_counts.sum())


@dataclass
class Task:
    """A dataset ready for any method: class names, prompt templates and the splits that exist."""

    name: str
    classnames: list[str]
    templates: list[str]
    splits: dict[str, Split]
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. imbalance ratio, shots, seed, drawn indices
    group_counts: np.ndarray | None = None  # counts defining many/medium/few (default: train counts)

    def __post_init__(self) -> None:
        for split_name, split in self.splits.items():
            if len(split) and (split.labels.min() < 0 or split.labels.max() >= self.num_classes):
                raise DataError(
                    f"{self.name}/{split_name}: labels span [{split.labels.min()}, {split.labels.max()}] "
                    f"but the dataset has {self.num_classes} class names"
                )

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    @property
    def class_counts(self) -> np.ndarray:
        """Training images per class (what LA / balanced softmax / grouping use)."""
        if "train" not in self.splits:
            raise DataError(f"{self.name} has no train split, so it has no class counts")
        return np.bincount(self.splits["train"].labels, minlength=self.num_classes)

    def split(self, name: str) -> Split:
        if name not in self.splits:
            raise DataError(f"{self.name} has no {name!r} split; it has: {', '.join(self.splits)}")
        return self.splits[name]

    def info(self) -> TaskInfo:
        """The typed summary methods are built from."""
        counts = self.class_counts if "train" in self.splits else np.zeros(self.num_classes, dtype=np.int64)
        base, new = self.meta.get("base_classes"), self.meta.get("new_classes")
        return TaskInfo(
            name=self.name, classnames=list(self.classnames), templates=list(self.templates),
            class_counts=np.asarray(counts, dtype=np.int64), split_names=tuple(self.splits),
            shots=self.meta.get("shots"), base_classes=None if base is None else [int(c) for c in base],
            new_classes=None if new is None else [int(c) for c in new],
        )

    def guarded(self, forbidden: tuple[str, ...] = TEST_SPLITS) -> Task:
        """A view of this task whose test splits cannot be read (what fitting receives: `engine.fit`)."""
        view = dataclasses.replace(self)
        view.splits = GuardedSplits(dict(self.splits), forbidden)
        return view

    def unguarded(self) -> Task:
        """The task with its test splits readable again: for named paper protocols that select on test only;
        the caller records that choice in results.json."""
        if not isinstance(self.splits, GuardedSplits):
            return self
        return dataclasses.replace(self, splits=dict(dict.items(self.splits)))


class LabeledImages(torch.utils.data.Dataset):
    """Torch dataset over a Split: returns (image_tensor, label, index).

    on_bad_image="error" stops with an error naming the file; "skip" returns None for that item (the
    collate function drops it) and records the path in `bad`, so the run reports what it left out.
    """

    def __init__(self, split: Split, transform: Callable[[Image.Image], Any], on_bad_image: str = "error") -> None:
        self.split = split
        self.transform = transform
        self.on_bad_image = on_bad_image
        self.bad: list[str] = []

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[Any, int, int] | None:
        return self.item(index, self.transform)

    def item(self, index: int, transform: Callable[[Image.Image], Any]) -> tuple[Any, int, int] | None:
        """Item `index` under `transform` (the trainer passes each epoch's own)."""
        try:
            img = self.split.images.load(index)
        except DataError as exc:
            if self.on_bad_image == "skip":
                ident = self.split.images.ident(index)
                log.warning("skipping unreadable image %s: %s", ident, exc)
                self.bad.append(ident)
                return None
            raise
        return transform(img), int(self.split.labels[index]), index


def collate_skip_none(batch: list[Any]) -> Any:
    """Default collate that leaves out items the dataset skipped (bad images under on_bad_image=skip)."""
    kept = [b for b in batch if b is not None]
    if not kept:
        return None
    return torch.utils.data.default_collate(kept)
