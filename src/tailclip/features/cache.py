"""On-disk cache of frozen image features: safetensors shards plus a JSON manifest per entry.

An entry is keyed by the backbone fingerprint, the dataset, the split (and its content fingerprint) and the
view (eval view or augmented view k); its manifest also records the preprocessing, the transform, the
precision and the format version. A manifest that disagrees with the key we expect, or shards that are
missing or of the wrong shape, make the entry *stale*: it is rebuilt, never silently reused.

Writes are atomic (shards and manifest are written to temp files and renamed; the manifest is written last,
so a reader sees either the old complete entry or the new complete one) and builds are serialised across
processes with a file lock, so two processes extracting the same entry build it once. Reads go through
`safetensors.safe_open`, which memory-maps the shard files.

Location: `$TAILCLIP_CACHE` if set, else `~/.cache/tailclip/features`; a method's `feature_cache` option
overrides both.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout
from safetensors import SafetensorError, safe_open
from torch import Tensor

from ..io import atomic_save_tensors, write_json

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
ENV_VAR = "TAILCLIP_CACHE"
MANIFEST = "manifest.json"
LOCK = ".lock"
TENSOR_KEYS = ("proj", "pre_proj", "labels", "indices")
DEFAULT_SHARD_ROWS = 65536


def cache_root(override: str | os.PathLike | None = None) -> Path:
    """Where the cache lives: explicit override > $TAILCLIP_CACHE > ~/.cache/tailclip/features."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "tailclip" / "features"


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.+" else "_" for c in text)[:80]


@dataclass(frozen=True)
class CacheKey:
    """Everything that determines the features of one (split, view); see the module docstring."""

    backbone: str  # backbone fingerprint (weights + architecture)
    dataset: str
    split: str
    split_fingerprint: str  # Split.fingerprint(): identifiers + labels
    view: str  # "eval" or "aug<k>"
    preprocess: dict[str, Any] = field(default_factory=dict)
    transform: str = ""  # human-readable description of the transform (augmentation parameters, seed)
    precision: str = "fp32"
    version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def relpath(self) -> Path:
        """Folder of this entry. Fields that change often (shots/seed give a new split fingerprint) are part
        of the path, so grids of K-shot runs keep one entry each instead of overwriting each other."""
        return (
            Path(_safe_name(self.backbone[:16]))
            / _safe_name(self.dataset)
            / f"{_safe_name(self.split)}-{_safe_name(self.split_fingerprint[:16])}"
            / _safe_name(self.view)
        )


@dataclass
class FeatureSet:
    """Features of one split and view, rows in split order of the images that could be read."""

    proj: Tensor  # (N, D) projected, un-normalised
    pre_proj: Tensor  # (N, d)
    labels: Tensor  # (N,) int64
    indices: Tensor  # (N,) positions in the split
    skipped: list[str] = field(default_factory=list)
    path: Path | None = None

    def __len__(self) -> int:
        return int(self.labels.numel())

    def get(self, kind: str) -> Tensor:
        if kind not in ("proj", "pre_proj"):
            raise ValueError(f"feature kind must be 'proj' or 'pre_proj', got {kind!r}")
        return self.proj if kind == "proj" else self.pre_proj


class StaleCacheError(Exception):
    """An entry exists but does not match the expected key or its shards are damaged (internal)."""


class FeatureCache:
    """get_or_build(key, build) returns the cached FeatureSet, building it (once, under a lock) when needed."""

    def __init__(self, root: str | os.PathLike | None = None, shard_rows: int = DEFAULT_SHARD_ROWS,
                 lock_timeout: float = -1) -> None:
        self.root = cache_root(root)
        self.shard_rows = int(shard_rows)
        self.lock_timeout = lock_timeout  # -1: wait as long as another process is extracting

    def entry_dir(self, key: CacheKey) -> Path:
        return self.root / key.relpath()

    # ------------------------------------------------------------------ reading
    def _read(self, key: CacheKey) -> FeatureSet:
        folder = self.entry_dir(key)
        manifest_path = folder / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(manifest_path)
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise StaleCacheError(f"unreadable manifest {manifest_path}: {exc}") from None
        if manifest.get("key") != key.to_dict():
            stored = manifest.get("key") or {}
            diff = sorted(k for k in set(stored) | set(key.to_dict()) if stored.get(k) != key.to_dict().get(k))
            raise StaleCacheError(f"manifest key differs in {diff}")
        parts: dict[str, list[Tensor]] = {k: [] for k in TENSOR_KEYS}
        total = 0
        for shard in manifest["shards"]:
            path = folder / shard["file"]
            if not path.is_file():
                raise StaleCacheError(f"missing shard {path}")
            try:
                with safe_open(str(path), framework="pt") as fh:  # memory-mapped
                    for k in TENSOR_KEYS:
                        t = fh.get_tensor(k)
                        if t.shape[0] != shard["rows"]:
                            raise StaleCacheError(f"shard {path} has {t.shape[0]} rows of {k}, manifest says {shard['rows']}")
                        parts[k].append(t)
            except StaleCacheError:
                raise
            except (SafetensorError, OSError, ValueError, RuntimeError) as exc:  # truncated / corrupt file
                raise StaleCacheError(f"unreadable shard {path}: {exc}") from None
            total += shard["rows"]
        if total != manifest["rows"]:
            raise StaleCacheError(f"shards hold {total} rows, manifest says {manifest['rows']}")
        dims = manifest["dims"]
        cat = {
            k: (torch.cat(v) if v else torch.empty((0, dims[k]) if k in dims else (0,),
                                                   dtype=torch.float32 if k in dims else torch.int64))
            for k, v in parts.items()
        }
        return FeatureSet(cat["proj"], cat["pre_proj"], cat["labels"].long(), cat["indices"].long(),
                          list(manifest.get("skipped", [])), folder)

    def load(self, key: CacheKey) -> FeatureSet | None:
        """The cached features, or None on a miss or a stale entry (never raises for those)."""
        try:
            return self._read(key)
        except FileNotFoundError:
            return None
        except StaleCacheError as exc:
            log.warning("feature cache entry %s is stale (%s); it will be rebuilt", self.entry_dir(key), exc)
            return None

    # ------------------------------------------------------------------ writing
    def get_or_build(self, key: CacheKey, build: Callable[[], Iterable[dict[str, Tensor]]],
                     skipped: Callable[[], list[str]] | None = None) -> FeatureSet:
        """Return the entry for `key`; on a miss or stale entry run `build` (an iterable of batches with
        keys proj, pre_proj, labels, indices) under the entry's lock and store it. `skipped` is called after
        the build to record images left out (bad files)."""
        hit = self.load(key)
        if hit is not None:
            log.debug("feature cache hit %s", hit.path)
            return hit
        folder = self.entry_dir(key)
        folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(folder / LOCK), timeout=self.lock_timeout)
        try:
            lock.acquire(timeout=0.05)
        except Timeout:
            log.info("another process is extracting %s; waiting for it", folder)
            lock.acquire()
        try:
            hit = self.load(key)  # built by another process while we waited
            if hit is not None:
                return hit
            self._build(key, folder, build, skipped)
            return self._read(key)
        finally:
            lock.release()

    def _build(self, key: CacheKey, folder: Path, build: Callable[[], Iterable[dict[str, Tensor]]],
               skipped: Callable[[], list[str]] | None) -> None:
        start = time.time()
        build_id = uuid.uuid4().hex[:8]
        shards: list[dict[str, Any]] = []
        buffer: dict[str, list[Tensor]] = {k: [] for k in TENSOR_KEYS}
        buffered = 0
        dims: dict[str, int] = {}

        def flush() -> None:
            nonlocal buffered
            if buffered == 0:
                return
            tensors = {k: torch.cat(v) for k, v in buffer.items()}
            name = f"shard-{build_id}-{len(shards):05d}.safetensors"
            atomic_save_tensors(folder / name, tensors, metadata={"key": key.digest()})
            shards.append({"file": name, "rows": buffered})
            for v in buffer.values():
                v.clear()
            buffered = 0

        for batch in build():
            n = int(batch["labels"].shape[0])
            for k in TENSOR_KEYS:
                t = batch[k].detach().cpu()
                t = t.float() if k in ("proj", "pre_proj") else t.long()
                buffer[k].append(t)
                if k in ("proj", "pre_proj"):
                    dims[k] = int(t.shape[1])
            buffered += n
            if buffered >= self.shard_rows:
                flush()
        flush()
        rows = sum(s["rows"] for s in shards)
        manifest = {
            "key": key.to_dict(),
            "digest": key.digest(),
            "rows": rows,
            "dims": dims,
            "shards": shards,
            "skipped": list(skipped() if skipped else []),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "build_id": build_id,
            "seconds": round(time.time() - start, 3),
        }
        write_json(folder / MANIFEST, manifest)
        keep = {s["file"] for s in shards}
        for old in folder.glob("shard-*.safetensors"):  # shards of an older build (mmaps stay valid on POSIX)
            if old.name not in keep:
                old.unlink(missing_ok=True)
        log.info("extracted %d feature rows into %s in %.1fs", rows, folder, manifest["seconds"])
