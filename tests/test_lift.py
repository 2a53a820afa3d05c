"""LIFT: every tuner row of its table builds and trains a step, the trainable set is exactly tuner + head,
presets load, and the LIFT+ switches change the train transform as documented."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_engine import tiny_task

from tailclip.config import load_config
from tailclip.methods import get_method
from tailclip.methods.lift import TUNER_NAMES
from tailclip.tuners import auto_bottleneck

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "lift").glob("*.yaml"))


@pytest.mark.parametrize("tuner", TUNER_NAMES)
def test_every_tuner_row_trains_one_step(tiny_backbone, tuner: str) -> None:
    task = tiny_task()
    cfg = load_config(None, ["method=lift", f"lift.tuner={tuner}"]).method_config()
    method = get_method("lift")(cfg, tiny_backbone, task)
    try:
        names = [n for n, _ in method.trainable_parameters()]
        assert "head.weight" in names
        if tuner in ("adaptformer", "adapter", "lora", "vpt_deep", "vpt_shallow"):
            assert any(n.startswith("tuner.") for n in names) and not any(n.startswith("backbone.") for n in names)
        elif tuner == "classifier":
            assert names == ["head.weight"]
        else:
            assert any(n.startswith("backbone.model.visual.") for n in names)
        x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
        out = method(x, y)
        assert out.logits.shape == (4, 3) and torch.isfinite(out.loss)
        out.loss.backward()
        assert method.head.weight.grad is not None
        assert set(method.checkpoint_state()) >= set(names)
    finally:
        method.tuner.detach()
        tiny_backbone.zero_grad(set_to_none=True)


def test_lift_defaults_follow_the_paper(tiny_backbone) -> None:
    task = tiny_task(classes=3)
    method = get_method("lift")(load_config(None, ["method=lift"]).method_config(), tiny_backbone, task)
    try:
        assert method.bottleneck == auto_bottleneck(3, tiny_backbone.num_blocks) == 1
        assert method.head.scale == 25.0 and type(method.loss_fn).__name__ == "LogitAdjustedLoss"
        d, r, blocks = tiny_backbone.width, method.bottleneck, tiny_backbone.num_blocks
        assert method.num_trainable() == blocks * ((2 * r + 3) * d + r + 1) + 3 * d
        # at init the model is the frozen CLIP + text head: LIFT's logits = sigma * cos(f, proj^T w)
        x = torch.randn(2, 3, 32, 32)
        method.tuner.detach()
        frozen = method.head(tiny_backbone.encode_image(x).pre_proj)
        method.tuner.attach(tiny_backbone)
        torch.testing.assert_close(method(x).logits, frozen, rtol=0, atol=1e-5)
    finally:
        method.tuner.detach()


def test_lift_plus_switches_change_the_train_transform(tiny_backbone) -> None:
    from torchvision import transforms as T

    task = tiny_task()
    cfg = load_config(None, ["method=lift", "lift.crop=square_schedule", "lift.flip=false",
                             "lift.interpolation=bicubic", "lift.crop_min_scale=0.5"]).method_config()
    method = get_method("lift")(cfg, tiny_backbone, task)
    try:
        method.num_epochs_hint = 5
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
    assert cfg.train.precision == "amp" and cfg.lift.loss == "la"
    if path.name.startswith("lift_plus"):
        assert cfg.train.epochs == 5 and cfg.train.lr == 0.02 and not cfg.lift.flip
    else:
        assert cfg.train.epochs == (20 if "inat" in path.name else 10) and cfg.train.lr == 0.01


def test_cifar_presets_cover_the_three_betas() -> None:
    betas = {load_config(p).data.imbalance_ratio for p in CONFIGS if p.name.startswith("cifar100_lt")}
    assert betas == {100, 50, 10}
