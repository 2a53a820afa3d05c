"""data.decode=gpu: training images decoded on the GPU instead of by PIL in the loader workers.

Full-size JPEG decoding is what starves a GPU on ImageNet-scale data (a published LIFT run on iNaturalist 2018
spent 31.7 h of wall time on 6.3 h of compute). Under data.decode=gpu the workers only read the encoded bytes;
the training process decodes whole batches with `torchvision.io.decode_jpeg(..., device="cuda")` (nvJPEG) and
cuts the RandomResizedCrop boxes on the GPU (`TrainCrop.crops`), each image's box and flip drawn from the same
per-image seed as the PIL path, so only the decoder's and the resampler's rounding differ.

Files that are not JPEG (PNG, WebP, ...) decode with torchvision on the CPU, then PIL for anything else; an image
no decoder reads is unreadable exactly as on the PIL path (data.on_bad_image: error names it, skip leaves it out).
torchvision 0.29 marks its decoders deprecated in favour of TorchCodec; they are what runs on nvJPEG today, so
the warning is silenced here and this module is the one place to switch.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..errors import CorruptImageError, DataError
from .base import Split, SubsetImages

log = logging.getLogger(__name__)

JPEG_MAGIC = b"\xff\xd8"


def reads_files(images: Any) -> bool:
    """Whether an image source (through any SubsetImages views) is backed by files it can hand out encoded."""
    while isinstance(images, SubsetImages):
        images = images.base
    return hasattr(images, "read_bytes")


class EncodedItems(torch.utils.data.Dataset):
    """Keys (epoch, index) -> (encoded bytes as a uint8 tensor, label, index); None for an unreadable file under
    on_bad_image=skip. The epoch is ignored: nothing random happens before decoding."""

    def __init__(self, split: Split, on_bad_image: str = "error") -> None:
        if not reads_files(split.images):
            raise DataError(f"data.decode=gpu reads image files; {type(split.images).__name__} holds no files")
        self.split = split
        self.on_bad_image = on_bad_image

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, int, int] | None:
        index = key[1]
        try:
            data = self.split.images.read_bytes(index)
        except DataError as exc:
            if self.on_bad_image == "skip":
                log.warning("skipping unreadable image %s: %s", self.split.images.ident(index), exc)
                return None
            raise
        return torch.frombuffer(bytearray(data), dtype=torch.uint8), int(self.split.labels[index]), index


def collate_encoded(batch: list[Any]) -> tuple[list[Tensor], Tensor, Tensor] | None:
    """Encoded images stay a list (their lengths differ); labels and indices become tensors."""
    kept = [b for b in batch if b is not None]
    if not kept:
        return None
    return [b[0] for b in kept], torch.tensor([b[1] for b in kept]), torch.tensor([b[2] for b in kept])


@contextlib.contextmanager
def _quiet_deprecation() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def _decode_one(data: Tensor, device: torch.device) -> Tensor:
    """One image as RGB uint8 (3, H, W) on `device`: nvJPEG / libjpeg for JPEG, torchvision's other decoders, then
    PIL; raises the last decoder's error when none can read it."""
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    with _quiet_deprecation():
        if bytes(data[:2].tolist()) == JPEG_MAGIC:
            try:
                return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
            except (RuntimeError, ValueError):
                pass  # e.g. CMYK or progressive variants nvJPEG rejects: the CPU decoders below
        try:
            return decode_image(data, mode=ImageReadMode.RGB).to(device)
        except (RuntimeError, ValueError):
            pass  # a format torchvision does not decode (BMP, TIFF, ...): PIL below
    with Image.open(io.BytesIO(data.numpy().tobytes())) as img:
        rgb = np.array(img.convert("RGB"))  # a writable copy for torch.from_numpy
        return torch.from_numpy(rgb).permute(2, 0, 1).contiguous().to(device)


def decode_batch(datas: Sequence[Tensor], idents: Sequence[str], device: torch.device,
                 on_bad_image: str = "error") -> tuple[list[Tensor], list[int]]:
    """Decode encoded images to RGB uint8 (3, H, W) tensors on `device`; returns (images, positions decoded).

    The JPEGs go to one batched `decode_jpeg` call; if that fails, each image is decoded alone so the broken file is
    the one named (on_bad_image=error) or left out (skip)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    out: dict[int, Tensor] = {}
    jpegs = [i for i, d in enumerate(datas) if bytes(d[:2].tolist()) == JPEG_MAGIC]
    if jpegs:
        try:
            with _quiet_deprecation():
                decoded = decode_jpeg([datas[i] for i in jpegs], mode=ImageReadMode.RGB, device=device)
            out.update(zip(jpegs, decoded, strict=True))
        except RuntimeError:
            pass  # one bad file fails the batch: decode one by one below
    for i, data in enumerate(datas):
        if i in out:
            continue
        try:
            out[i] = _decode_one(data, device)
        except Exception as exc:  # noqa: BLE001  (decoders raise many types for broken files)
            if on_bad_image != "skip":
                raise CorruptImageError(idents[i], type(exc).__name__ + ": " + str(exc)) from None
            log.warning("skipping unreadable image %s: %s", idents[i], exc)
    kept = sorted(out)
    return [out[i] for i in kept], kept
