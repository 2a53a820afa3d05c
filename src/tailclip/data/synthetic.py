"""Downstream tasks of the built-in SYNTHETIC world, registered as datasets (no files, no downloads).

All images use the "downstream" rendering style (textured backgrounds: a domain gap from pretraining) and are
fixed by WORLD_SEED; `DataConfig.seed` only picks *which* images/classes (long-tail class order, K-shot draws),
as it does for the real benchmarks.

Image pools (image j of a stream has label j mod 100, so every prefix is class-balanced):
  train pool  500 per class (stream "train"); the LT / K-shot train splits are subsets of it.
  val         20 per class (stream "val"); K-shot tasks use min(K, 4) per class, as CoOp's protocol does.
  test        100 per class (stream "test"), balanced; the first 500 images are 5 per class.

Tasks:
  synth-lt       CIFAR-100-LT profile n_r = int(500 * (1/beta)^(r/99)) (beta = imbalance_ratio, default 100;
                 total 10,847 at beta 100), the first n images of each class, over a class order drawn from
                 `seed`. That order is independent of the pretraining frequency order, as in the real world
                 the downstream skew differs from the pretraining prior. Many/medium/few always use the
                 beta = 100 counts (as CIFAR-100-LT at beta 50/10 does in the literature).
  synth-fewshot  K-shot (shots, default 16) from the balanced train pool with the team's seeded sampler.
  synth-b2n      balanced base-to-new: base = classes 0..49, new = 50..99 (the diagonal class layout makes new
                 classes unseen colour x shape combinations of seen attributes); train = 16 shots of base
                 classes, val = min(K, 4) per base class.
  synth-b2n-lt   imbalanced base-to-new (Candle): base class i gets n_i = max(int(100 * r^(i/49)), 1),
                 r = 1/imbalance_ratio (default imbalance_ratio 10, r = 0.1), classes ranked by label (the pool
                 is uniform); images drawn with the seeded sampler (nested in its 100-shot draw).
  synth-xd       cross-dataset (Candle): classes 0-49 are the long-tailed source (imbalance_ratio, default 100),
                 classes 50-99 the target's new classes, scored on their test images (test_new); no "test".
  Base-to-new tasks keep all 100 class names; splits: train, val (base classes), test (all classes),
  test_base, test_new; meta "base_classes"/"new_classes" and "label_spaces" tell an evaluator to score base
  images among base names only and new images among new names only (CoOp's base-to-new protocol).
"""

from __future__ import annotations

import logging

import numpy as np

from ..config import DataConfig
from ..errors import ConfigError
from ..synthetic.captions import TASK_TEMPLATES
from ..synthetic.generator import (
    CLASSNAMES,
    NUM_CLASSES,
    STREAMS,
    TEST_PER_CLASS,
    WORLD_SEED,
    SyntheticImages,
)
from .base import Split, Task
from .fewshot import apply_shots, sample_k_shot
from .registry import register_dataset
from .templates import get_templates

log = logging.getLogger(__name__)

POOL_PER_CLASS = 500
VAL_PER_CLASS = 20
NUM_BASE = NUM_CLASSES // 2
DEFAULT_BETA = 100.0
B2N_NMAX = 100
B2N_DEFAULT_RATIO = 10.0
DEFAULT_SHOTS = 16
SYNTHETIC_NOTE = "SYNTHETIC procedural shapes (tailclip built-in world); not a real benchmark"


def _stream_split(stream: str, per_class: int, classes: np.ndarray | None = None) -> Split:
    """The first `per_class` images of each class of a stream (optionally only `classes`)."""
    labels = np.arange(NUM_CLASSES * per_class, dtype=np.int64) % NUM_CLASSES
    split = Split(SyntheticImages(labels, "downstream", STREAMS[stream], WORLD_SEED, name=stream), labels)
    if classes is not None:
        split = _subset(split, np.nonzero(np.isin(labels, classes))[0])
    return split


def _subset(split: Split, indices: np.ndarray) -> Split:
    """A subset of a stream that stays one SyntheticImages source: only its own images are rendered (and cached),
    never the whole pool they are drawn from."""
    idx = np.asarray(indices, np.int64)
    return Split(split.images.subset(idx), split.labels[idx])


def train_pool() -> Split:
    return _stream_split("train", POOL_PER_CLASS)


def lt_class_order(seed: int) -> np.ndarray:
    """order[r] = class with the r-th largest downstream count (independent of the pretraining order)."""
    return np.random.default_rng([int(seed), 31337]).permutation(NUM_CLASSES)


def lt_counts(beta: float, order: np.ndarray, n_max: int = POOL_PER_CLASS) -> np.ndarray:
    """Per-class counts (indexed by class) of the CIFAR-100-LT profile."""
    c = len(order)
    counts = np.zeros(c, np.int64)
    for r, cls in enumerate(order):
        counts[cls] = int(n_max * (1.0 / beta) ** (r / (c - 1)))
    return counts


def _first_n_per_class(labels: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Indices (ascending) of the first counts[c] items of each class c."""
    seen = np.zeros(len(counts), np.int64)
    keep = []
    for i, lab in enumerate(labels):
        if seen[lab] < counts[lab]:
            keep.append(i)
            seen[lab] += 1
    short = np.nonzero(seen < counts)[0]
    if len(short):
        raise ConfigError(f"synthetic pool has too few images for classes {short[:5].tolist()}")
    return np.asarray(keep, np.int64)


def _templates(cfg: DataConfig) -> list[str]:
    if cfg.templates:
        return get_templates(cfg.templates)
    return list(TASK_TEMPLATES)


def _k_shot(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """K indices per class with the team's seeded sampler (sorted, so split order is canonical)."""
    return np.sort(np.asarray(sample_k_shot(labels, k, seed), np.int64))


def _maybe_shots(task: Task, cfg: DataConfig) -> Task:
    """Apply `cfg.shots` to a task that is not K-shot by construction (e.g. synth-lt with shots=4)."""
    if cfg.shots is None:
        return task
    return apply_shots(task, cfg)


@register_dataset("synth-lt")
def build_synth_lt(cfg: DataConfig) -> Task:
    """SYNTHETIC long-tailed shapes (CIFAR-100-LT profile, beta = imbalance_ratio, default 100; built in)."""
    beta = float(cfg.imbalance_ratio or DEFAULT_BETA)
    order = lt_class_order(cfg.seed)
    counts = lt_counts(beta, order)
    pool = train_pool()
    train = _subset(pool, _first_n_per_class(pool.labels, counts))
    task = Task(
        name="synth-lt",
        classnames=list(CLASSNAMES),
        templates=_templates(cfg),
        splits={"train": train, "val": _stream_split("val", VAL_PER_CLASS),
                "test": _stream_split("test", TEST_PER_CLASS)},
        meta={"synthetic": True, "note": SYNTHETIC_NOTE, "imbalance_ratio": beta, "seed": cfg.seed,
              "class_order": order.tolist(), "counts": counts.tolist()},
        group_counts=lt_counts(DEFAULT_BETA, order),
    )
    return _maybe_shots(task, cfg)


@register_dataset("synth-fewshot")
def build_synth_fewshot(cfg: DataConfig) -> Task:
    """SYNTHETIC shapes, K-shot (shots, default 16) from a balanced pool of 500 per class (built in)."""
    k = int(cfg.shots or DEFAULT_SHOTS)
    pool = train_pool()
    idx = _k_shot(pool.labels, k, cfg.seed)
    return Task(
        name="synth-fewshot",
        classnames=list(CLASSNAMES),
        templates=_templates(cfg),
        splits={"train": _subset(pool, idx), "val": _stream_split("val", min(k, 4)),
                "test": _stream_split("test", TEST_PER_CLASS)},
        meta={"synthetic": True, "note": SYNTHETIC_NOTE, "shots": k, "seed": cfg.seed, "indices": idx.tolist()},
    )


def _b2n_task(name: str, cfg: DataConfig, train: Split, k_val: int, meta: dict) -> Task:
    base = np.arange(NUM_BASE)
    new = np.arange(NUM_BASE, NUM_CLASSES)
    test = _stream_split("test", TEST_PER_CLASS)
    return Task(
        name=name,
        classnames=list(CLASSNAMES),
        templates=_templates(cfg),
        splits={
            "train": train,
            "val": _stream_split("val", k_val, base),
            "test": test,
            "test_base": test.subset(np.nonzero(test.labels < NUM_BASE)[0]),
            "test_new": test.subset(np.nonzero(test.labels >= NUM_BASE)[0]),
        },
        meta={"synthetic": True, "note": SYNTHETIC_NOTE, "seed": cfg.seed, "base_classes": base.tolist(),
              "new_classes": new.tolist(),
              "label_spaces": {"train": base.tolist(), "val": base.tolist(), "test_base": base.tolist(),
                               "test_new": new.tolist()},
              **meta},
    )


@register_dataset("synth-b2n")
def build_synth_b2n(cfg: DataConfig) -> Task:
    """SYNTHETIC shapes, balanced base-to-new: 16 shots of base classes 0-49, new classes 50-99 (built in)."""
    k = int(cfg.shots or DEFAULT_SHOTS)
    pool = train_pool()
    base_idx = np.nonzero(pool.labels < NUM_BASE)[0]
    picked = base_idx[_k_shot(pool.labels[base_idx], k, cfg.seed)]
    return _b2n_task("synth-b2n", cfg, _subset(pool, picked), min(k, 4), {"shots": k, "indices": picked.tolist()})


def b2n_lt_counts(ratio: float, n_max: int = B2N_NMAX, num_base: int = NUM_BASE) -> np.ndarray:
    """Candle's long-tailed base counts n_i = max(int(n_max * r^(i/(C_b - 1))), 1), r = 1/ratio."""
    r = 1.0 / ratio
    return np.asarray([max(int(n_max * r ** (i / (num_base - 1))), 1) for i in range(num_base)], np.int64)


@register_dataset("synth-b2n-lt")
def build_synth_b2n_lt(cfg: DataConfig) -> Task:
    """SYNTHETIC shapes, imbalanced base-to-new (Candle: 100 down to 100/imbalance_ratio, default 10; built in)."""
    ratio = float(cfg.imbalance_ratio or B2N_DEFAULT_RATIO)
    counts = b2n_lt_counts(ratio)
    if cfg.shots is not None:
        counts = np.minimum(counts, int(cfg.shots))  # shots acts as a per-class cap
    pool = train_pool()
    base_idx = np.nonzero(pool.labels < NUM_BASE)[0]
    drawn = base_idx[_k_shot(pool.labels[base_idx], B2N_NMAX, cfg.seed)]  # nested: first n_i of a 100-shot draw
    picked = np.sort(drawn[_first_n_per_class(pool.labels[drawn], counts)])
    return _b2n_task("synth-b2n-lt", cfg, _subset(pool, picked), 4,
                     {"imbalance_ratio": ratio, "n_max": B2N_NMAX, "counts": counts.tolist(),
                      "indices": picked.tolist()})


@register_dataset("synth-xd")
def build_synth_xd(cfg: DataConfig) -> Task:
    """SYNTHETIC shapes, cross-dataset (Candle): classes 0-49 long-tailed as the source (IR = imbalance_ratio,
    default 100 as ImageNet's), classes 50-99 as the target's new classes (built in)."""
    from .base2new import make_cross_dataset

    pool = train_pool()
    src_idx = np.nonzero(pool.labels < NUM_BASE)[0]
    test = _stream_split("test", TEST_PER_CLASS)
    tgt_test = test.subset(np.nonzero(test.labels >= NUM_BASE)[0])
    source = Task("synth-xd-source", list(CLASSNAMES[:NUM_BASE]), _templates(cfg),
                  {"train": _subset(pool, src_idx), "val": _stream_split("val", 4, np.arange(NUM_BASE)),
                   "test": test.subset(np.nonzero(test.labels < NUM_BASE)[0])},
                  meta={"synthetic": True, "note": SYNTHETIC_NOTE, "seed": cfg.seed})
    target = Task("synth-xd-target", list(CLASSNAMES[NUM_BASE:]), _templates(cfg),
                  {"test": Split(tgt_test.images, tgt_test.labels - NUM_BASE)})
    return make_cross_dataset(source, target, cfg, "synth-xd", "synth-xd")
