"""Helpers the dataset builders share: root and file look-up with errors that say where to get the data,
split-list parsing, folder scanning, shipped resources, and the final Task assembly (templates + shots)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from ..config import DataConfig
from ..errors import DataError
from .base import FileImages, Split, Task
from .fewshot import apply_shots
from .templates import resolve_templates

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})


def require_root(cfg: DataConfig, hint: str) -> Path:
    """cfg.root as a Path; DataError when unset or missing (`hint` says where to get the data)."""
    if not cfg.root:
        raise DataError(f"dataset {cfg.name!r} needs data.root=PATH. {hint}")
    root = Path(cfg.root).expanduser()
    if not root.exists():
        raise DataError(f"dataset {cfg.name!r}: root {root} does not exist. {hint}")
    return root


def find_file(dirs: Iterable[Path], filename: str, dataset: str, hint: str) -> Path:
    """The first `dir/filename` that exists; DataError naming every place looked at."""
    dirs = list(dirs)
    for d in dirs:
        if (d / filename).is_file():
            return d / filename
    looked = ", ".join(str(d / filename) for d in dirs)
    raise DataError(f"dataset {dataset!r}: missing file {filename} (looked for {looked}). {hint}")


def find_dir(candidates: Iterable[Path], dataset: str, what: str, hint: str) -> Path:
    """The first existing directory among `candidates`; DataError naming them all."""
    candidates = list(candidates)
    for d in candidates:
        if d.is_dir():
            return d
    looked = ", ".join(str(d) for d in candidates)
    raise DataError(f"dataset {dataset!r}: missing {what} folder (looked for {looked}). {hint}")


def read_list_file(path: Path) -> tuple[list[str], np.ndarray]:
    """Parse a split list of `relative/path label` lines (the OLTR / LIFT format); errors name file and line."""
    paths: list[str] = []
    labels: list[int] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.rsplit(maxsplit=1)
            try:
                label = int(parts[1])
            except (IndexError, ValueError):
                raise DataError(f"{path}:{lineno}: expected 'relative/path label', got {line!r}") from None
            paths.append(parts[0])
            labels.append(label)
    if not paths:
        raise DataError(f"split list {path} is empty")
    return paths, np.asarray(labels, dtype=np.int64)


def list_images(folder: Path) -> list[str]:
    """Image files under `folder` (recursive, sorted), relative to `folder`, by extension."""
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        rel = os.path.relpath(dirpath, folder)
        for fn in sorted(filenames):
            if os.path.splitext(fn)[1].lower() in IMAGE_EXTENSIONS and not fn.startswith("."):
                out.append(fn if rel == "." else os.path.join(rel, fn))
    return out


def folder_split(root: Path, class_dirs: Sequence[str], labels: Sequence[int] | None = None) -> Split:
    """A split from `root/<class_dir>/**/image` folders; label i for class_dirs[i] unless `labels` given."""
    paths: list[str] = []
    ys: list[int] = []
    for i, d in enumerate(class_dirs):
        files = list_images(root / d)
        paths += [os.path.join(d, f) for f in files]
        ys += [i if labels is None else labels[i]] * len(files)
    return Split(FileImages(str(root), paths), np.asarray(ys, dtype=np.int64))


def display_name(name: str) -> str:
    """Class names for prompts and reports: underscores become spaces (CoOp, CLIP)."""
    return name.replace("_", " ").strip()


def resource_text(relpath: str) -> str:
    """A file shipped in tailclip/resources (class-name lists and the like)."""
    return resources.files("tailclip").joinpath("resources", relpath).read_text(encoding="utf-8")


@cache
def imagenet_classes() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(wnids, CLIP-style names) of the 1000 ImageNet classes in label order (names = open_clip's list)."""
    rows = [ln.split(" ", 1) for ln in resource_text("imagenet/classnames.txt").splitlines() if ln.strip()]
    return tuple(r[0] for r in rows), tuple(r[1] for r in rows)


def finish_task(
    cfg: DataConfig,
    classnames: Sequence[str],
    splits: dict[str, Split],
    default_templates: str,
    meta: dict[str, Any] | None = None,
    group_counts: np.ndarray | None = None,
) -> Task:
    """Assemble the Task: the config's template set (or the dataset's default), then K-shot sampling if asked."""
    meta = dict(meta or {})
    meta.setdefault("templates", cfg.templates or default_templates)
    task = Task(
        name=cfg.name,
        classnames=list(classnames),
        templates=resolve_templates(cfg.templates, default_templates),
        splits=splits,
        meta=meta,
        group_counts=group_counts,
    )
    log.info("%s: %d classes, splits %s", cfg.name, task.num_classes, {k: len(v) for k, v in splits.items()})
    return apply_shots(task, cfg)
