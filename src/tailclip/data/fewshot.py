"""Seeded K-shot sampling (CoOp → Tip-Adapter → GLA/LDC protocol) with our own generator.

Every class draws from its own PCG64 stream seeded by (stream, seed, class), and the order comes from
`Generator.random()` doubles (a fixed transformation of the raw PCG64 output), so draws are identical across
runs, platforms and numpy versions, and a class's draw does not depend on which other classes exist.
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
STREAM_LT = 2  # long-tailed selections (CIFAR-100-LT)
STREAM_HOLDOUT = 3  # hold-out splits of user datasets
FEWSHOT_VAL_MAX = 4  # few-shot validation = min(K, 4) images per class


def class_rng(seed: int, cls: int, stream: int = STREAM_TRAIN) -> np.random.Generator:
    """The generator of one class: PCG64 seeded through SeedSequence((stream, seed, class))."""
    entropy = [int(stream), int(seed) & 0xFFFF_FFFF_FFFF_FFFF, int(cls)]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))


def seeded_order(indices: np.ndarray, seed: int, cls: int, stream: int = STREAM_TRAIN) -> np.ndarray:
    """`indices` in a random order fixed by (seed, cls, stream): argsort of uniform doubles."""
    indices = np.asarray(indices, dtype=np.int64)
    keys = class_rng(seed, cls, stream).random(len(indices))
    return indices[np.argsort(keys, kind="stable")]


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
    if short:
        msg = f"{len(short)} class(es) have fewer than {k} images (class: count) {short[:10]}"
        if strict:
            raise DataError(msg)
        log.warning("%s; keeping all their images", msg)
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def _check_indices(name: str, split_name: str, indices: Sequence[int], size: int) -> np.ndarray:
    idx = np.asarray(indices, dtype=np.int64)
    if len(idx) and (idx.min() < 0 or idx.max() >= size):
        raise DataError(f"stored shot indices for {name}/{split_name} run outside [0, {size}): the split changed")
    return idx


def apply_shots(task: Task, cfg: DataConfig, indices: Mapping[str, Sequence[int]] | None = None) -> Task:
    """K-shot train (cfg.shots per class, seeded by cfg.seed) and min(K, 4)-shot val; returns a new Task.

    The drawn indices (positions in the full splits) go to `task.meta["shot_indices"]`; passing them back as
    `indices` re-applies exactly that draw (e.g. from a stored run). Without cfg.shots and indices: unchanged.
    Test-only tasks (no train split) are returned unchanged: there is nothing to sample.
    """
    if cfg.shots is None and indices is None:
        return task
    if "train" not in task.splits:
        log.info("%s has no train split; data.shots does not apply", task.name)
        return task
    k = cfg.shots
    splits = dict(task.splits)
    drawn: dict[str, list[int]] = {}
    if indices is not None:
        for split_name, idx in indices.items():
            if split_name not in splits:
                raise DataError(f"stored shot indices name split {split_name!r}, which {task.name} lacks")
            drawn[split_name] = _check_indices(task.name, split_name, idx, len(splits[split_name])).tolist()
    else:
        assert k is not None
        drawn["train"] = sample_k_shot(splits["train"].labels, k, cfg.seed, stream=STREAM_TRAIN).tolist()
        if "val" in splits:
            k_val = min(k, FEWSHOT_VAL_MAX)
            drawn["val"] = sample_k_shot(splits["val"].labels, k_val, cfg.seed, stream=STREAM_VAL).tolist()
    for split_name, idx in drawn.items():
        splits[split_name] = splits[split_name].subset(idx)
    meta = dict(task.meta, shots=k, shot_seed=cfg.seed, shot_indices=drawn)
    log.info("%s: %s-shot sample (seed %d): %s", task.name, k, cfg.seed, {s: len(v) for s, v in drawn.items()})
    return dataclasses.replace(task, splits=splits, meta=meta)
