"""Image transforms built from the backbone's Preprocess, so every method sees what the weights expect.

Eval matches open_clip's own eval transform; train is RandomResizedCrop + flip (LIFT / Sage / LDC);
test-time ensembling (LIFT's five-crop) resizes to round(S · 248/224) and stacks the crops. All transforms
are module-level classes or torchvision objects (no lambdas), so DataLoader workers can pickle them.
"""

from __future__ import annotations

import logging

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from ..backbones.base import Preprocess
from ..errors import ConfigError

log = logging.getLogger(__name__)

INTERPOLATIONS = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "nearest": InterpolationMode.NEAREST,
    "lanczos": InterpolationMode.LANCZOS,
}
TTE_MODES = ("five_crop", "ten_crop")


def interpolation_mode(name: str) -> InterpolationMode:
    if name not in INTERPOLATIONS:
        raise ConfigError(f"interpolation {name!r} is not accepted; choose one of: {', '.join(INTERPOLATIONS)}")
    return INTERPOLATIONS[name]


class ToRGB:
    """Convert any PIL mode (L, RGBA, P, CMYK) to RGB; sources already return RGB, custom ones may not."""

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == "RGB" else img.convert("RGB")


def _to_tensor(pre: Preprocess) -> list:
    return [ToRGB(), T.ToTensor(), T.Normalize(mean=pre.mean, std=pre.std)]


def eval_transform(pre: Preprocess) -> T.Compose:
    """Resize (shortest side, or squash / longest per pre.resize_mode) + center crop + tensor + normalize."""
    size, interp = pre.image_size, interpolation_mode(pre.interpolation)
    if pre.resize_mode == "squash":
        resize = [T.Resize((size, size), interpolation=interp)]
    elif pre.resize_mode == "longest":
        from open_clip.transform import CenterCropOrPad, ResizeKeepRatio

        resize = [ResizeKeepRatio(size, interpolation=interp, longest=1), CenterCropOrPad(size, fill=0)]
    elif pre.resize_mode == "shortest":
        resize = [T.Resize(size, interpolation=interp), T.CenterCrop(size)]
    else:
        raise ConfigError(f"resize_mode {pre.resize_mode!r} is not accepted; choose one of: shortest, longest, squash")
    return T.Compose(resize + _to_tensor(pre))


def train_transform(
    pre: Preprocess, scale: tuple[float, float] = (0.08, 1.0), interpolation: str | None = None, flip: bool = True
) -> T.Compose:
    """RandomResizedCrop(S, scale) (+ horizontal flip) + tensor + normalize; interpolation defaults to pre's."""
    interp = interpolation_mode(interpolation or pre.interpolation)
    steps: list = [T.RandomResizedCrop(pre.image_size, scale=scale, interpolation=interp)]
    if flip:
        steps.append(T.RandomHorizontalFlip())
    return T.Compose(steps + _to_tensor(pre))


class StackCrops:
    """Apply a per-crop transform to each crop of a FiveCrop / TenCrop and stack: (n_crops, 3, S, S)."""

    def __init__(self, per_crop: T.Compose) -> None:
        self.per_crop = per_crop

    def __call__(self, crops: tuple[Image.Image, ...]) -> torch.Tensor:
        return torch.stack([self.per_crop(c) for c in crops])


def tte_resize(image_size: int) -> int:
    """Resize target of test-time crop ensembling: 248 for 224 (LIFT), scaled for other sizes."""
    return round(image_size * 248 / 224)


def tte_transform(pre: Preprocess, mode: str) -> T.Compose:
    """Resize the shortest side to round(S·248/224), then FiveCrop / TenCrop → tensor (n_crops, 3, S, S)."""
    if mode not in TTE_MODES:
        raise ConfigError(f"eval.tte={mode!r} is not accepted; choose one of: {', '.join(TTE_MODES)}")
    size, interp = pre.image_size, interpolation_mode(pre.interpolation)
    crop = T.FiveCrop(size) if mode == "five_crop" else T.TenCrop(size)
    return T.Compose([T.Resize(tte_resize(size), interpolation=interp), crop, StackCrops(T.Compose(_to_tensor(pre)))])
