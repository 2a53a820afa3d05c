"""Transforms built from a Preprocess: eval matches open_clip's, train and test-time crops have the right shapes."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from open_clip.transform import image_transform
from PIL import Image

from tailclip.backbones.base import Preprocess
from tailclip.data import eval_transform, train_transform, tte_transform
from tailclip.data.transforms import tte_resize
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
