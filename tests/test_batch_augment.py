"""Tensor-batch augmentation (TrainCrop.batch): documented shapes and ranges, the same crop boxes and flips as the
per-image PIL path under the same seeds, and the trainer's fast path yielding what the PIL path yields."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tailclip.backbones.base import Preprocess
from tailclip.data.transforms import TrainCrop, train_transform
from tailclip.errors import ConfigError
from tailclip.synthetic import generator as G

PRE = Preprocess(image_size=32, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), interpolation="bilinear",
                 resize_mode="shortest")


def _images(n: int = 6) -> np.ndarray:
    return G.render_images(0, 1, list(range(n)), list(range(n)), "downstream")


def test_batch_shapes_and_ranges() -> None:
    tf = train_transform(PRE, (0.5, 1.0))
    assert isinstance(tf, TrainCrop) and tf.batchable
    out = tf.batch(torch.from_numpy(_images()), list(range(6)))
    assert out.shape == (6, 3, 32, 32) and out.dtype == torch.float32
    lo = (0 - tf.mean) / tf.std
    hi = (1 - tf.mean) / tf.std
    assert bool((out >= lo - 1e-5).all()) and bool((out <= hi + 1e-5).all())  # normalized [0, 1] pixels
    assert torch.equal(out, tf.batch(torch.from_numpy(_images()), list(range(6))))  # seeded: reproducible
    assert not torch.equal(out, tf.batch(torch.from_numpy(_images()), list(range(1, 7))))
    with pytest.raises(ValueError, match="uint8"):
        tf.batch(torch.zeros(2, 32, 32, 3), [0, 1])
    with pytest.raises(ValueError, match="seeds"):
        tf.batch(torch.from_numpy(_images(2)), [0])


def test_full_crop_is_exact_and_other_modes_refused() -> None:
    tf = train_transform(PRE, (1.0, 1.0), ratio=(1.0, 1.0), flip=False)  # the crop is the whole image
    imgs = _images(3)
    out = tf.batch(torch.from_numpy(imgs), [0, 1, 2])
    expected = (torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255 - tf.mean) / tf.std
    assert torch.allclose(out, expected, atol=1e-6)
    lanczos = train_transform(PRE, interpolation="lanczos")
    assert not lanczos.batchable
    with pytest.raises(ConfigError, match="lanczos"):
        lanczos.batch(torch.from_numpy(imgs), [0, 1, 2])


def test_batch_matches_the_pil_path_under_the_same_seeds() -> None:
    tf = train_transform(PRE, (0.5, 1.0))
    imgs = _images(8)
    seeds = [11, 12, 13, 14, 15, 16, 17, 18]
    batch = tf.batch(torch.from_numpy(imgs), seeds)
    for b, seed in enumerate(seeds):
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            one = tf(Image.fromarray(imgs[b]))
        # same box and flip; PIL rounds the resampled pixels to uint8, the batch path does not
        assert (one - batch[b]).abs().max().item() * float(tf.std.min()) <= 1.0 / 255 + 1e-6


def test_trainer_fast_path_yields_the_pil_path_batches(tmp_path) -> None:
    from tailclip.config import load_config
    from tailclip.contract import FitContext
    from tailclip.data.base import Split, SubsetImages
    from tailclip.engine.image_batches import ImageBatches
    from tailclip.engine.trainer import epoch_order, plan_epoch
    from tailclip.methods.loading import build

    cfg = load_config(None, ["method=lift", "model.name=synthetic:tiny-clip", "data.name=synth-fewshot",
                             "data.shots=1", "lift.crop_min_scale=0.5", "train.batch_size=32"])
    task, method = build(cfg, torch.device("cpu"))
    ctx = FitContext(cfg, task.guarded(), tmp_path, torch.device("cpu"))
    fast = ImageBatches(method, ctx, cfg.train)
    slow = ImageBatches(method, ctx, cfg.train)
    train = fast.split
    slow.split = Split(SubsetImages(train.images, range(len(train))), train.labels)  # no load_array: PIL path
    plan = plan_epoch(epoch_order(len(train), cfg.train.seed, 3), 32, 1, 0, 1)
    for (xf, yf), (xs, ys) in zip(fast.epoch(3, plan), slow.epoch(3, plan), strict=True):
        assert torch.equal(yf, ys) and xf.shape == xs.shape == (len(yf), 3, 32, 32)
        assert (xf - xs).abs().max().item() < 0.02  # same crops; PIL's uint8 rounding only


def test_uint8_crop_then_batch_normalize_equals_the_float_transform() -> None:
    rng = np.random.default_rng(2)
    tf = train_transform(PRE, (0.3, 1.0))
    images = [Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)) for _ in range(4)]
    outs, crops = [], []
    for seed, img in enumerate(images):
        for store, fn in ((outs, tf), (crops, tf.uint8)):
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(seed)
                store.append(fn(img))
    assert crops[0].dtype == torch.uint8 and crops[0].shape == (3, 32, 32)
    assert torch.equal(tf.normalize(torch.stack(crops)), torch.stack(outs))  # bit for bit: the same operations

