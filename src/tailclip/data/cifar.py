"""CIFAR-100 and CIFAR-100-LT from torchvision's python pickles (no torchvision download at run time).

Layout: `<root>/cifar-100-python/{train,test,meta}` (root may also be the `cifar-100-python` folder itself),
exactly what `torchvision.datasets.CIFAR100(root, download=True)` leaves, or the archive
https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz extracted under root.
"""

from __future__ import annotations

import logging
import pickle
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..config import DataConfig
from ..errors import DataError
from .base import ArrayImages, Split, Task
from .common import display_name, finish_task, require_root
from .fewshot import STREAM_LT, seeded_order
from .registry import register_dataset

log = logging.getLogger(__name__)

HINT = (
    "Expected <root>/cifar-100-python/{train,test,meta}: run "
    "`python -c \"import torchvision; torchvision.datasets.CIFAR100('ROOT', download=True)\"` or extract "
    "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz under ROOT."
)
NUM_CLASSES = 100
DEFAULT_BETA = 100.0
VAL_PER_CLASS = 10  # CIFAR-100-LT validation hold-out drawn from the training images the LT profile leaves out


def lt_profile(n_max: int, num_classes: int, beta: float) -> np.ndarray:
    """Images per class of the standard exponential profile: n_i = int(n_max · (1/β)^(i/(C−1)))."""
    i = np.arange(num_classes)
    return np.array([int(n_max * (1.0 / beta) ** (k / (num_classes - 1))) for k in i], dtype=np.int64)


def literature_orders(labels: np.ndarray, num_classes: int) -> list[np.ndarray]:
    """Per-class image orders of the literature's CIFAR-100-LT (LDAM's `IMBALANCECIFAR100`, used as is by LIFT):
    numpy seeded with 0, then per class in class order `np.where(labels == c)` shuffled by that one generator.
    A RandomState(0) draws exactly what `np.random.seed(0)` + `np.random.shuffle` draw, without touching the
    global generator."""
    rng = np.random.RandomState(0)
    orders = []
    for c in range(num_classes):
        idx = np.where(labels == c)[0]
        rng.shuffle(idx)
        orders.append(idx)
    return orders


def select_lt(
    labels: np.ndarray, beta: float, seed: int | None, val_per_class: int = VAL_PER_CLASS
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(train indices, val indices, classes whose val overlaps train) of a long-tailed selection.

    Class i keeps n_i = int(n_max · (1/β)^(i/(C−1))) images (n_max = images per class, 500 for CIFAR-100), the
    first n_i of a per-class order: the literature's (`literature_orders`) when `seed` is None, else tailclip's
    per-class order seeded by `seed`. Val takes the next `val_per_class` images of that order (images the
    profile left out); a class with fewer left over (the head class, which keeps all 500) completes its val
    with its own training images, and is listed in the third return value.
    """
    labels = np.asarray(labels, dtype=np.int64)
    num_classes = int(labels.max()) + 1
    counts = np.bincount(labels, minlength=num_classes)
    profile = lt_profile(int(counts.max()), num_classes, beta)
    if seed is None:
        orders = literature_orders(labels, num_classes)
    else:
        orders = [seeded_order(np.flatnonzero(labels == c), seed, c, STREAM_LT) for c in range(num_classes)]
    train, val, overlap = [], [], []
    for c, order in enumerate(orders):
        n = int(profile[c])
        if len(order) < n:
            raise DataError(f"class {c} has {len(order)} training images, the LT profile asks for {n}")
        train.append(order[:n])
        rest = order[n : n + val_per_class]
        if len(rest) < val_per_class:
            overlap.append(c)
            rest = np.concatenate([rest, order[: val_per_class - len(rest)]])
        val.append(rest)
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val)), overlap


def _dataset_dir(root: Path) -> Path:
    for d in (root / "cifar-100-python", root):
        if (d / "train").is_file() and (d / "test").is_file() and (d / "meta").is_file():
            return d
    missing = [str(root / "cifar-100-python" / f) for f in ("train", "test", "meta")]
    raise DataError(f"CIFAR-100 files not found: {', '.join(missing)}. {HINT}")


# The only globals a CIFAR-100 python pickle needs: numpy arrays (old and new module paths, protocol <= 5) and the
# codec Python 3 uses for byte strings. Anything else (os.system, builtins.eval ...) is refused, not executed.
CIFAR_PICKLE_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
})


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles user files without running arbitrary code: only the CIFAR format's globals are admitted."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in CIFAR_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not part of the CIFAR-100 format; refused")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return _CifarUnpickler(f, encoding="latin1").load()
    except Exception as exc:  # noqa: BLE001  (a truncated, foreign or malicious file: name it)
        raise DataError(f"cannot read CIFAR-100 pickle {path}: {type(exc).__name__}: {exc}") from None


def load_cifar100(root: str) -> tuple[list[str], Split, Split]:
    """(class names, full train split, test split); images stay as one uint8 array, converted per item."""
    d = _dataset_dir(Path(root))
    return _load_cached(str(d), (d / "train").stat().st_mtime_ns, (d / "test").stat().st_mtime_ns)


@lru_cache(maxsize=2)  # building several tasks in one process (β sweep, seeds) reads the pickles once
def _load_cached(dataset_dir: str, *_mtimes: int) -> tuple[list[str], Split, Split]:
    d = Path(dataset_dir)
    names = _unpickle(d / "meta").get("fine_label_names")
    if not names or len(names) != NUM_CLASSES:
        raise DataError(f"{d / 'meta'}: expected {NUM_CLASSES} fine_label_names, got {len(names or [])}")
    splits = []
    for part in ("train", "test"):
        raw = _unpickle(d / part)
        data, labels = np.asarray(raw["data"], dtype=np.uint8), np.asarray(raw["fine_labels"], dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
            raise DataError(f"{d / part}: data {data.shape} does not match {len(labels)} labels of 32x32x3 images")
        images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # a view: HWC per image, no copy
        splits.append(Split(ArrayImages(images, f"cifar100/{part}"), labels))
    return [display_name(n) for n in names], splits[0], splits[1]


@register_dataset("cifar100")
def build_cifar100(cfg: DataConfig) -> Task:
    """CIFAR-100, balanced: 50,000 train / 10,000 test images, 100 classes (no val split)."""
    names, train, test = load_cifar100(str(require_root(cfg, HINT)))
    return finish_task(cfg, names, {"train": train, "test": test}, "imagenet80", meta={"imbalance_ratio": 1.0})


def _build_lt(cfg: DataConfig, seed: int | None) -> Task:
    beta = float(cfg.imbalance_ratio or DEFAULT_BETA)
    names, full, test = load_cifar100(str(require_root(cfg, HINT)))
    train_idx, val_idx, overlap = select_lt(full.labels, beta, seed)
    n_max = int(np.bincount(full.labels).max())
    meta = {
        "imbalance_ratio": beta,
        "lt_order": "literature (LDAM/LIFT: numpy seed 0)" if seed is None else "seeded",
        "lt_seed": 0 if seed is None else seed,
        "val_overlap_classes": overlap,
        "group_rule": "many/medium/few from the beta=100 profile",
    }
    splits = {"train": full.subset(train_idx), "val": full.subset(val_idx), "test": test}
    return finish_task(cfg, names, splits, "imagenet80", meta, group_counts=lt_profile(n_max, NUM_CLASSES, 100.0))


@register_dataset("cifar100-lt")
def build_cifar100_lt(cfg: DataConfig) -> Task:
    """CIFAR-100-LT with the literature's images (LDAM/LIFT), any β (data.imbalance_ratio, default 100).

    Train: class i keeps the first int(500 · (1/β)^(i/99)) images of its numpy-seed-0 shuffle (LDAM's
    `gen_imbalanced_data`; data.seed does not change them): 10,847 / 12,608 / 19,573 images at β = 100/50/10.
    Test: the balanced 10,000 CIFAR-100 test images. Val (none in the literature): the next 10 images per class
    of the same order, from the images the profile leaves out; the head class keeps all 500 of its images, so
    its 10 val images are taken from its training images (recorded in meta["val_overlap_classes"]).
    Many/medium/few use the β = 100 counts for every β (35/35/30 classes), as the literature does.
    """
    return _build_lt(cfg, None)


@register_dataset("cifar100-lt-seeded")
def build_cifar100_lt_seeded(cfg: DataConfig) -> Task:
    """CIFAR-100-LT whose kept images follow tailclip's per-class order seeded by data.seed (other draws).

    Same profile, test, val and groups as `cifar100-lt`; only which images of each class are kept differs."""
    return _build_lt(cfg, cfg.seed)
