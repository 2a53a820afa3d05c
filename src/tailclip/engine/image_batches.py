"""Augmented training crops for methods that train from images: the trainer asks for an epoch's micro-batches.

Three paths cut the same crops (each image's RandomResizedCrop box and flip drawn from the seed (seed, epoch,
index), so no path depends on workers, ranks or RNG state):
- array-backed images with `load_array` (the synthetic world): whole uint8 batches cropped as tensors here;
- image files, data.decode=cpu (default): PIL decode + crop in DataLoader workers, which send uint8 crops (a
  quarter of the bytes of float32); the batch is normalised where it trains, after a pinned copy on CUDA;
- image files, data.decode=gpu: workers read the encoded bytes, the GPU decodes and crops (data/decode.py).

The DataLoader is built once per run with persistent workers (data.num_workers > 0): an epoch only hands its
batch list to the sampler, so worker processes, their imports and open files survive across epochs. The epoch's
transform travels with its keys (pickled once per batch), which is how LIFT+'s per-epoch crop schedule reaches
workers that were started before the epoch began.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..contract import FitContext, Inputs, Method
from ..data.base import LabeledImages, collate_skip_none
from ..data.decode import EncodedItems, collate_encoded, decode_batch, reads_files
from ..data.transforms import TrainCrop, train_transform
from ..errors import ConfigError

if TYPE_CHECKING:
    from ..config import TrainConfig
    from .trainer import StepPlan


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Seed of one image's augmentation in one epoch (a simple injective-enough mix, < 2**63)."""
    return ((int(seed) * 1_000_003 + int(epoch)) * 10_000_019 + int(index)) % (2**63 - 1)


def make_train_transform(method: Method, epoch: int) -> Callable:
    """The method's own train transform for this epoch (LIFT+ crop schedules), else RandomResizedCrop + flip
    from the backbone's preprocessing."""
    own = method.train_transform(epoch)
    if own is not None:
        return own
    return train_transform(method.backbone.preprocess)


class SeededItems(torch.utils.data.Dataset):
    """LabeledImages items keyed by (epoch, index, transform), the random transform run under a private seed.

    fork_rng restores the caller's RNG afterwards, so augmentation never perturbs the training RNG stream. Only the
    CPU generator is seeded (what transforms draw from): `torch.manual_seed` would also queue lazy CUDA/XPU/MTIA
    seeding, each recording a stack trace, which cost more than the tiny model's step (benchmarks/README.md)."""

    def __init__(self, items: LabeledImages, seed: int) -> None:
        self.items = items
        self.seed = seed

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int, Callable]) -> Any:
        epoch, index, transform = key
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(sample_seed(self.seed, epoch, index))
            return self.items.item(index, transform)


class EpochBatches:
    """A batch sampler whose batches are replaced every epoch, so one DataLoader (and its persistent workers)
    serves the whole run."""

    def __init__(self) -> None:
        self.batches: list[list[tuple]] = []

    def __iter__(self) -> Iterator[list[tuple]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class ImageBatches:
    """An epoch's micro-batches of augmented crops of the train split, as (images, labels) or None where every
    image of a micro-batch was a skipped bad file. `crop_device`: where data.decode=gpu decodes and crops (the run's
    CUDA device; tests pass the CPU to run the same code)."""

    def __init__(self, method: Method, ctx: FitContext, cfg: TrainConfig,
                 crop_device: torch.device | None = None) -> None:
        self.method, self.ctx, self.cfg = method, ctx, cfg
        self.split = ctx.task.split("train")
        self.skipped: set[str] = set()  # images left out (data.on_bad_image=skip), by identity
        if crop_device is None and ctx.cfg.data.decode == "gpu":
            if ctx.device.type != "cuda":
                raise ConfigError(f"data.decode=gpu decodes with nvJPEG and needs a CUDA device; this run is on "
                                  f"{ctx.device}: use data.decode=cpu")
            crop_device = ctx.device
        self.crop_device = crop_device
        self.sampler = EpochBatches()
        self._loader: torch.utils.data.DataLoader | None = None

    def __len__(self) -> int:
        return len(self.split)

    def close(self) -> None:
        """Stop the persistent workers (they also stop when this object is garbage-collected)."""
        self._loader = None

    def _batch_transform(self, transform: Callable) -> TrainCrop | None:
        """The transform if this epoch crops tensors (array-backed images, or data.decode=gpu), else None."""
        tensor_path = self.crop_device is not None or hasattr(self.split.images, "load_array")
        if isinstance(transform, TrainCrop) and transform.batchable and tensor_path:
            return transform
        if self.crop_device is not None:
            raise ConfigError(f"data.decode=gpu crops with RandomResizedCrop on tensors; this method's train "
                              f"transform ({type(transform).__name__}, interpolation "
                              f"{getattr(transform, 'interpolation', '?')}) has no tensor path: use data.decode=cpu")
        return None

    def _seeds(self, epoch: int, indices: Any) -> list[int]:
        return [sample_seed(self.cfg.seed, epoch, int(i)) for i in indices]

    def epoch(self, epoch: int, steps: list[StepPlan]) -> Iterator[tuple[Inputs, Tensor] | None]:
        transform = make_train_transform(self.method, epoch)
        crop = self._batch_transform(transform)
        micro = [mb for st in steps for mb in st.micro]
        if crop is not None and hasattr(self.split.images, "load_array"):
            labels = torch.as_tensor(self.split.labels)
            for mb in micro:
                images = torch.from_numpy(self.split.images.load_array(mb.indices))
                if self.crop_device is not None:
                    images = images.to(self.crop_device, non_blocking=True)
                yield crop.batch(images, self._seeds(epoch, mb.indices)), labels[torch.as_tensor(mb.indices)]
            return
        gpu = self.crop_device is not None
        pil = transform.uint8 if isinstance(transform, TrainCrop) else transform  # uint8 crops: see TrainCrop.uint8
        self.sampler.batches = [[(epoch, int(i), None if gpu else pil) for i in mb.indices] for mb in micro]
        loader = self._get_loader(gpu)
        images = self.split.images
        for asked, batch in zip(self.sampler.batches, loader, strict=True):  # the loader keeps the sampler's order
            if batch is not None and gpu:
                datas, labels, indices = batch
                decoded, kept = decode_batch(datas, [images.ident(int(i)) for i in indices], self.crop_device,
                                             self.ctx.cfg.data.on_bad_image)
                indices = indices[kept]
                batch = (crop.crops(decoded, self._seeds(epoch, indices)), labels[kept], indices) if kept else None
            elif batch is not None and isinstance(transform, TrainCrop):
                batch = (transform.normalize(batch[0].to(self.ctx.device, non_blocking=True)), *batch[1:])
            got = set() if batch is None else {int(i) for i in batch[2]}
            self.skipped.update(images.ident(i) for _, i, _ in asked if i not in got)
            yield None if batch is None else (batch[0], batch[1])

    def _get_loader(self, encoded: bool) -> torch.utils.data.DataLoader:
        """The run's one DataLoader: built at the first epoch, its workers kept for the next ones."""
        if self._loader is None:
            data = self.ctx.cfg.data
            if encoded:
                if not reads_files(self.split.images):
                    raise ConfigError(f"data.decode=gpu decodes image files; the train split of {self.ctx.task.name} "
                                      f"is not stored as files: use data.decode=cpu")
                items: torch.utils.data.Dataset = EncodedItems(self.split, data.on_bad_image)
            else:  # each key brings its epoch's transform; the one given here is never applied
                items = SeededItems(LabeledImages(self.split, train_transform(self.method.backbone.preprocess),
                                                  data.on_bad_image), self.cfg.seed)
            self._loader = torch.utils.data.DataLoader(
                items, batch_sampler=self.sampler, num_workers=data.num_workers,
                persistent_workers=data.num_workers > 0,
                collate_fn=collate_encoded if encoded else collate_skip_none,
                pin_memory=self.ctx.device.type == "cuda" and not encoded,
                generator=torch.Generator(),  # own generator: creating the iterator draws nothing from the global RNG
            )
        return self._loader
