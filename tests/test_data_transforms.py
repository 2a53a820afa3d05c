"""Transforms built from a Preprocess: eval matches open_clip's, train and test-time crops have the right shapes."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from open_clip.transform import image_transform
from PIL import Image
from torchvision import transforms as T

from tailclip.backbones.base import Preprocess
from tailclip.data import eval_transform, train_transform, tte_transform
from tailclip.data.transforms import lift_eval_resize, lift_tte_resize, tte_resize
from tailclip.errors import ConfigError

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture()
def image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (45, 70, 3), dtype=np.uint8))


@pytest.mark.parametrize("mode", ["shortest", "squash", "longest"])
@pytest.mark.parametrize("interp", ["bicubic", "bilinear"])
def test_eval_matches_open_clip(image: Image.Image, mode: str, interp: str) -> None:
    pre = Preprocess(32, MEAN, STD, interpolation=interp, resize_mode=mode)
    ours = eval_transform(pre)(image)
    ref = image_transform(32, is_train=False, mean=MEAN, std=STD, resize_mode=mode, interpolation=interp)(image)
    assert ours.shape == (3, 32, 32) and torch.equal(ours, ref)


def test_train_and_tte_shapes(image: Image.Image) -> None:
    pre = Preprocess(32, MEAN, STD)
    torch.manual_seed(0)
    assert train_transform(pre)(image).shape == (3, 32, 32)
    assert train_transform(pre, scale=(0.8, 1.0), interpolation="bilinear", flip=False)(image.convert("L")).shape == (
        3, 32, 32,
    )  # fmt: skip
    five = tte_transform(pre, "five_crop")
    assert five(image).shape == (5, 3, 32, 32) and tte_transform(pre, "ten_crop")(image).shape == (10, 3, 32, 32)
    assert tte_resize(224) == 248
    pickle.dumps(five)  # DataLoader workers need picklable transforms
    with pytest.raises(ConfigError, match="five_crop"):
        tte_transform(pre, "three_crop")
    with pytest.raises(ConfigError, match="bicubic"):
        eval_transform(Preprocess(32, MEAN, STD, interpolation="cubic"))


def test_lift_resize_rules() -> None:
    # without TTE: LIFT's `resolution * 8 // 7`; five-crop: resolution + 3p/2 (LIFT's expand 24 for /16, 21 for /14)
    assert [lift_eval_resize(s) for s in (224, 336, 32)] == [256, 384, 36]
    assert lift_tte_resize(224, 16) == 248 and lift_tte_resize(224, 14) == 245 and lift_tte_resize(336, 14) == 357
    assert lift_tte_resize(384, 16) == 408 and lift_tte_resize(224, None) == 248 and lift_tte_resize(32, 8) == 44


def test_explicit_resize_and_interpolation(image: Image.Image) -> None:
    pre = Preprocess(32, MEAN, STD)  # bicubic by default
    ours = eval_transform(pre, resize=36, interpolation="bilinear")(image)
    # torchvision's default interpolation
    ref = T.Compose([T.Resize(36), T.CenterCrop(32), T.ToTensor(), T.Normalize(MEAN, STD)])(image)
    assert torch.equal(ours, ref)
    five = tte_transform(pre, "five_crop", resize=44, interpolation="bilinear")(image)
    crops = T.FiveCrop(32)(T.Resize(44)(image))
    assert torch.equal(five, torch.stack([T.Normalize(MEAN, STD)(T.ToTensor()(c)) for c in crops]))
    assert not torch.equal(eval_transform(pre, resize=36)(image), ours)  # interpolation does reach the resize
    square = train_transform(pre, scale=(0.5, 1.0), ratio=(1.0, 1.0), flip=False).transforms
    assert square[0].ratio == (1.0, 1.0) and not any(isinstance(t, T.RandomHorizontalFlip) for t in square)
