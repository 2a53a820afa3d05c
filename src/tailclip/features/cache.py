"""On-disk cache of frozen image features: one safetensors file per named tensor plus a JSON manifest per entry.

An entry holds, per image of one split under one view, a dict of named tensors (`pre_proj`, `proj` and any
backbone taps such as `blocks.5` or `layer3`) plus `labels` and `indices`, all row-aligned. It is keyed by
the backbone fingerprint, the dataset, the split (its identifiers and labels, and a digest of its images' bytes:
see `extract.content_digest`), the view, the preprocessing,
the view's transform (augmentation parameters and seed), the autocast precision and the format version —
and by *what was extracted*: `CacheKey.tensors` maps each tensor name to its storage dtype. A request is a
hit when the stored entry has the same base key and stores every requested tensor in the requested dtype;
it then reads exactly the requested tensors. An entry that lacks a requested tensor (or stores it in another
dtype) is a miss that *extends* the entry: it is re-extracted with the union of what it stored and what is
asked, in one backbone pass, so requests for different taps do not evict each other and every tensor of an
entry comes from the same pass. A manifest whose base key disagrees, or files that are missing, truncated
or of the wrong shape or dtype, make the entry *stale*: it is rebuilt with a warning, never silently reused.

Every tensor file's data section has a checksum in the manifest. It is verified the first time a process
opens the file (then remembered for that file's inode, size and mtime), so a file damaged in place — even at
the same size — is caught before its rows are used, while later reads in the process stay plain memory maps.

Each tensor is streamed into its own file while the backbone runs (bounded memory however large the taps),
so reading never concatenates shards: `safetensors.safe_open` memory-maps the file (private, copy-on-write
mapping) and the returned tensor is a view of that mapping — nothing is read until rows are touched, and a
consumer writing into it changes its own pages, never the file.

Writes are atomic (each file is written under a temp name and renamed; the manifest is written last, so a
reader sees either the old complete entry or the new complete one) and builds are serialised across
processes with a file lock, so two processes extracting the same entry build it once.

Location: `$TAILCLIP_CACHE` if set, else `~/.cache/tailclip/features`; a method's `feature_cache` option
overrides both.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout
from safetensors import SafetensorError, safe_open
from torch import Tensor

from ..errors import ConfigError, UnknownNameError
from ..io import file_mode, write_json

log = logging.getLogger(__name__)

FORMAT_VERSION = 3  # 3: content digest in the key, data checksums in the manifest
ENV_VAR = "TAILCLIP_CACHE"
MANIFEST = "manifest.json"
LOCK = ".lock"
BASE_TENSORS = {"pre_proj": "float32", "proj": "float32"}  # stored in every entry
ROW_KEYS = ("labels", "indices")  # int64, stored in every entry
STORAGE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16,
                                          "bfloat16": torch.bfloat16}
_ST_CODES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}
_ALIGN = 64  # tensor data starts on a 64-byte boundary of the file
_CHUNK = 1 << 22
_VERIFIED: set[tuple[str, int, int, int]] = set()  # (path, inode, size, mtime_ns) of files whose checksum held


def _checksum() -> Any:
    return hashlib.blake2b(digest_size=16)


def _data_checksum(path: Path) -> str:
    """Checksum of a safetensors file's data section (everything after its header)."""
    h = _checksum()
    with open(path, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        fh.seek(8 + header_len)
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _verify_once(path: Path, expected: str | None) -> None:
    """Raise StaleCacheError when the file's data does not match the manifest's checksum; a file that held
    is not read again by this process until its inode, size or mtime change."""
    st = path.stat()
    stamp = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if stamp in _VERIFIED:
        return
    if not expected:
        raise StaleCacheError(f"manifest has no checksum for {path.name}")
    actual = _data_checksum(path)
    if actual != expected:
        raise StaleCacheError(f"checksum mismatch in {path.name} (contents changed since it was written)")
    _VERIFIED.add(stamp)


def cache_root(override: str | os.PathLike | None = None) -> Path:
    """Where the cache lives: explicit override > $TAILCLIP_CACHE > ~/.cache/tailclip/features."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "tailclip" / "features"


def storage_dtype(dtype: str | torch.dtype | None) -> str:
    """Canonical name of a storage dtype (None: float32); anything but float32/float16/bfloat16 is refused."""
    if dtype is None:
        return "float32"
    name = str(dtype).removeprefix("torch.")
    aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16", "float": "float32"}
    name = aliases.get(name, name)
    if name not in STORAGE_DTYPES:
        raise ConfigError(f"feature storage dtype {dtype!r} is not accepted; choose one of: "
                          f"{', '.join(STORAGE_DTYPES)}")
    return name


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.+" else "_" for c in text)[:80]


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


@dataclass(frozen=True)
class CacheKey:
    """Everything that determines the features of one (split, view), and which tensors are wanted."""

    backbone: str  # backbone fingerprint (weights + architecture)
    dataset: str
    split: str
    split_fingerprint: str  # Split.fingerprint(): identifiers + labels
    view: str  # "eval" or "aug<k>"
    content: str = ""  # digest of the split's image bytes (extract.content_digest); "" when not computed
    preprocess: dict[str, Any] = field(default_factory=dict)
    transform: str = ""  # description of the view's transform (augmentation parameters and seed)
    precision: str = "fp32"  # autocast precision of the forward pass
    tensors: dict[str, str] = field(default_factory=lambda: dict(BASE_TENSORS))  # name -> storage dtype
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        clash = set(self.tensors) & set(ROW_KEYS)
        if clash:
            raise ConfigError(f"tensor name(s) {sorted(clash)} are reserved for the row bookkeeping of an entry")
        for name, dtype in self.tensors.items():
            if dtype not in STORAGE_DTYPES:
                raise ConfigError(f"tensor {name!r}: storage dtype {dtype!r} is not one of {', '.join(STORAGE_DTYPES)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def base(self) -> dict[str, Any]:
        """The key without `tensors`: what the rows are (an entry is one folder per base key)."""
        d = self.to_dict()
        d.pop("tensors")
        return d

    def with_tensors(self, tensors: Mapping[str, str]) -> CacheKey:
        return replace(self, tensors=dict(sorted(tensors.items())))

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def relpath(self) -> Path:
        """Folder of this entry. Fields that change often (shots/seed give a new split fingerprint) are part
        of the path, so grids of K-shot runs keep one entry each instead of overwriting each other; so is a
        hash of an augmented view's transform, so two methods' augmentations (Tip-Adapter's, LDC's) coexist."""
        view = self.view if self.view == "eval" else f"{self.view}-{_short_hash(self.transform)}"
        return (
            Path(_safe_name(self.backbone[:16]))
            / _safe_name(self.dataset)
            / f"{_safe_name(self.split)}-{_safe_name(self.split_fingerprint[:16])}"
            / _safe_name(view)
        )


@dataclass
class FeatureSet:
    """Features of one split and view: named tensors, row-aligned, in split order of the images that could
    be read. Tensors read from the cache are memory-mapped views of its files (see the module docstring)."""

    tensors: dict[str, Tensor]  # name -> (N, ...): proj (N, D) un-normalised, pre_proj (N, d), taps
    labels: Tensor  # (N,) int64
    indices: Tensor  # (N,) positions in the split
    skipped: list[str] = field(default_factory=list)
    path: Path | None = None

    def __len__(self) -> int:
        return int(self.labels.numel())

    @property
    def proj(self) -> Tensor:
        return self.get("proj")

    @property
    def pre_proj(self) -> Tensor:
        return self.get("pre_proj")

    @property
    def names(self) -> list[str]:
        return sorted(self.tensors)

    def get(self, name: str) -> Tensor:
        """The (N, ...) tensor stored under `name` (proj, pre_proj or a tap that was requested)."""
        try:
            return self.tensors[name]
        except KeyError:
            where = f" in {self.path}" if self.path else ""
            raise UnknownNameError(f"no feature tensor {name!r}{where}; this set holds: {', '.join(self.names)} "
                                   "(request taps when asking for the features)") from None


class StaleCacheError(Exception):
    """An entry exists but does not match the expected key or its files are damaged (internal)."""


class IncompleteEntryError(Exception):
    """An entry with the expected base key that lacks some requested tensors (internal): it is extended."""

    def __init__(self, stored: dict[str, str], missing: list[str]) -> None:
        super().__init__(f"lacks tensor(s) {missing}")
        self.stored = stored


class _TensorFileWriter:
    """Streams one tensor into a safetensors file batch by batch: a fixed header slot is reserved first and
    filled (space-padded, which the format allows) once the row count is known, then the temp file is
    renamed into place. Memory stays at one batch however many rows the split has."""

    def __init__(self, path: Path, name: str, dtype: torch.dtype, row_shape: Sequence[int],
                 metadata: dict[str, str]) -> None:
        self.path, self.name, self.dtype, self.row_shape = path, name, dtype, tuple(row_shape)
        self.metadata = metadata
        self.rows = 0
        self.hash = _checksum()
        widest = len(self._header(10**15, 10**19))
        self.slot = -(-(8 + widest) // _ALIGN) * _ALIGN - 8
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        self.tmp = Path(tmp)
        self.fh = os.fdopen(fd, "wb")
        self.fh.write(b"\0" * (8 + self.slot))

    def _header(self, rows: int, nbytes: int) -> bytes:
        entry = {"dtype": _ST_CODES[self.dtype], "shape": [rows, *self.row_shape], "data_offsets": [0, nbytes]}
        return json.dumps({"__metadata__": self.metadata, self.name: entry}, separators=(",", ":")).encode()

    def append(self, t: Tensor) -> None:
        if tuple(t.shape[1:]) != self.row_shape or t.dtype != self.dtype:
            raise ValueError(f"tensor {self.name!r}: batch rows of shape {tuple(t.shape[1:])} {t.dtype}, earlier "
                             f"batches gave {self.row_shape} {self.dtype}")
        if t.numel():
            data = t.contiguous().reshape(-1).view(torch.uint8).numpy().data
            self.fh.write(data)
            self.hash.update(data)
        self.rows += int(t.shape[0])

    def finish(self) -> dict[str, Any]:
        nbytes = self.rows * self.dtype.itemsize * int(torch.Size(self.row_shape).numel())
        header = self._header(self.rows, nbytes)
        self.fh.seek(0)
        self.fh.write(struct.pack("<Q", self.slot) + header + b" " * (self.slot - len(header)))
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        os.chmod(self.tmp, file_mode())  # mkstemp makes 0600: a shared cache must be readable by its other users
        os.replace(self.tmp, self.path)
        return {"file": self.path.name, "shape": [self.rows, *self.row_shape],
                "dtype": str(self.dtype).removeprefix("torch."), "checksum": self.hash.hexdigest()}

    def abort(self) -> None:
        self.fh.close()
        self.tmp.unlink(missing_ok=True)


class FeatureCache:
    """get_or_build(key, build) returns the cached FeatureSet, building it (once, under a lock) when needed."""

    def __init__(self, root: str | os.PathLike | None = None, lock_timeout: float = -1) -> None:
        self.root = cache_root(root)
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
            stored_key = dict(manifest["key"])
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise StaleCacheError(f"unreadable manifest {manifest_path}: {exc!r}") from None
        stored = stored_key.pop("tensors", None)
        want = key.base()
        if stored_key != want:  # an older format version lands here too (it names `version`)
            diff = sorted(k for k in set(stored_key) | set(want) if stored_key.get(k) != want.get(k))
            raise StaleCacheError(f"manifest key differs in {diff}")
        try:
            stored, rows, files = dict(stored), int(manifest["rows"]), dict(manifest["files"])
        except (KeyError, TypeError, ValueError) as exc:
            raise StaleCacheError(f"incomplete manifest {manifest_path}: {exc!r}") from None
        missing = [n for n, d in key.tensors.items() if stored.get(n) != d]
        if missing:
            raise IncompleteEntryError(stored, missing)
        tensors = {n: self._open(folder, files, n, rows, STORAGE_DTYPES[d]) for n, d in key.tensors.items()}
        labels, indices = (self._open(folder, files, n, rows, torch.int64) for n in ROW_KEYS)
        return FeatureSet(tensors, labels, indices, list(manifest.get("skipped", [])), folder)

    @staticmethod
    def _open(folder: Path, files: dict[str, Any], name: str, rows: int, dtype: torch.dtype) -> Tensor:
        """Memory-map one stored tensor (no copy) and check it against the manifest."""
        if name not in files:
            raise StaleCacheError(f"manifest lists no file for tensor {name!r}")
        path = folder / files[name]["file"]
        if not path.is_file():
            raise StaleCacheError(f"missing file {path}")
        try:
            _verify_once(path, files[name].get("checksum"))
            with safe_open(str(path), framework="pt") as fh:
                t = fh.get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError, struct.error) as exc:  # truncated / corrupt
            raise StaleCacheError(f"unreadable file {path}: {exc}") from None
        if list(t.shape) != list(files[name]["shape"]) or t.shape[0] != rows or t.dtype != dtype:
            raise StaleCacheError(f"{path} holds {tuple(t.shape)} {t.dtype}, expected {rows} rows of {dtype}")
        return t

    def load(self, key: CacheKey) -> FeatureSet | None:
        """The cached features, or None on a miss, a stale entry or one lacking a requested tensor."""
        try:
            return self._read(key)
        except FileNotFoundError:
            return None
        except IncompleteEntryError as exc:
            log.info("feature cache entry %s %s; it will be extended", self.entry_dir(key), exc)
            return None
        except StaleCacheError as exc:
            log.warning("feature cache entry %s is stale (%s); it will be rebuilt", self.entry_dir(key), exc)
            return None

    def build_key(self, key: CacheKey) -> CacheKey | None:
        """None when `key`'s entry is complete; else the key a build must produce: `key`, or `key` with the stored
        entry's other tensors added when it is extended (what get_or_build would build)."""
        try:
            self._read(key)
            return None
        except (FileNotFoundError, StaleCacheError):
            return key
        except IncompleteEntryError as exc:
            return key.with_tensors({**exc.stored, **key.tensors})

    # ------------------------------------------------------------------ writing
    def get_or_build(self, key: CacheKey, build: Callable[[CacheKey], Iterable[dict[str, Tensor]]],
                     skipped: Callable[[], list[str]] | None = None) -> FeatureSet:
        """Return the entry for `key`; otherwise run `build(build_key)` under the entry's lock and store it.
        `build_key` is `key`, or `key` with the stored entry's other tensors added when the entry is extended;
        `build` yields batches with `labels`, `indices` and every name of `build_key.tensors`. `skipped` is
        called after the build to record images left out (bad files)."""
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
            build_key = key
            try:
                return self._read(key)  # built by another process while we waited
            except (FileNotFoundError, StaleCacheError):
                pass
            except IncompleteEntryError as exc:
                build_key = key.with_tensors({**exc.stored, **key.tensors})
            self._build(build_key, folder, build, skipped)
            return self._read(key)
        finally:
            lock.release()

    def _build(self, key: CacheKey, folder: Path, build: Callable[[CacheKey], Iterable[dict[str, Tensor]]],
               skipped: Callable[[], list[str]] | None) -> None:
        start = time.time()
        build_id = uuid.uuid4().hex[:8]
        dtypes = {**{n: STORAGE_DTYPES[d] for n, d in key.tensors.items()}, **dict.fromkeys(ROW_KEYS, torch.int64)}
        metadata = {"key": key.digest()}
        writers: dict[str, _TensorFileWriter] = {}

        def writer(name: str, row_shape: Sequence[int]) -> _TensorFileWriter:
            if name not in writers:
                path = folder / f"{_safe_name(name)}-{build_id}.safetensors"
                writers[name] = _TensorFileWriter(path, name, dtypes[name], row_shape, metadata)
            return writers[name]

        try:
            for batch in build(key):
                absent = sorted(set(dtypes) - set(batch))
                if absent:
                    raise KeyError(f"feature batch lacks {absent} (it has {sorted(batch)})")
                n = int(batch["labels"].shape[0])
                for name, dtype in dtypes.items():
                    t = batch[name].detach().to("cpu").to(dtype)
                    if t.shape[0] != n:
                        raise ValueError(f"feature batch: {name!r} has {t.shape[0]} rows, labels have {n}")
                    writer(name, t.shape[1:]).append(t)
            for name in dtypes:  # nothing extracted (every image skipped): empty tensors
                writer(name, ())
            files = {name: w.finish() for name, w in writers.items()}
        except BaseException:
            for w in writers.values():
                if not w.fh.closed:
                    w.abort()
            raise
        rows = files["labels"]["shape"][0]
        manifest = {
            "key": key.to_dict(),
            "digest": key.digest(),
            "rows": rows,
            "files": files,
            "skipped": list(skipped() if skipped else []),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "build_id": build_id,
            "seconds": round(time.time() - start, 3),
        }
        write_json(folder / MANIFEST, manifest)
        keep = {f["file"] for f in files.values()}
        for old in folder.glob("*.safetensors"):  # files of an older build (mmaps stay valid on POSIX)
            if old.name not in keep:
                old.unlink(missing_ok=True)
        log.info("extracted %d feature rows (%s) into %s in %.1fs", rows, ", ".join(key.tensors), folder,
                 manifest["seconds"])
