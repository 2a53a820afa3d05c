"""Rendered images of the synthetic world, kept on disk as uint8 arrays so each is rendered once per machine.

A demo row reads its splits several times (train epochs, val per epoch, test), so rendering on every read
dominated the synthetic data path (benchmarks/README.md). An entry is
one `.npy` file (N, 32, 32, 3) uint8 holding exactly the images of one image source, read memory-mapped. Its key
is the generator version, world seed, stream, style, stream positions and labels: changing any of them (e.g.
bumping GENERATOR_VERSION when rendering changes) names another file, so a stale entry is never read. Entries are
written atomically (temp file + rename), so concurrent DataLoader workers or runs never see half a file.

Location: $TAILCLIP_WORLD_CACHE, else ~/.cache/tailclip/world. Sources smaller than CACHE_MIN_IMAGES are
rendered in memory only (cheaper than a file)."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np

from ..io import atomic_write
from . import generator

log = logging.getLogger(__name__)

ENV_VAR = "TAILCLIP_WORLD_CACHE"
CACHE_MIN_IMAGES = 256


def world_cache_dir() -> Path:
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tailclip" / "world"


def entry_path(seed: int, stream: int, style: str, positions: np.ndarray, labels: np.ndarray) -> Path:
    """The file of one image source; the name carries the generator version and seed, the hash everything."""
    h = hashlib.sha256()
    h.update(f"v{generator.GENERATOR_VERSION}/s{seed}/stream{stream}/{style}/".encode())
    h.update(np.ascontiguousarray(positions, np.int64).tobytes())
    h.update(np.ascontiguousarray(labels, np.int64).tobytes())
    name = f"v{generator.GENERATOR_VERSION}-s{seed}-stream{stream}-{style}-n{len(labels)}-{h.hexdigest()[:16]}.npy"
    return world_cache_dir() / name


def _read(path: Path, n: int) -> np.ndarray | None:
    """The entry memory-mapped, or None when it is missing or not what the key promises (then it is rebuilt)."""
    try:
        arr = np.load(path, mmap_mode="r")
    except FileNotFoundError:
        return None
    except (ValueError, OSError, EOFError) as exc:
        log.warning("rendered-world cache entry %s is unreadable (%s); rendering it again", path, exc)
        return None
    if arr.shape != (n, generator.IMAGE_SIZE, generator.IMAGE_SIZE, 3) or arr.dtype != np.uint8:
        log.warning("rendered-world cache entry %s holds %s %s; rendering it again", path, arr.shape, arr.dtype)
        return None
    return arr


def rendered_images(seed: int, stream: int, style: str, positions: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Images at `positions` of (seed, stream, style) with `labels`, uint8 (N, 32, 32, 3): from the cache, else
    rendered and stored. Pixel for pixel what `generator.render_images` returns."""
    positions, labels = np.asarray(positions, np.int64), np.asarray(labels, np.int64)
    if len(labels) < CACHE_MIN_IMAGES:
        return generator.render_images(seed, stream, positions.tolist(), labels.tolist(), style)
    path = entry_path(seed, stream, style, positions, labels)
    cached = _read(path, len(labels))
    if cached is not None:
        return cached
    log.info("rendering %d synthetic images once into %s", len(labels), path)
    images = generator.render_images(seed, stream, positions.tolist(), labels.tolist(), style)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, images)
            fh.flush()
            os.fsync(fh.fileno())

    atomic_write(path, write)
    return images
