"""Computing features with a backbone and routing them through the cache.

Frozen-encoder methods call `method_features(method, ctx, split, view=..., taps=..., dtype=...)` (one view) or
`method_views(method, ctx, split, k, ...)` (K augmented views); both return memory-mapped, cached tensors and
extract them on a miss. `split_features` / `split_views` are the same without a method. `extract_from_config`
backs `tailclip extract`.

Augmented views: view k of a split ("aug<k>") applies an `AugSpec` (RandomResizedCrop + flip, then the
backbone's normalisation) whose randomness for image i is drawn from a generator seeded by (seed, k, i) only.
So a view is reproducible, independent of batch size, DataLoader workers and skipped images, and a view
re-extracted later (to add a tap) is the same crops. The AugSpec and the seed are part of the cache key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import uuid
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor

from ..config import feature_cache_of
from ..errors import ConfigError
from ..io import atomic_save_tensors, file_checksum, write_json
from ..runtime import autocast, distributed, iter_batches, resolve_device
from .cache import BASE_TENSORS, STORAGE_DTYPES, CacheKey, FeatureCache, FeatureSet, storage_dtype

if TYPE_CHECKING:
    from ..backbones.base import Backbone, Preprocess
    from ..config import RunConfig
    from ..data.base import LabeledImages, Task

log = logging.getLogger(__name__)

AUG_SEED = 0  # default seed of augmented views
INDEX_DIR = "_content"  # per-dataset file hash indexes, under the cache root
_index_lock = threading.Lock()
_indexes: dict[Path, dict[str, list[Any]]] = {}  # content indexes read by this process


def _file_hash(path: str) -> str:
    """The content index's hash of one image file (a seam the tests count calls through)."""
    return file_checksum(path)


def _array_hash(array: Any) -> str:
    """Hash of an in-memory image array's bytes."""
    data = np.ascontiguousarray(array)
    return hashlib.blake2b(memoryview(data).cast("B"), digest_size=16).hexdigest()


def _leaf_items(images: Any, rows: Sequence[int]) -> tuple[Any, list[int]]:
    """The source that holds the bytes of `images` (through SubsetImages) and the rows of it used."""
    from ..data.base import SubsetImages

    while isinstance(images, SubsetImages):
        rows = [images.indices[i] for i in rows]
        images = images.base
    return images, list(rows)


def content_digest(images: Any, cache: FeatureCache, dataset: str, rehash: bool = False) -> str:
    """Digest of the bytes behind a split's images, so replacing an image under the same name makes a new key.

    Files: each file's (size, mtime) is checked against a per-dataset index kept under the cache root
    (`_content/<dataset>.json`: path -> [size, mtime_ns, hash]); only files whose size or mtime changed are
    read and hashed again, so a warm index costs one stat per file. That misses a file rewritten with its size
    and mtime kept (`cp -p`, `rsync -t`): `rehash` (data.content_check=hash, `tailclip verify-data --hash`)
    reads and hashes every file again and corrects the index. In-memory arrays (CIFAR) are hashed whole (once
    per source object). Other sources (procedural images) give "" (their identifiers and parameters already fix
    their pixels)."""
    return _content(images, cache, dataset, rehash)[0]


def _content(images: Any, cache: FeatureCache, dataset: str, rehash: bool) -> tuple[str, int]:
    """(content digest, files whose stored hash was stale although their size and mtime matched)."""
    from ..data.base import ArrayImages, FileImages

    src, rows = _leaf_items(images, range(len(images)))
    if isinstance(src, ArrayImages):
        memo = getattr(src, "_tailclip_content", None)
        if memo is None:
            memo = _array_hash(src.array)
            src._tailclip_content = memo
        h = hashlib.blake2b(memo.encode(), digest_size=16)
        h.update(json.dumps(rows).encode())
        return h.hexdigest(), 0
    if not isinstance(src, FileImages):
        return "", 0
    index_path = cache.root / INDEX_DIR / f"{hashlib.sha256(dataset.encode()).hexdigest()[:8]}-{dataset[:40]}.json"
    with _index_lock:
        index = _indexes.get(index_path)
        if index is None:
            try:
                index = dict(json.loads(index_path.read_text()))
            except (OSError, ValueError, TypeError):
                index = {}
            _indexes[index_path] = index
        h = hashlib.blake2b(digest_size=16)
        changed = stale = 0
        for i in rows:
            path = os.path.abspath(src.ident(i))
            try:
                st = os.stat(path)
            except OSError:  # a missing file: the extraction reports it (or skips it); here it hashes as absent
                h.update(f"{path}\0missing\0".encode())
                continue
            entry = index.get(path)
            same_stat = entry is not None and entry[0] == st.st_size and entry[1] == st.st_mtime_ns
            if not same_stat or rehash:
                new = [st.st_size, st.st_mtime_ns, _file_hash(path)]
                if same_stat and new[2] != entry[2]:
                    stale += 1
                    log.warning("%s changed although its size and mtime did not; its features are re-extracted", path)
                if new != entry:
                    changed += 1
                entry = index[path] = new
            h.update(f"{path}\0{entry[2]}\0".encode())
        if changed:
            try:
                write_json(index_path, index)
            except OSError as exc:  # a read-only cache still works, it just re-hashes next time
                log.warning("could not update the content index %s: %s", index_path, exc)
            log.info("hashed %d changed or new image file(s) of %s", changed, dataset)
    return h.hexdigest(), stale


def rehash_dataset(task: Task, cache: FeatureCache) -> dict[str, int]:
    """`tailclip verify-data --hash`: hash every image file of every split again; per split, how many files had
    changed while keeping their size and mtime (their index entries are corrected, so stale features are not
    reused)."""
    return {name: _content(split.images, cache, task.name, rehash=True)[1] for name, split in task.splits.items()}


@dataclass(frozen=True)
class AugSpec:
    """The augmentation of cached views: RandomResizedCrop(S, scale, interpolation) (+ horizontal flip), then
    the backbone's normalisation. The default is Tip-Adapter's cache augmentation (scale 0.5-1); LDC uses
    `AugSpec(scale=(0.8, 1.0), interpolation="bicubic")`. interpolation None: the backbone's own."""

    scale: tuple[float, float] = (0.5, 1.0)
    interpolation: str | None = None
    flip: bool = True

    def build(self, pre: Preprocess) -> Callable[[Any], Tensor]:
        from ..data.transforms import train_transform

        return train_transform(pre, scale=tuple(self.scale), interpolation=self.interpolation, flip=self.flip)

    def describe(self, pre: Preprocess) -> str:
        lo, hi = self.scale
        return (f"rrc{pre.image_size}(scale=({lo:g},{hi:g}),{self.interpolation or pre.interpolation})"
                + ("+hflip" if self.flip else ""))


DEFAULT_AUG = AugSpec()


def backbone_fingerprint(backbone: Backbone) -> str:
    """The backbone's own `fingerprint` when it has one; else a hash of its spec and its weights (computed
    once per backbone object, which keeps random-weight test models distinct)."""
    fp = getattr(backbone, "fingerprint", None)
    if isinstance(fp, str) and fp:
        return fp
    cached = getattr(backbone, "_tailclip_fingerprint", None)
    if cached:
        return cached
    h = hashlib.sha256(json.dumps(getattr(backbone, "spec", {}), sort_keys=True, default=str).encode())
    for name, tensor in sorted(backbone.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                 if tensor.numel() else b"")
    fp = h.hexdigest()[:32]
    try:
        object.__setattr__(backbone, "_tailclip_fingerprint", fp)
    except (AttributeError, TypeError):  # pragma: no cover - modules that refuse new attributes
        log.debug("could not memoise the fingerprint on %s", type(backbone).__name__)
    return fp


def _view_index(view: str) -> int | None:
    """None for "eval", k for "aug<k>"."""
    if view == "eval":
        return None
    if not view.startswith("aug") or not view[3:].isdigit():
        raise ConfigError(f"unknown feature view {view!r}; use 'eval' or 'aug<k>'")
    return int(view[3:])


def view_transform(pre: Preprocess, view: str, aug: AugSpec | None = None,
                   seed: int = AUG_SEED) -> tuple[Callable[[Any], Tensor], str]:
    """(transform, description for the cache key) of a view: "eval" is the backbone's eval transform,
    "aug<k>" the AugSpec (default Tip-Adapter's) drawn with `seed` (per image, see the module docstring)."""
    k = _view_index(view)
    if k is None:
        if aug is not None:
            raise ConfigError("an augmentation was given for the eval view; augmented views are named 'aug<k>'")
        from ..data.transforms import eval_transform

        return eval_transform(pre), "eval"
    if not isinstance(aug, (AugSpec, type(None))):
        raise ConfigError(f"the transform of an augmented view must be an AugSpec (it is recorded in the cache "
                          f"key), got {type(aug).__name__}")
    aug = aug or DEFAULT_AUG
    return aug.build(pre), f"{aug.describe(pre)},seed={int(seed)}"


def sample_seed(seed: int, view: int, index: int) -> int:
    """Seed of image `index`'s augmentation in view `view` (a hash, so (view, index) pairs never collide)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}/{view}/{index}".encode(), digest_size=8).digest(), "little") >> 1


class SeededViewImages(torch.utils.data.Dataset):
    """Wraps a LabeledImages so that image i's transform draws from its own seed (seed, view, i) and leaves the
    caller's RNG untouched: the crops depend on nothing else (module-level class: workers can pickle it)."""

    def __init__(self, images: LabeledImages, seed: int, view: int) -> None:
        self.images, self.seed, self.view = images, int(seed), int(view)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int, int] | None:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(sample_seed(self.seed, self.view, index))
            return self.images[index]


@torch.no_grad()
def _batches(backbone: Backbone, loader: torch.utils.data.DataLoader, device: torch.device, precision: str,
             taps: dict[str, torch.dtype], desc: str) -> Iterator[dict[str, Tensor]]:
    was_training = backbone.training
    backbone.eval()
    try:
        for images, labels, idx in iter_batches(loader, desc):
            with autocast(device, precision):
                out = backbone.encode_image(images.to(device, non_blocking=True), taps=list(taps))
            tapped = {n: out.taps[n].to(dt) for n, dt in taps.items()}  # cast on the device: less to copy back
            yield {"proj": out.proj.float(), "pre_proj": out.pre_proj.float(), **tapped, "labels": labels,
                   "indices": idx}
    finally:
        backbone.train(was_training)


def split_features(
    backbone: Backbone,
    task: Task,
    split: str,
    *,
    view: str = "eval",
    taps: Sequence[str] = (),
    dtype: str | torch.dtype | None = None,
    transform: AugSpec | None = None,
    seed: int = AUG_SEED,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    precision: str = "fp32",
    num_workers: int = 0,
    on_bad_image: str = "error",
    cache: FeatureCache | str | None = None,
    content_check: str = "stat",
) -> FeatureSet:
    """Features of `task`'s `split` under `view` ("eval" or "aug<k>"), from the cache or extracted into it.

    The set holds proj and pre_proj (float32) and each tap in `taps` (names from `backbone.tap_names()`:
    ViT (N, tokens, d), ResNet (N, C, H, W)) stored as `dtype` (float32 default; float16/bfloat16 halve the
    disk). `transform` (an AugSpec) and `seed` choose the augmentation of "aug<k>" views. `content_check`: how
    the image files are known unchanged (`content_digest`: "stat" = size and mtime, "hash" = every file's bytes)."""
    device = torch.device(device)
    if bool(getattr(backbone, "hooks", None)):
        raise RuntimeError("a tuner is attached to the backbone: its features are not the frozen ones the cache keys")
    taps = list(dict.fromkeys(taps))
    known = backbone.tap_names()
    unknown = [t for t in taps if t not in known]
    if unknown:
        raise ConfigError(f"unknown tap(s) {unknown} for {getattr(backbone, 'name', 'this backbone')}; it offers: "
                          + (", ".join(known) or "(none)"))
    tap_dtype = storage_dtype(dtype)
    cache = cache if isinstance(cache, FeatureCache) else FeatureCache(cache)
    data_split = task.split(split)
    tf, desc = view_transform(backbone.preprocess, view, transform, seed)
    key = CacheKey(
        backbone=backbone_fingerprint(backbone),
        dataset=task.name,
        split=split,
        split_fingerprint=data_split.fingerprint(),
        content=content_digest(data_split.images, cache, task.name, rehash=content_check == "hash"),
        view=view,
        preprocess=backbone.preprocess.to_dict(),
        transform=desc,
        precision=precision,
        tensors={**BASE_TENSORS, **dict.fromkeys(taps, tap_dtype)},
    )
    from ..data.base import LabeledImages, collate_skip_none

    k = _view_index(view)
    images = LabeledImages(data_split, tf, on_bad_image=on_bad_image)
    dataset = images if k is None else SeededViewImages(images, seed, k)
    seen: list[Tensor] = []

    def build(build_key: CacheKey, rows: np.ndarray | None = None) -> Iterator[dict[str, Tensor]]:
        """Batches of features of every image (or of `rows`, positions in the split, under torchrun)."""
        seen.clear()
        wanted = {n: STORAGE_DTYPES[d] for n, d in build_key.tensors.items() if n not in BASE_TENSORS}
        source = dataset if rows is None else torch.utils.data.Subset(dataset, rows.tolist())
        # its own generator: creating the iterator draws a worker seed, which must not come from the global RNG a
        # training run uses (a cold and a warm cache would otherwise train differently)
        loader = torch.utils.data.DataLoader(source, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                             collate_fn=collate_skip_none, pin_memory=device.type == "cuda",
                                             generator=torch.Generator())
        for batch in _batches(backbone, loader, device, precision, wanted, f"features {task.name}/{split}/{view}"):
            seen.append(batch["indices"])
            yield batch

    def left_out(kept: set[int]) -> list[str]:  # from the rows themselves: workers' `bad` lists never come back
        return sorted(data_split.images.ident(i) for i in range(len(data_split)) if i not in kept)

    if distributed.world_size() > 1:
        return _sharded_get_or_build(cache, key, build, left_out, len(dataset), batch_size)
    return cache.get_or_build(key, build, skipped=lambda: left_out(set(torch.cat(seen).tolist()) if seen else set()))


def batch_block(n: int, batch_size: int, rank: int, world: int) -> np.ndarray:
    """The rows rank `rank` extracts under torchrun: a contiguous block of whole batches of the single-process
    order, so every batch the tower sees is the one a single process sees (bit-identical features)."""
    batches = np.array_split(np.arange(-(-n // batch_size)), world)[rank]
    if not len(batches):
        return np.zeros(0, dtype=np.int64)
    return np.arange(int(batches[0]) * batch_size, min(n, (int(batches[-1]) + 1) * batch_size))


def _sharded_get_or_build(cache: FeatureCache, key: CacheKey,
                          build: Callable[[CacheKey, np.ndarray], Iterator[dict[str, Tensor]]],
                          left_out: Callable[[set[int]], list[str]], n: int, batch_size: int) -> FeatureSet:
    """Extraction on every rank of a torchrun job: each extracts its `batch_block` into a shard file in the entry's
    folder, then rank 0 assembles the entry (atomically, manifest last, as a single process would) from the shards
    in rank order and removes them. A rank that dies leaves shard files, never an entry: the next build removes
    them with any other stray file of the folder."""
    rank, world = distributed.rank(), distributed.world_size()
    if distributed.broadcast_object(key.digest()) != key.digest():
        raise RuntimeError(f"rank {rank} computes another feature cache key than rank 0 for {key.dataset}/{key.split} "
                           "(different weights, data or options on each rank)")
    plan = (cache.build_key(key), uuid.uuid4().hex[:8]) if rank == 0 else None
    build_key, build_id = distributed.broadcast_object(plan)
    if build_key is not None:
        folder = cache.entry_dir(key)
        folder.mkdir(parents=True, exist_ok=True)
        parts = [{k: v.detach().cpu() for k, v in batch.items()}
                 for batch in build(build_key, batch_block(n, batch_size, rank, world))]
        shard = {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {}
        atomic_save_tensors(folder / f"shard-{build_id}-r{rank}.safetensors", shard)
        distributed.barrier()
        if rank == 0:
            shards = [folder / f"shard-{build_id}-r{r}.safetensors" for r in range(world)]

            kept: set[int] = set()

            def assemble(_: CacheKey) -> Iterator[dict[str, Tensor]]:
                for path in shards:
                    tensors = load_file(str(path))
                    if tensors:
                        kept.update(tensors["indices"].tolist())
                        yield tensors

            try:
                cache.get_or_build(build_key, assemble, skipped=lambda: left_out(kept))
            finally:
                for path in shards:
                    path.unlink(missing_ok=True)
        distributed.barrier()
    hit = cache.load(key)
    if hit is None:
        raise RuntimeError(f"feature cache entry {cache.entry_dir(key)} was not written by the sharded extraction")
    return hit


@dataclass
class FeatureViews:
    """K augmented views of one split, row-aligned: views[k] is the FeatureSet of "aug<k>", and every view
    holds the same images in the same order (labels/indices shared).

    A trainer that uses view e mod K at epoch e takes `fv[e % fv.k].get(name)`; one that draws a random view
    per sample takes `fv.gather(name, view_ids, rows)` (no K-fold copy); `fv.stack(name)` gives (K, N, ...)."""

    views: list[FeatureSet]

    def __post_init__(self) -> None:
        if not self.views:
            raise ValueError("FeatureViews needs at least one view")
        ref = self.views[0]
        for k, fs in enumerate(self.views[1:], 1):
            if not torch.equal(fs.indices, ref.indices):
                raise RuntimeError(f"augmented view {k} of the split covers other images than view 0 ({fs.path})")

    @property
    def k(self) -> int:
        return len(self.views)

    @property
    def labels(self) -> Tensor:
        return self.views[0].labels

    @property
    def indices(self) -> Tensor:
        return self.views[0].indices

    @property
    def skipped(self) -> list[str]:
        return self.views[0].skipped

    def __len__(self) -> int:
        return len(self.views[0])

    def __getitem__(self, k: int) -> FeatureSet:
        return self.views[k]

    def stack(self, name: str) -> Tensor:
        """(K, N, ...) — a copy of all K views (fine for proj; think twice for token taps)."""
        return torch.stack([fs.get(name) for fs in self.views])

    def gather(self, name: str, view: Tensor, rows: Tensor) -> Tensor:
        """(B, ...) rows `rows` of `name`, row b taken from view `view[b]`; reads only those rows."""
        view, rows = torch.as_tensor(view).long(), torch.as_tensor(rows).long()
        if view.shape != rows.shape or view.dim() != 1:
            raise ValueError(f"gather needs 1-D view ids and rows of one shape, got {tuple(view.shape)} and "
                             f"{tuple(rows.shape)}")
        first = self.views[0].get(name)
        out = first.new_empty((rows.numel(), *first.shape[1:]))
        for k in view.unique().tolist():
            sel = view == k
            out[sel] = self.views[k].get(name)[rows[sel]]
        return out


def split_views(backbone: Backbone, task: Task, split: str, k: int, **kwargs: Any) -> FeatureViews:
    """Views aug0..aug<k-1> of `split` (each a cache entry of its own, so asking for more views later reuses
    the first ones). Keyword arguments as `split_features` (taps, dtype, transform, seed, device, ...)."""
    if k < 1:
        raise ConfigError(f"number of augmented views must be >= 1, got {k}")
    if "view" in kwargs:
        raise TypeError("split_views chooses the views itself (aug0..aug<k-1>); do not pass view=")
    return FeatureViews([split_features(backbone, task, split, view=f"aug{i}", **kwargs) for i in range(k)])


_WARNED_TTE: weakref.WeakSet = weakref.WeakSet()  # methods already told that eval.tte does not apply


def _run_settings(method: Any, ctx: Any, split: str) -> dict[str, Any]:
    """The run's extraction settings (device, eval batch size/precision, workers, bad-image policy) and the
    method config's `feature_cache` folder, if any."""
    cfg: RunConfig = ctx.cfg
    if cfg.eval.tte != "none" and split != "train" and method not in _WARNED_TTE:
        log.warning("%s works from cached eval-view features: eval.tte=%s is not applied", cfg.method, cfg.eval.tte)
        _WARNED_TTE.add(method)
    return {"device": ctx.device, "batch_size": cfg.eval.batch_size, "precision": cfg.eval.precision,
            "num_workers": cfg.data.num_workers, "on_bad_image": cfg.data.on_bad_image,
            "content_check": cfg.data.content_check, "cache": feature_cache_of(method.cfg)}


def method_features(method: Any, ctx: Any, split: str, view: str = "eval", taps: Sequence[str] = (),
                    dtype: str | torch.dtype | None = None, transform: AugSpec | None = None,
                    seed: int = AUG_SEED) -> FeatureSet:
    """`split_features` of the method's backbone and the run's task, with the run's settings."""
    return split_features(method.backbone, ctx.task, split, view=view, taps=taps, dtype=dtype, transform=transform,
                          seed=seed, **_run_settings(method, ctx, split))


def method_views(method: Any, ctx: Any, split: str, k: int, taps: Sequence[str] = (),
                 dtype: str | torch.dtype | None = None, transform: AugSpec | None = None,
                 seed: int = AUG_SEED) -> FeatureViews:
    """`split_views` of the method's backbone and the run's task, with the run's settings."""
    return split_views(method.backbone, ctx.task, split, k, taps=taps, dtype=dtype, transform=transform, seed=seed,
                       **_run_settings(method, ctx, split))


def extract_from_config(cfg: RunConfig, splits: list[str], views: int = 0, taps: Sequence[str] = (),
                        dtype: str | torch.dtype | None = None) -> list[Path]:
    """`tailclip extract`: features of each split (eval view) plus `views` augmented views (default AugSpec)
    of the train split, with `taps` stored as `dtype`, for the model and dataset of `cfg`. Returns the cache
    entry folders."""
    from ..backbones import create_backbone
    from ..data.registry import build_task

    device = resolve_device(cfg.device)
    distributed.init_distributed(device)  # under torchrun every rank extracts its share (`_sharded_get_or_build`)
    torch.manual_seed(cfg.train.seed)  # as a run builds its backbone: random-weight models are the same on every rank
    backbone = create_backbone(cfg.model.name, cache_dir=cfg.model.cache_dir, device=device,
                               memory_format=cfg.model.memory_format)
    task = build_task(cfg.data)
    cache = FeatureCache(feature_cache_of(cfg.method_config()))
    missing = [s for s in splits if s not in task.splits]
    if missing:
        log.warning("dataset %s has no split(s) %s; skipped", task.name, ", ".join(missing))
    settings = {"taps": taps, "dtype": dtype, "device": device, "batch_size": cfg.eval.batch_size,
                "precision": cfg.eval.precision, "num_workers": cfg.data.num_workers,
                "on_bad_image": cfg.data.on_bad_image, "content_check": cfg.data.content_check, "cache": cache}
    sets = [split_features(backbone, task, s, **settings) for s in splits if s in task.splits]
    if views and "train" in task.splits:
        sets += split_views(backbone, task, "train", views, **settings).views
    return [fs.path for fs in sets if fs.path is not None]
