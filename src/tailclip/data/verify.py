"""`tailclip verify-data`: name every missing or unreadable image of a dataset before a long run finds it."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable

from PIL import Image

from ..config import DataConfig
from ..errors import DataError
from .base import FileImages, ImageSource, SubsetImages
from .registry import build_task

log = logging.getLogger(__name__)


def _resolve(source: ImageSource, index: int) -> tuple[ImageSource, int]:
    """Unwrap subset views down to the source that owns the item."""
    while isinstance(source, SubsetImages):
        source, index = source.base, source.indices[index]
    return source, index


def check_image(source: ImageSource, index: int, full: bool = False) -> str | None:
    """None if the item is fine, else one line naming it: PIL `verify()` for files (full=True decodes too)."""
    source, index = _resolve(source, index)
    if isinstance(source, FileImages):
        path = source.ident(index)
        if not os.path.isfile(path):
            return f"missing: {path}"
        try:
            with Image.open(path) as img:
                img.verify()
            if full:
                with Image.open(path) as img:
                    img.load()
        except Exception as exc:  # noqa: BLE001  (PIL raises many types for broken files)
            return f"unreadable: {path} ({type(exc).__name__}: {exc})"
        return None
    try:
        source.load(index)
    except DataError as exc:
        return f"unreadable: {source.ident(index)} ({exc})"
    return None


def verify_dataset(
    cfg: DataConfig, full: bool = False, progress: Callable[[int, int], None] | None = None
) -> list[str]:
    """One line per missing or unreadable file of every split (empty list: all good).

    Split files or folders that are missing come back as their DataError message (one line). Items shared by
    several splits (ImageNet's val = test) are checked once. `progress(done, total)` is called as it goes.
    """
    try:
        task = build_task(dataclasses.replace(cfg, shots=None))
    except DataError as exc:
        return [str(exc)]
    problems: list[str] = []
    seen: set[str] = set()
    total = sum(len(s) for s in task.splits.values())
    done = 0
    for split_name, split in task.splits.items():
        for i in range(len(split)):
            done += 1
            ident = split.images.ident(i)
            if ident in seen:
                continue
            seen.add(ident)
            problem = check_image(split.images, i, full)
            if problem:
                problems.append(f"{split_name}: {problem}")
            if progress is not None and (done % 1000 == 0 or done == total):
                progress(done, total)
    if progress is not None:
        progress(total, total)
    log.info("verified %d images of %s: %d problem(s)", len(seen), cfg.name, len(problems))
    return problems
