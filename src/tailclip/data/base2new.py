"""Base-to-new generalisation (CoCoOp's protocol; Candle's imbalanced variant) on top of any dataset.

Base = the first ⌈C/2⌉ labels, new = the rest. The task keeps all C class names; train and val hold base
classes only; test holds everything, with `test_base` / `test_new` subsets, and meta "label_spaces" tells an
evaluator to score base images among base names only and new images among new names only (the same
conventions as the synthetic `synth-b2n` tasks).

* balanced (`<dataset>-b2n`): K = data.shots (default 16) images per base class, val = min(K, 4) per base class
  from the val split (datasets without one, e.g. ImageNet: K more train images per base class, fewshot.py).
* imbalanced (`<dataset>-b2n-lt`, Candle): the released rule (`b2n_lt_counts`): each base class is first capped at
  data.shots images (default 100, the released SHOTS), then classes ranked by their capped count (ties in the order
  their labels first appear in the train list: on ImageNet, where every class reaches the cap, list order) get
  n_i = int(max(n_max · r^(i/(C_b−1)), 1)) with n_max the largest capped count and r = 1/data.imbalance_ratio
  (default 10; ImageNet 100), never more than the class holds; val = 4 per base class (from the val split, else
  from the train images left over). Images are the first n_i of each class's seeded order (tailclip's generator,
  not the released `random.sample` + `np.random.shuffle`: same counts, other images), so the draws of different
  ratios are nested. data.seed picks the images (seeds 1/2/3 in the paper).
* cross-dataset (`imagenet-xd-<target>`, Candle): every ImageNet class is a base class, drawn long-tailed as above
  (IR 100, 100-shot cap); the target dataset's classes are appended as new classes and scored on the target's
  test images among the target's classes (`test_new`); `test_base` is ImageNet's test split. `synth-xd` is the
  built-in world's counterpart (classes 0-49 source, 50-99 target).
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np

from ..config import DataConfig
from ..errors import DataError
from .base import Split, Task
from .coop import SPECS
from .fewshot import FEWSHOT_VAL_MAX, STREAM_VAL, fewshot_val_shots, sample_k_shot, sample_train_val, val_source
from .registry import DATASETS, register_dataset

log = logging.getLogger(__name__)

DEFAULT_SHOTS = 16
LT_NMAX = 100  # Candle's per-class cap
DEFAULT_RATIO = {"imagenet": 100.0, "synth-xd": 100.0}  # others: 10 (synth-xd: the synthetic cross-dataset)


def base_new_classes(num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(base labels, new labels): base = the first ⌈C/2⌉."""
    n_base = math.ceil(num_classes / 2)
    return np.arange(n_base), np.arange(n_base, num_classes)


def first_seen_order(labels: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """`classes` sorted by where each first appears in `labels` (the split list's order; absent classes last)."""
    labels = np.asarray(labels)
    first = np.full(len(classes), len(labels), dtype=np.int64)
    for i, c in enumerate(classes):
        hits = np.flatnonzero(labels == c)
        if len(hits):
            first[i] = hits[0]
    return np.asarray(classes)[np.argsort(first, kind="stable")]


def b2n_lt_counts(available: np.ndarray, ratio: float, cap: int = LT_NMAX,
                  list_order: np.ndarray | None = None) -> np.ndarray:
    """Candle's imbalanced draw (released `OxfordPets.gen_imbalanced_data` after Dassl's few-shot cap): each class
    keeps c_i = min(available_i, cap) images; classes ranked by c_i (most first), ties in `list_order` (the order
    labels first appear in the train list; default: label order), get the quota
    q = int(max(n_max · (1/ratio)^(rank/(C−1)), 1)) with n_max the largest c_i, and keep min(q, c_i)."""
    capped = np.minimum(np.asarray(available, dtype=np.int64), cap)
    n = len(capped)
    order = np.arange(n) if list_order is None else np.asarray(list_order, dtype=np.int64)
    ranking = order[np.argsort(-capped[order], kind="stable")]  # Counter.most_common: stable, by count
    n_max = int(capped.max()) if n else 0
    quota = np.zeros(n, dtype=np.int64)
    for rank, c in enumerate(ranking):
        quota[c] = int(max(n_max * (1.0 / ratio) ** (rank / max(n - 1.0, 1.0)), 1))
    return np.minimum(quota, capped)


def make_base_to_new(task: Task, cfg: DataConfig, imbalanced: bool = False, dataset: str = "") -> Task:
    """The base-to-new task of a full task (see module doc); `dataset` picks the default imbalance ratio."""
    _require(task, ("train", "test"), "base-to-new")
    base, new = base_new_classes(task.num_classes)
    splits, meta = _draw_train_val(task, base, cfg, imbalanced, dataset)
    test = task.split("test")
    splits["test"] = test
    splits["test_base"] = test.subset(np.flatnonzero(test.labels < len(base)))
    splits["test_new"] = test.subset(np.flatnonzero(test.labels >= len(base)))
    spaces = {"train": base.tolist(), "val": base.tolist(), "test_base": base.tolist(), "test_new": new.tolist()}
    meta.update(base_classes=base.tolist(), new_classes=new.tolist(), label_spaces=spaces)
    log.info("%s: base-to-new, %d base / %d new classes, %d train images", task.name, len(base), len(new),
             len(splits["train"]))
    return dataclasses.replace(task, splits=splits, meta={**task.meta, **meta}, group_counts=None)


def make_cross_dataset(source: Task, target: Task, cfg: DataConfig, dataset: str = "", name: str = "") -> Task:
    """Candle's cross-dataset protocol: every class of `source` is a base class, trained long-tailed (as the
    imbalanced base-to-new draw, default ratio 100 for ImageNet: r = 0.01, capped at 100 per class); the classes of
    `target` are appended as new classes, never trained on, and scored on the target's test images among the
    target's classes only (`test_new`); `test_base` is the source's test split among the source's classes.

    The class list is source names + target names; every class is prompted with the source's templates (a task
    has one template set), as the released code does: its cross-dataset runs prompt ImageNet's and every target's
    classes with ImageNet's "a photo of a {}." (`data.templates=photo` in the presets)."""
    _require(source, ("train", "test"), "cross-dataset (source)")
    _require(target, ("test",), "cross-dataset (target)")
    c_src, c_tgt = source.num_classes, target.num_classes
    base, new = np.arange(c_src), np.arange(c_src, c_src + c_tgt)
    splits, meta = _draw_train_val(source, base, cfg, True, dataset)
    target_test = target.split("test")
    splits["test_base"] = source.split("test")
    splits["test_new"] = Split(target_test.images, target_test.labels + c_src)
    spaces = {"train": base.tolist(), "val": base.tolist(), "test_base": base.tolist(), "test_new": new.tolist()}
    meta.update(base_classes=base.tolist(), new_classes=new.tolist(), label_spaces=spaces, source=source.name,
                target=target.name)
    log.info("%s: cross-dataset, %d source classes (long-tailed, %d train images) -> %d target classes as new",
             name or source.name, c_src, len(splits["train"]), c_tgt)
    return Task(name or f"{source.name}-xd-{target.name}", list(source.classnames) + list(target.classnames),
                list(source.templates), splits, meta={**source.meta, **meta})


def _require(task: Task, splits: tuple[str, ...], what: str) -> None:
    missing = [s for s in splits if s not in task.splits]
    if missing:
        raise DataError(f"{task.name}: {what} needs the split(s) {', '.join(missing)}; it has "
                        f"{', '.join(task.splits)}")


def _draw_train_val(task: Task, base: np.ndarray, cfg: DataConfig, imbalanced: bool,
                    dataset: str) -> tuple[dict[str, Split], dict]:
    """Train and val images of the `base` classes (labels 0..len(base)-1 of `task`): long-tailed by
    `b2n_lt_counts` or K-shot, the first n_i of each class's seeded train order (so draws of different ratios are
    nested); val from the dataset's val split, else the next k_val train images of the class (never from test; see
    fewshot.py)."""
    train = task.split("train")
    meta: dict = {"b2n_seed": cfg.seed}
    base_idx = np.flatnonzero(train.labels < len(base))
    source = val_source(task)
    n_train: int | dict[int, int]
    if imbalanced:
        ratio = float(cfg.imbalance_ratio or DEFAULT_RATIO.get(dataset, 10.0))
        available = np.bincount(train.labels, minlength=task.num_classes)[base]
        cap = int(cfg.shots or LT_NMAX)
        counts = b2n_lt_counts(available, ratio, cap, first_seen_order(train.labels, base))
        n_train = {int(c): int(n) for c, n in zip(base, counts)}
        k_val = FEWSHOT_VAL_MAX
        meta.update(imbalance_ratio=ratio, cap=cap, n_max=int(counts.max()) if len(counts) else 0,
                    counts=counts.tolist())
    else:
        k = int(cfg.shots or DEFAULT_SHOTS)
        n_train, k_val = k, fewshot_val_shots(k, source)
        meta.update(shots=k)
    train_pos, val_pos = sample_train_val(train.labels[base_idx], n_train, k_val if source == "train" else 0, cfg.seed)
    train_idx = base_idx[train_pos]
    splits = {"train": train.subset(train_idx)}
    drawn = {"train": train_idx.tolist()}
    if source == "train":
        val_idx = base_idx[val_pos]
        splits["val"] = train.subset(val_idx)
    else:
        val = task.split("val")
        val_base = np.flatnonzero(val.labels < len(base))
        val_idx = val_base[sample_k_shot(val.labels[val_base], k_val, cfg.seed, stream=STREAM_VAL)]
        splits["val"] = val.subset(val_idx)
    drawn["val"] = val_idx.tolist()
    meta.update(shot_indices=drawn, val_source=source)
    return splits, meta


def _register(dataset: str, imbalanced: bool) -> None:
    name = f"{dataset}-b2n-lt" if imbalanced else f"{dataset}-b2n"

    def build(cfg: DataConfig) -> Task:
        full = DATASETS.get(dataset)(dataclasses.replace(cfg, name=dataset, shots=None))
        return make_base_to_new(dataclasses.replace(full, name=name), cfg, imbalanced, dataset)

    kind = "imbalanced (Candle, IR = data.imbalance_ratio)" if imbalanced else "balanced (K = data.shots, default 16)"
    build.__name__ = f"build_{name.replace('-', '_')}"
    build.__doc__ = f"{dataset}, {kind} base-to-new: base = first half of the classes, new = the rest."
    register_dataset(name)(build)


for _dataset in ["imagenet"] + [s.name for s in SPECS] + ["fgvc_aircraft"]:
    _register(_dataset, imbalanced=False)
    _register(_dataset, imbalanced=True)


def _register_cross(source: str, target: str) -> None:
    name = f"{source}-xd-{target}"

    def build(cfg: DataConfig) -> Task:
        src = DATASETS.get(source)(dataclasses.replace(cfg, name=source, shots=None))
        tgt = DATASETS.get(target)(dataclasses.replace(cfg, name=target, shots=None))
        return make_cross_dataset(src, tgt, cfg, source, name)

    build.__name__ = f"build_{name.replace('-', '_')}"
    build.__doc__ = (f"cross-dataset (Candle): {source} long-tailed (IR = data.imbalance_ratio, default "
                     f"{DEFAULT_RATIO.get(source, 10.0):g}) as base, {target}'s classes as new (scored on its test).")
    register_dataset(name)(build)


for _target in [s.name for s in SPECS] + ["fgvc_aircraft"]:
    _register_cross("imagenet", _target)
