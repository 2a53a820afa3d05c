"""User datasets: an image folder (one sub-folder per class) or a CSV (`path,label[,split]`).

When the data come without splits, a fixed class-stratified hold-out is made (per class: test = ceil(20 %) when
the class has >= 2 images, val = floor(10 %), train = the rest). It is seeded by a constant, not data.seed, so
changing the K-shot seed never changes the test set.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from pathlib import Path

import numpy as np

from ..config import DataConfig
from ..errors import DataError
from .base import FileImages, Split, Task
from .common import IMAGE_EXTENSIONS, finish_task, list_images, require_root
from .fewshot import STREAM_HOLDOUT, seeded_order
from .registry import register_dataset

log = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "test")
HOLDOUT_SEED = 0
TEST_FRACTION, VAL_FRACTION = 0.2, 0.1


def holdout_assignment(labels: np.ndarray) -> np.ndarray:
    """Split name per item ("train" / "val" / "test") of the fixed stratified hold-out described above."""
    labels = np.asarray(labels, dtype=np.int64)
    out = np.full(len(labels), "train", dtype=object)
    for c in np.unique(labels):
        order = seeded_order(np.flatnonzero(labels == c), HOLDOUT_SEED, int(c), STREAM_HOLDOUT)
        n = len(order)
        n_test = math.ceil(TEST_FRACTION * n) if n >= 2 else 0
        n_val = math.floor(VAL_FRACTION * n)
        out[order[:n_test]] = "test"
        out[order[n_test : n_test + n_val]] = "val"
    return out


def _splits_from_assignment(root: str, paths: list[str], labels: np.ndarray, assign: np.ndarray) -> dict[str, Split]:
    splits = {}
    for name in SPLIT_NAMES:
        idx = np.flatnonzero(assign == name)
        if len(idx):
            splits[name] = Split(FileImages(root, [paths[i] for i in idx]), labels[idx])
    return splits


def _class_dirs(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _warn_coverage(where: Path, classes: list[str], splits: dict[str, Split]) -> None:
    """Warn (it is legal, but rarely meant) about classes without a single image, and classes that the test
    split never shows (their accuracy cannot be measured)."""
    present = {int(c) for sp in splits.values() for c in np.unique(sp.labels)}
    empty = [c for i, c in enumerate(classes) if i not in present]
    if empty:
        log.warning("%s: class(es) with no images: %s", where,
                    ", ".join(empty[:10]) + (" ..." if len(empty) > 10 else ""))
    if "test" in splits:
        tested = {int(c) for c in np.unique(splits["test"].labels)}
        untested = [c for i, c in enumerate(classes) if i in present and i not in tested]
        if untested:
            log.warning("%s: class(es) with no test images (not measured): %s", where,
                        ", ".join(untested[:10]) + (" ..." if len(untested) > 10 else ""))


@register_dataset("image-folder")
def build_image_folder(cfg: DataConfig) -> Task:
    """Your images in class folders: <root>/<class>/* or <root>/{train,val,test}/<class>/* (templates: photo).

    With train/ (and optional val/, test/) sub-folders those are the splits; classes are the sorted union of
    their class folders. With class folders directly under root, a fixed stratified hold-out makes the splits
    (70/10/20 per class, see module doc). Class names are the folder names.
    """
    hint = "Expected <root>/<class>/<images> or <root>/train/<class>/<images> (+ optional val/, test/)."
    root = require_root(cfg, hint)
    if not root.is_dir():
        raise DataError(f"dataset 'image-folder': root {root} is not a folder. {hint}")
    split_dirs = {s: root / s for s in SPLIT_NAMES if (root / s).is_dir()}
    if "train" in split_dirs or "test" in split_dirs:
        classes = sorted({c for d in split_dirs.values() for c in _class_dirs(d)})
        index = {c: i for i, c in enumerate(classes)}
        splits = {}
        for name, d in split_dirs.items():
            paths, labels = [], []
            for c in _class_dirs(d):
                files = list_images(d / c)
                paths += [os.path.join(name, c, f) for f in files]
                labels += [index[c]] * len(files)
            splits[name] = Split(FileImages(str(root), paths), np.asarray(labels, dtype=np.int64))
        meta = {"layout": "split folders"}
    else:
        classes = _class_dirs(root)
        paths, labels = [], []
        for i, c in enumerate(classes):
            files = list_images(root / c)
            paths += [os.path.join(c, f) for f in files]
            labels += [i] * len(files)
        y = np.asarray(labels, dtype=np.int64)
        splits = _splits_from_assignment(str(root), paths, y, holdout_assignment(y))
        meta = {"layout": "class folders, fixed 70/10/20 hold-out"}
    if not classes or not any(len(s) for s in splits.values()):
        raise DataError(
            f"dataset 'image-folder': no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {root}. {hint}"
        )
    _warn_coverage(root, classes, splits)
    return finish_task(cfg, classes, splits, "photo", meta)


def _read_classnames(path: Path) -> list[str]:
    return [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


@register_dataset("csv")
def build_csv(cfg: DataConfig) -> Task:
    """Your images listed in a CSV: root = file with header path,label[,split] (templates: photo).

    Paths are relative to the CSV's folder (or absolute). Labels are class names (classes = sorted names) or,
    when every label is an integer, class indices named by a `classnames.txt` (one per line) next to the CSV.
    split is train / val / test; without a split column a fixed stratified hold-out is made (module doc).
    """
    hint = "Expected a CSV file with header 'path,label[,split]'."
    path = require_root(cfg, hint)
    if not path.is_file():
        raise DataError(f"dataset 'csv': root {path} must be the CSV file itself. {hint}")
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheet exports start with a BOM
        reader = csv.DictReader(f)
        fields = [h.strip() for h in reader.fieldnames or []]
        if "path" not in fields or "label" not in fields:
            raise DataError(f"{path}: header {fields} must contain 'path' and 'label'. {hint}")
        rows, lines = [], []
        for row in reader:
            clean = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
            empty = [k for k in ("path", "label", "split") if k in fields and not clean.get(k)]
            if empty:
                raise DataError(f"{path}:{reader.line_num}: empty {' and '.join(repr(k) for k in empty)} "
                                f"field(s) in row {','.join(clean.get(k, '') for k in fields)!r}")
            rows.append(clean)
            lines.append(reader.line_num)
    if not rows:
        raise DataError(f"{path}: no rows")
    raw_labels = [r["label"] for r in rows]
    if all(lbl.lstrip("-").isdigit() for lbl in raw_labels):
        labels = np.asarray([int(v) for v in raw_labels], dtype=np.int64)
        names_file = path.parent / "classnames.txt"
        if names_file.is_file():
            classes = _read_classnames(names_file)
        else:
            classes = [f"class {i}" for i in range(int(labels.max()) + 1)]
            log.warning("%s: integer labels and no %s; class names are generic ('class <i>'): zero-shot text is then "
                        "meaningless", path, names_file)
        if len(classes) <= labels.max() or labels.min() < 0:
            raise DataError(
                f"{path}: labels span [{labels.min()}, {labels.max()}] but {names_file} names {len(classes)} classes"
            )
    else:
        classes = sorted(set(raw_labels))
        index = {c: i for i, c in enumerate(classes)}
        labels = np.asarray([index[v] for v in raw_labels], dtype=np.int64)
    paths = [r["path"] for r in rows]
    if "split" in fields:
        assign = np.asarray([r["split"] for r in rows], dtype=object)
        for lineno, s in zip(lines, assign):
            if s not in SPLIT_NAMES:
                raise DataError(f"{path}:{lineno}: split {s!r} must be one of {', '.join(SPLIT_NAMES)}")
        meta = {"layout": "csv with split column"}
    else:
        assign = holdout_assignment(labels)
        meta = {"layout": "csv, fixed 70/10/20 hold-out"}
    splits = _splits_from_assignment(str(path.parent), paths, labels, assign)
    _warn_coverage(path, classes, splits)
    return finish_task(cfg, classes, splits, "photo", meta)
