"""`tailclip prepare DATASET --root R --out O --short-side 256`: a pre-resized copy of a dataset's images, so JPEG
decoding of full-size photos stops limiting training (a 500x375 JPEG decodes several times slower than its
341x256 copy, and RandomResizedCrop(224) throws the extra pixels away anyway).

The copy keeps the folder layout and file names (every other file under the root, such as split lists, is copied
as is), so the dataset's own loader reads it with `data.root=O`. Images whose short side is already at most
`short_side` are copied unchanged (never upscaled). `O/tailclip_prepared.json` records the source, the short side
and the counts; `build_task` puts it into the task's meta, so results.json marks runs on a prepared copy."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from PIL import Image

from ..config import DataConfig
from ..errors import ConfigError, DataError
from ..io import atomic_write, write_json
from .base import FileImages, SubsetImages
from .common import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)

RECORD = "tailclip_prepared.json"
RESAMPLE = Image.Resampling.BICUBIC


def prepared_record(root: str | Path | None) -> dict[str, Any] | None:
    """The record of a prepared copy at `root`, or None for an original dataset."""
    if root is None:
        return None
    path = Path(root).expanduser() / RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def _file_paths(images: Any) -> list[str]:
    """Paths of the files behind a split's image source (unwrapping subsets); [] for in-memory sources."""
    while isinstance(images, SubsetImages):
        images = images.base
    if isinstance(images, FileImages):
        return [images.ident(i) for i in range(len(images))]
    return []


def resize_short_side(src: Path, dst: Path, short_side: int, quality: int) -> bool:
    """Write `src` with its short side scaled down to `short_side` (atomically); False when copied as is."""
    try:
        with Image.open(src) as img:
            w, h = img.size
            scale = short_side / min(w, h)
            if scale >= 1.0:
                shutil.copyfile(src, dst)
                return False
            fmt = img.format or "JPEG"
            out = img.convert("RGB").resize((max(1, round(w * scale)), max(1, round(h * scale))), RESAMPLE)
    except OSError as exc:
        raise DataError(f"cannot read image {src}: {exc}") from None
    opts = {"quality": quality} if fmt == "JPEG" else {}
    atomic_write(dst, lambda tmp: out.save(tmp, format=fmt, **opts))
    return True


def prepare_dataset(name: str, root: str, out: str, short_side: int = 256, quality: int = 90) -> dict[str, Any]:
    """Write the pre-resized copy of dataset `name` (at `root`) to `out`; returns the record."""
    from .registry import build_task

    if short_side < 16:
        raise ConfigError(f"--short-side {short_side} is too small (>= 16)")
    src_root, dst_root = Path(root).expanduser().resolve(), Path(out).expanduser().resolve()
    if dst_root == src_root or src_root in dst_root.parents:
        raise ConfigError(f"--out {dst_root} must lie outside the dataset root {src_root}")
    if prepared_record(src_root) is not None:
        raise ConfigError(f"{src_root} is already a prepared copy; prepare from the original images")
    task = build_task(DataConfig(name=name, root=str(src_root)))
    images = sorted({Path(p).resolve() for split in task.splits.values() for p in _file_paths(split.images)})
    if not images:
        raise DataError(f"dataset {name!r} at {src_root} has no image files to prepare")
    outside = [p for p in images if src_root not in p.parents]
    if outside:
        raise DataError(f"{len(outside)} images lie outside the root {src_root} (e.g. {outside[0]}); cannot mirror")
    wanted = set(images)
    resized = copied = 0
    for path in sorted(src_root.rglob("*")):
        if not path.is_file():
            continue
        dst = dst_root / path.relative_to(src_root)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if path in wanted and path.suffix.lower() in IMAGE_EXTENSIONS:
            if resize_short_side(path, dst, short_side, quality):
                resized += 1
            else:
                copied += 1
        else:
            shutil.copyfile(path, dst)
    record = {"dataset": name, "source_root": str(src_root), "short_side": short_side, "quality": quality,
              "images": len(images), "resized": resized, "copied_unchanged": copied}
    write_json(dst_root / RECORD, record)
    log.info("prepared %s: %d images (%d resized to short side %d, %d already smaller) in %s", name, len(images),
             resized, short_side, copied, dst_root)
    return record
