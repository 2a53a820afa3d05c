"""LIFT: every registered tuner (LIFT's table rows) builds and trains a step, the trainable set is exactly tuner +
head, the flat config maps onto the tuners' typed options, LIFT's image transforms, presets load, and the LIFT+
switches change the train transform as documented."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_task
from PIL import Image
from torchvision import transforms as T

from tailclip.config import load_config
from tailclip.errors import ConfigError
from tailclip.methods import get_method
from tailclip.tuners import TUNERS, AdaptFormerOptions, LoRAOptions, NoOptions, VPTOptions, auto_bottleneck

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "lift").glob("*.yaml"))


def _lift(backbone, overrides: list[str], classes: int = 3):
    cfg = load_config(None, ["method=lift", *overrides]).method_config()
    return get_method("lift")(cfg, backbone, tiny_task(classes=classes))


@pytest.mark.parametrize("tuner", list(TUNERS))
def test_every_tuner_row_trains_one_step(tiny_backbone, tuner: str) -> None:
    method = _lift(tiny_backbone, [f"lift.tuner={tuner}"])
    try:
        names = [n for n, _ in method.trainable_parameters()]
        assert "head.weight" in names
        if TUNERS.get(tuner).needs_hooks:
            assert any(n.startswith("tuner.") for n in names) and not any(n.startswith("backbone.") for n in names)
        elif tuner == "classifier":
            assert names == ["head.weight"]
        else:
            backbone = [n for n in names if n.startswith("backbone.")]
            assert backbone and all(n.startswith("backbone.model.visual.transformer.resblocks.") for n in backbone)
        x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
        out = method(x, y)
        assert out.logits.shape == (4, 3) and torch.isfinite(out.loss)
        out.loss.backward()
        grads = {n: p.grad for n, p in method.trainable_parameters()}
        assert grads["head.weight"].abs().sum() > 0  # the loss reaches the head ...
        assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n != "head.weight") \
            or tuner == "classifier"  # ... and the tuned part of the backbone (zero-init W_up still gets a gradient)
        assert set(method.checkpoint_state()) >= set(names)
        res = method.extra_results()
        assert res["tuner"] == tuner and res["head_params"] == 3 * tiny_backbone.width
        assert res["tuner_params"] + res["head_params"] == method.num_trainable()
    finally:
        method.tuner.detach()
        tiny_backbone.zero_grad(set_to_none=True)


def test_config_maps_onto_typed_tuner_options() -> None:
    def options(*ovr: str):
        return load_config(None, ["method=lift", *ovr]).lift.tuner_options()

    assert options() == AdaptFormerOptions(bottleneck=None)
    assert options("lift.tuner=lora", "lift.bottleneck=8") == LoRAOptions(rank=8, alpha=1.0)
    assert options("lift.tuner=lora", "lift.lora_alpha=8") == LoRAOptions(alpha=8.0)
    assert options("lift.tuner=vpt_shallow", "lift.vpt_length=4") == VPTOptions(length=4)
    assert options("lift.tuner=bitfit") == NoOptions()
    with pytest.raises(ConfigError, match="lift.tuner='nope'.*adaptformer"):
        load_config(None, ["method=lift", "lift.tuner=nope"])
    with pytest.raises(ConfigError, match="lift.head='mlp'.*cosine"):
        load_config(None, ["method=lift", "lift.head=mlp"])


def test_lift_defaults_follow_the_paper(tiny_backbone) -> None:
    method = _lift(tiny_backbone, [])
    try:
        assert method.tuner.bottleneck == auto_bottleneck(3, tiny_backbone.num_blocks) == 1
        assert method.extra_results()["tuner_options"] == {"bottleneck": 1, "scale": 1.0, "learnable_scale": True}
        assert method.head.scale == 25.0 and type(method.loss_fn).__name__ == "LogitAdjustedLoss"
        assert method.cfg.interpolation == "bilinear"  # LIFT uses torchvision's default
        d, r, blocks = tiny_backbone.width, method.tuner.bottleneck, tiny_backbone.num_blocks
        assert method.num_trainable() == blocks * ((2 * r + 3) * d + r + 1) + 3 * d
        # at init the model is the frozen CLIP + text head: LIFT's logits = sigma * cos(f, proj^T w)
        x = torch.randn(2, 3, 32, 32)
        method.tuner.detach()
        frozen = method.head(tiny_backbone.encode_image(x).pre_proj)
        method.tuner.attach(tiny_backbone)
        torch.testing.assert_close(method(x).logits, frozen, rtol=0, atol=1e-5)
    finally:
        method.tuner.detach()


def test_eval_transforms_follow_lift(tiny_backbone) -> None:
    method = _lift(tiny_backbone, ["lift.tuner=classifier"])
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    plain = method.eval_transform("none")
    resize, crop = plain.transforms[:2]
    assert isinstance(resize, T.Resize) and resize.size == 36 and crop.size == (32, 32)  # 32 * 8 // 7 -> 32
    assert resize.interpolation == T.InterpolationMode.BILINEAR
    five = method.eval_transform("five_crop")
    assert five.transforms[0].size == 32 + 12 and five.transforms[0].interpolation == T.InterpolationMode.BILINEAR
    assert plain(img).shape == (3, 32, 32) and five(img).shape == (5, 3, 32, 32)
    assert method.eval_transform("ten_crop")(img).shape == (10, 3, 32, 32)
    bicubic = _lift(tiny_backbone, ["lift.tuner=classifier", "lift.interpolation=bicubic"])
    assert bicubic.eval_transform("none").transforms[0].interpolation == T.InterpolationMode.BICUBIC
    rrc = method.train_transform(0).transforms[0]
    assert isinstance(rrc, T.RandomResizedCrop) and rrc.scale == (0.08, 1.0)
    assert rrc.interpolation == T.InterpolationMode.BILINEAR


def test_lift_plus_switches_change_the_train_transform(tiny_backbone) -> None:
    method = _lift(tiny_backbone, ["lift.crop=square_schedule", "lift.flip=false", "lift.interpolation=bicubic",
                                   "lift.crop_min_scale=0.5"])
    try:
        method.on_epoch_start(0, 5)
        first, last = method.train_transform(0).transforms[0], method.train_transform(4).transforms[0]
        assert isinstance(first, T.RandomResizedCrop) and first.ratio == (1.0, 1.0)
        assert first.scale == (0.5, 1.0) and last.scale == (1.0, 1.0)
        assert not any(isinstance(t, T.RandomHorizontalFlip) for t in method.train_transform(0).transforms)
        assert first.interpolation == T.InterpolationMode.BICUBIC
    finally:
        method.tuner.detach()


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_presets_load(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.method == "lift" and cfg.eval.tte == "five_crop" and cfg.train.batch_size == 128
    assert cfg.model.name.startswith(("ViT-B-16@openai", "ViT-L-14@openai"))
    assert cfg.train.precision == "amp" and cfg.eval.precision == "fp32" and cfg.lift.loss == "la"
    if path.name.startswith("lift_plus"):
        assert cfg.train.epochs == 5 and cfg.train.lr == 0.02 and not cfg.lift.flip
        assert cfg.lift.interpolation == "bicubic"
    else:
        assert cfg.train.epochs == (20 if "inat" in path.name else 10) and cfg.train.lr == 0.01
        assert cfg.lift.interpolation == "bilinear" and cfg.lift.tuner == "adaptformer"


def test_cifar_presets_cover_the_three_betas() -> None:
    presets = [load_config(p).data for p in CONFIGS if p.name.startswith("cifar100_lt")]
    assert {d.imbalance_ratio for d in presets} == {100, 50, 10}
    assert {d.name for d in presets} == {"cifar100-lt"}  # the literature's images
