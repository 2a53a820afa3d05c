"""Seeded K-shot sampling (CoOp → Tip-Adapter → GLA/LDC protocol) with our own generator.

Every class draws from its own PCG64 stream seeded by (stream, seed, class), and the order comes from
`Generator.random()` doubles (a fixed transformation of the raw PCG64 output), so draws are identical across
runs, platforms and numpy versions, and a class's draw does not depend on which other classes exist.

Few-shot validation never comes from the test split:
* a dataset with its own val split (the CoOp datasets): min(K, 4) images per class from it (CoOp's protocol);
* a dataset without one (ImageNet, CIFAR-100, iNaturalist 2018): K more images per class from the train images
  the K-shot draw left, 20 per class when K >= 32 (GLA's released ImageNet code, BeierZhu/GLA
  GLA.FS.public/datasets/imagenet.py: for K < 32 `generate_fewshot_train_val` samples 2K train images of a
  class, the first K train and the rest val; for K >= 32 val is ImageNet-LT's fixed 20-per-class list of train
  images and the K shots come from the rest; we draw those 20 with the seed instead of shipping the list).
  Here the first K images of each class's seeded train order are the K-shot train images (the same draw as
  without a val) and the next ones the val images, so the two are disjoint by construction.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from ..errors import DataError

if TYPE_CHECKING:
    from ..config import DataConfig
    from .base import Task

log = logging.getLogger(__name__)

# Independent random streams for the different draws a seed drives.
STREAM_TRAIN = 0  # K-shot train images
STREAM_VAL = 1  # few-shot validation images
FULL_VAL = "val_full"  # a K-shot task of a dataset with a val split keeps that whole split under this name
STREAM_LT = 2  # long-tailed selections (CIFAR-100-LT)
STREAM_HOLDOUT = 3  # hold-out splits of user datasets
FEWSHOT_VAL_MAX = 4  # few-shot validation from a val split = min(K, 4) images per class (CoOp)
TRAIN_VAL_LARGE_K = 32  # from train: K val images per class below this K, ...
TRAIN_VAL_LARGE_K_SHOTS = 20  # ... and 20 from this K on (GLA's released ImageNet code)


def class_rng(seed: int, cls: int, stream: int = STREAM_TRAIN) -> np.random.Generator:
    """The generator of one class: PCG64 seeded through SeedSequence((stream, seed, class))."""
    entropy = [int(stream), int(seed) & 0xFFFF_FFFF_FFFF_FFFF, int(cls)]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))


def seeded_order(indices: np.ndarray, seed: int, cls: int, stream: int = STREAM_TRAIN) -> np.ndarray:
    """`indices` in a random order fixed by (seed, cls, stream): argsort of uniform doubles."""
    indices = np.asarray(indices, dtype=np.int64)
    keys = class_rng(seed, cls, stream).random(len(indices))
    return indices[np.argsort(keys, kind="stable")]


def fewshot_val_shots(k: int, source: str) -> int:
    """Few-shot validation images per class for K training shots, drawn from split `source` (val or train)."""
    if source == "val":
        return min(k, FEWSHOT_VAL_MAX)
    return k if k < TRAIN_VAL_LARGE_K else TRAIN_VAL_LARGE_K_SHOTS


def _warn_short(short: list[tuple[int, int]], wanted: int | str, what: str, strict: bool) -> None:
    if not short:
        return
    msg = f"{len(short)} class(es) have fewer than {wanted} {what} (class: count) {short[:10]}"
    if strict:
        raise DataError(msg)
    log.warning("%s; keeping all their images", msg)


def sample_k_shot(
    labels: Sequence[int] | np.ndarray, k: int, seed: int, *, stream: int = STREAM_TRAIN, strict: bool = False
) -> np.ndarray:
    """Sorted indices of K items per class (classes in `labels`), drawn without replacement.

    A class with fewer than K items keeps all of them (CoOp's behaviour), with a warning; `strict=True`
    makes that a DataError instead.
    """
    if k < 1:
        raise DataError(f"k-shot sampling needs k >= 1, got {k}")
    labels = np.asarray(labels, dtype=np.int64)
    picked: list[np.ndarray] = []
    short: list[tuple[int, int]] = []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        if len(idx) < k:
            short.append((int(cls), len(idx)))
        picked.append(seeded_order(idx, seed, int(cls), stream)[:k])
    _warn_short(short, k, "images", strict)
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def sample_train_val(
    labels: Sequence[int] | np.ndarray, n_train: int | Mapping[int, int], n_val: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) sorted indices, disjoint: per class the first n_train of its seeded train order, then the
    next n_val (see the module doc). `n_train` may differ per class (a mapping class -> count, for long-tailed
    draws); the train part equals `sample_k_shot(labels, K, seed)` for a constant K. A class with too few
    images fills train first, then val with what is left (as GLA's released code does), with a warning."""
    labels = np.asarray(labels, dtype=np.int64)
    train: list[np.ndarray] = []
    val: list[np.ndarray] = []
    short: list[tuple[int, int]] = []
    for cls in np.unique(labels):
        n = n_train if isinstance(n_train, int) else int(n_train.get(int(cls), 0))
        order = seeded_order(np.flatnonzero(labels == cls), seed, int(cls), STREAM_TRAIN)
        if len(order) < n + n_val:
            short.append((int(cls), len(order)))
        train.append(order[:n])
        val.append(order[n : n + n_val])
    _warn_short(short, f"their train + {n_val} val", "images", strict=False)
    empty = np.zeros(0, dtype=np.int64)
    return (np.sort(np.concatenate(train)) if train else empty), (np.sort(np.concatenate(val)) if val else empty)


def _check_indices(name: str, split_name: str, indices: Sequence[int], size: int) -> np.ndarray:
    idx = np.asarray(indices, dtype=np.int64)
    if len(idx) and (idx.min() < 0 or idx.max() >= size):
        raise DataError(f"stored shot indices for {name}/{split_name} run outside [0, {size}): the split changed")
    return idx


def val_source(task: Task) -> str:
    """The split few-shot validation images come from: the task's own val split, else its train split."""
    return "val" if "val" in task.splits else "train"


def apply_shots(task: Task, cfg: DataConfig, indices: Mapping[str, Sequence[int]] | None = None) -> Task:
    """K-shot train (cfg.shots per class, seeded by cfg.seed) and a few-shot val (module doc); returns a new Task.

    The drawn indices go to `task.meta["shot_indices"]` as positions in the split each was drawn from
    (`meta["val_source"]` names the one val came from); passing them back as `indices` re-applies exactly that
    draw (e.g. from a stored run). Without cfg.shots and indices: unchanged. Test-only tasks (no train split)
    are returned unchanged: there is nothing to sample. The test split is never touched. A dataset's own val
    split is kept whole as `val_full` (FULL_VAL) next to the few-shot `val`: only a named protocol reads it.
    """
    if cfg.shots is None and indices is None:
        return task
    if "train" not in task.splits:
        log.info("%s has no train split; data.shots does not apply", task.name)
        return task
    k = cfg.shots
    source = val_source(task)
    splits = dict(task.splits)
    drawn: dict[str, list[int]] = {}
    if indices is not None:
        for split_name, idx in indices.items():
            if split_name not in ("train", "val"):
                raise DataError(f"stored shot indices name split {split_name!r}; only train and val are drawn")
            origin = source if split_name == "val" else "train"
            drawn[split_name] = _check_indices(task.name, origin, idx, len(splits[origin])).tolist()
        if source == "train" and set(drawn.get("train", ())) & set(drawn.get("val", ())):
            raise DataError(f"stored shot indices of {task.name}: val and train share images")
    else:
        assert k is not None
        k_val = fewshot_val_shots(k, source)
        if source == "val":
            drawn["train"] = sample_k_shot(splits["train"].labels, k, cfg.seed, stream=STREAM_TRAIN).tolist()
            drawn["val"] = sample_k_shot(splits["val"].labels, k_val, cfg.seed, stream=STREAM_VAL).tolist()
        else:
            train_idx, val_idx = sample_train_val(splits["train"].labels, k, k_val, cfg.seed)
            drawn["train"], drawn["val"] = train_idx.tolist(), val_idx.tolist()
    full_train = task.splits["train"]
    if source == "val":  # the whole val split stays readable: LDC's released beta search runs on it
        splits[FULL_VAL] = task.splits["val"]
    for split_name, idx in drawn.items():
        origin = source if split_name == "val" else "train"
        splits[split_name] = (full_train if origin == "train" else task.splits[origin]).subset(idx)
    meta = dict(task.meta, shots=k, shot_seed=cfg.seed, shot_indices=drawn, val_source=source)
    log.info("%s: %s-shot sample (seed %d): %s (val from %s)", task.name, k, cfg.seed,
             {s: len(v) for s, v in drawn.items()}, source)
    return dataclasses.replace(task, splits=splits, meta=meta)
