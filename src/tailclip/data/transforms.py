"""Image transforms built from the backbone's Preprocess, so every method sees what the weights expect.

Eval matches open_clip's own eval transform unless a method gives its own resize (LIFT: 256 -> 224); train is
RandomResizedCrop + flip (LIFT / Sage / LDC); test-time ensembling resizes (default round(S · 248/224); LIFT's
rule in `lift_tte_resize`) and stacks the five or ten crops. All transforms are module-level classes or
torchvision objects (no lambdas), so DataLoader workers can pickle them.
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
BATCH_MODES = ("bilinear", "bicubic", "nearest")  # interpolations TrainCrop.batch resamples with F.interpolate


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


def eval_transform(pre: Preprocess, resize: int | None = None, interpolation: str | None = None) -> T.Compose:
    """Resize + center crop + tensor + normalize.

    Default: open_clip's own eval transform (resize to S by pre.resize_mode: shortest side, squash or longest).
    `resize`: shortest side to `resize` px, then CenterCrop(S) (LIFT's 256 -> 224, see `lift_eval_resize`).
    `interpolation` overrides the backbone's."""
    size, interp = pre.image_size, interpolation_mode(interpolation or pre.interpolation)
    if resize is not None:
        steps = [T.Resize(resize, interpolation=interp), T.CenterCrop(size)]
    elif pre.resize_mode == "squash":
        steps = [T.Resize((size, size), interpolation=interp)]
    elif pre.resize_mode == "longest":
        from open_clip.transform import CenterCropOrPad, ResizeKeepRatio

        steps = [ResizeKeepRatio(size, interpolation=interp, longest=1), CenterCropOrPad(size, fill=0)]
    elif pre.resize_mode == "shortest":
        steps = [T.Resize(size, interpolation=interp), T.CenterCrop(size)]
    else:
        raise ConfigError(f"resize_mode {pre.resize_mode!r} is not accepted; choose one of: shortest, longest, squash")
    return T.Compose(steps + _to_tensor(pre))


class TrainCrop(T.Compose):
    """RandomResizedCrop(S, scale, ratio) (+ horizontal flip) + tensor + normalize, per PIL image (a T.Compose) or,
    through `batch`, on a whole uint8 batch of equal-sized images as tensors (array-backed sources such as the
    synthetic world: no PIL round trip per image).

    Both paths draw each image's crop box and flip from the global CPU RNG in the same order (RandomResizedCrop's
    `get_params`, then the flip's `torch.rand(1)`), so under the same per-image seed they cut the same box; the
    batch path resamples in float (bilinear / bicubic / nearest via `F.interpolate`, no uint8 rounding), so pixels
    agree with PIL's to within rounding."""

    def __init__(self, pre: Preprocess, scale: tuple[float, float], ratio: tuple[float, float], interpolation: str,
                 flip: bool) -> None:
        interp = interpolation_mode(interpolation)
        steps: list = [T.RandomResizedCrop(pre.image_size, scale=scale, ratio=ratio, interpolation=interp)]
        if flip:
            steps.append(T.RandomHorizontalFlip())
        super().__init__(steps + _to_tensor(pre))
        self.size, self.scale, self.ratio = pre.image_size, scale, ratio
        self.interpolation, self.flip = interpolation, flip
        self.mean = torch.tensor(pre.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(pre.std, dtype=torch.float32).view(1, 3, 1, 1)

    def uint8(self, img: Image.Image) -> torch.Tensor:
        """The crop as uint8 (3, S, S), stopping before ToTensor's float conversion: loader workers send a quarter
        of the bytes and `normalize` finishes the batch where it goes (on the GPU, after a pinned copy)."""
        for step in self.transforms[:-2]:  # the crop, the flip, ToRGB
            img = step(img)
        return T.functional.pil_to_tensor(img)

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, S, S) from `uint8` -> the float batch ToTensor + Normalize make (the same operations)."""
        return (batch.float() / 255.0 - self.mean.to(batch.device)) / self.std.to(batch.device)

    @property
    def batchable(self) -> bool:
        return self.interpolation in BATCH_MODES

    def batch(self, images: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> normalized float32 (B, 3, S, S); image b's randomness comes from seeds[b]."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"TrainCrop.batch takes uint8 (B, H, W, 3) images, got {images.dtype} "
                             f"{tuple(images.shape)}")
        return self.crops(list(images.permute(0, 3, 1, 2)), seeds)

    def crops(self, images: list[torch.Tensor], seeds: list[int]) -> torch.Tensor:
        """uint8 (3, H_b, W_b) images of any sizes, on any one device -> normalized float32 (B, 3, S, S) there.

        Downscaling is antialiased like PIL's resampling (F.interpolate's antialias, bilinear and bicubic);
        upscaling is plain interpolation, as in PIL."""
        import torch.nn.functional as F

        if len(seeds) != len(images):
            raise ValueError(f"{len(images)} images but {len(seeds)} seeds")
        if not self.batchable:
            raise ConfigError(f"interpolation {self.interpolation!r} has no tensor-batch path; use one of: "
                              f"{', '.join(BATCH_MODES)}")
        if not images:
            raise ValueError("TrainCrop.crops got no images")
        device, mode = images[0].device, self.interpolation
        out = torch.empty(len(images), 3, self.size, self.size, device=device)
        for b, (image, seed) in enumerate(zip(images, seeds, strict=True)):
            if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
                raise ValueError(f"TrainCrop.crops takes uint8 (3, H, W) images, got {image.dtype} "
                                 f"{tuple(image.shape)}")
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(int(seed))
                top, left, h, w = T.RandomResizedCrop.get_params(image, list(self.scale), list(self.ratio))
                flip = self.flip and bool(torch.rand(1) < 0.5)
            crop = image[None, :, top : top + h, left : left + w].float()
            if (h, w) != (self.size, self.size):
                down = h > self.size or w > self.size
                options = {} if mode == "nearest" else {"align_corners": False, "antialias": down}
                crop = F.interpolate(crop, size=(self.size, self.size), mode=mode, **options)
            out[b] = crop[0].flip(-1) if flip else crop[0]
        if self.interpolation == "bicubic":
            out.clamp_(0.0, 255.0)  # bicubic overshoots; PIL clips to uint8
        return (out / 255.0 - self.mean.to(device)) / self.std.to(device)


def train_transform(
    pre: Preprocess,
    scale: tuple[float, float] = (0.08, 1.0),
    interpolation: str | None = None,
    flip: bool = True,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> TrainCrop:
    """RandomResizedCrop(S, scale, ratio) (+ horizontal flip) + tensor + normalize; interpolation defaults to
    pre's. ratio=(1, 1) gives square crops (LIFT+'s schedule)."""
    return TrainCrop(pre, scale, ratio, interpolation or pre.interpolation, flip)


class StackCrops:
    """Apply a per-crop transform to each crop of a FiveCrop / TenCrop and stack: (n_crops, 3, S, S)."""

    def __init__(self, per_crop: T.Compose) -> None:
        self.per_crop = per_crop

    def __call__(self, crops: tuple[Image.Image, ...]) -> torch.Tensor:
        return torch.stack([self.per_crop(c) for c in crops])


def tte_resize(image_size: int) -> int:
    """Default resize target of test-time crop ensembling: 248 for 224, scaled for other sizes."""
    return round(image_size * 248 / 224)


def lift_eval_resize(image_size: int) -> int:
    """LIFT's resize before the center crop without TTE: `resolution * 8 // 7` in its trainer (256 for 224).
    The rule scales with the model's image size, so every model keeps LIFT's 7/8 center crop (36 -> 32 for the
    32 px built-in tiny CLIP)."""
    return image_size * 8 // 7


def lift_tte_resize(image_size: int, patch_size: int | None) -> int:
    """LIFT's five-crop resize: resolution + expand, where its model configs set expand = 24 for ViT-B/16 (and
    the /16 IN21K ViTs, any resolution) and 21 for ViT-L/14 (224 and 336 px): 1.5 patches, 3p // 2. Towers
    without patches (ResNets: 24 at 224 in LIFT) scale 24 with the image size."""
    expand = 3 * patch_size // 2 if patch_size else round(image_size * 24 / 224)
    return image_size + expand


def tte_transform(
    pre: Preprocess, mode: str, resize: int | None = None, interpolation: str | None = None
) -> T.Compose:
    """Resize the shortest side (to `resize`, default `tte_resize(S)`), then FiveCrop / TenCrop -> tensor
    (n_crops, 3, S, S). `interpolation` overrides the backbone's."""
    if mode not in TTE_MODES:
        raise ConfigError(f"eval.tte={mode!r} is not accepted; choose one of: {', '.join(TTE_MODES)}")
    size, interp = pre.image_size, interpolation_mode(interpolation or pre.interpolation)
    crop = T.FiveCrop(size) if mode == "five_crop" else T.TenCrop(size)
    resize = tte_resize(size) if resize is None else resize
    return T.Compose([T.Resize(resize, interpolation=interp), crop, StackCrops(T.Compose(_to_tensor(pre)))])


def lift_test_transform(pre: Preprocess, patch_size: int | None, tte: str, interpolation: str) -> T.Compose:
    """LIFT's test transforms (LIFT and Sage): Resize(S * 8 // 7) -> CenterCrop(S) without TTE; with TTE
    Resize(S + 3p/2) -> five (ten) crops. Both rules scale with the model's image size (tiny 32 px CLIP: 36 -> 32)."""
    if tte == "none":
        return eval_transform(pre, lift_eval_resize(pre.image_size), interpolation)
    return tte_transform(pre, tte, lift_tte_resize(pre.image_size, patch_size), interpolation)


def lift_train_transform(pre: Preprocess, min_scale: float, interpolation: str, flip: bool,
                         progress: float | None = None) -> TrainCrop:
    """LIFT's training crops (LIFT and Sage): RandomResizedCrop(scale min_scale..1) + flip. With `progress` (0 at the
    first epoch, 1 at the last) LIFT+'s square crops, whose minimum scale grows linearly from min_scale to 1."""
    if progress is None:
        return train_transform(pre, (min_scale, 1.0), interpolation, flip)
    low = min_scale + (1.0 - min_scale) * progress
    return train_transform(pre, (low, 1.0), interpolation, flip, ratio=(1.0, 1.0))
