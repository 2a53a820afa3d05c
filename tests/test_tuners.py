"""Tuners: identity at init, exact parameter counts, LIFT's bottleneck rule, hooks attach and detach cleanly."""

from __future__ import annotations

import pytest
import torch

from tailclip.tuners import TUNERS, AdaptFormer, LoRA, auto_bottleneck, build_tuner


@pytest.mark.parametrize(("classes", "expected"), [(100, 4), (365, 8), (1000, 32), (8142, 256)])
def test_bottleneck_rule_matches_lift(classes: int, expected: int) -> None:
    assert auto_bottleneck(classes, 12) == expected


def test_bottleneck_rule_edges() -> None:
    assert auto_bottleneck(2, 12) == 1  # C < 2L: r = 2^0
    assert auto_bottleneck(48, 12) == 2  # exactly 2L * 2 -> 2^1, no float rounding at powers of two
    assert auto_bottleneck(47, 12) == 1


@pytest.mark.parametrize(("dim", "r"), [(768, 4), (768, 32), (1024, 256), (64, 1)])
def test_adaptformer_per_block_parameter_count(dim: int, r: int) -> None:
    tuner = AdaptFormer(dim, num_blocks=3, bottleneck=r)
    expected = (2 * r + 3) * dim + r + 1
    assert AdaptFormer.params_per_block(dim, r) == expected
    for block in tuner.adapters:
        assert sum(p.numel() for p in block.parameters()) == expected
    assert tuner.num_own_parameters() == 3 * expected


def test_adaptformer_init(tiny_backbone) -> None:
    tuner = AdaptFormer.for_backbone(tiny_backbone, num_classes=100)
    a = tuner.adapters[0]
    assert tuner.bottleneck == auto_bottleneck(100, tiny_backbone.num_blocks)
    assert torch.all(a.up.weight == 0) and torch.all(a.up.bias == 0) and torch.all(a.down.bias == 0)
    assert a.down.weight.abs().sum() > 0 and float(a.scale.detach()) == 1.0 and a.scale.requires_grad


def _features(backbone, x):
    with torch.no_grad():
        f = backbone.encode_image(x)
    return f.pre_proj, f.proj


@pytest.mark.parametrize("name", ["adaptformer", "adapter", "lora", "full", "bitfit", "ln", "classifier"])
def test_identity_at_init_and_detach(tiny_backbone, name: str) -> None:
    torch.manual_seed(1)
    x = torch.randn(3, 3, 32, 32)
    ref_pre, ref_proj = _features(tiny_backbone, x)
    tuner = build_tuner(name, tiny_backbone, bottleneck=4, num_classes=10)
    try:
        pre, proj = _features(tiny_backbone, x)
        torch.testing.assert_close(pre, ref_pre, rtol=0, atol=1e-6)
        torch.testing.assert_close(proj, ref_proj, rtol=0, atol=1e-6)
        if name in ("adaptformer", "adapter", "lora"):  # the branch is live: perturbing it changes the output
            with torch.no_grad():
                for p in tuner.parameters():
                    p.add_(0.05 * torch.randn_like(p))
            assert not torch.allclose(_features(tiny_backbone, x)[0], ref_pre, atol=1e-4)
    finally:
        tuner.detach()
    assert not tiny_backbone.hooks and not any(p.requires_grad for p in tiny_backbone.parameters())
    torch.testing.assert_close(_features(tiny_backbone, x)[0], ref_pre, rtol=0, atol=0)


def test_gradients_reach_only_tuner_parameters(tiny_backbone) -> None:
    tuner = build_tuner("adaptformer", tiny_backbone, bottleneck=16)
    try:
        with torch.no_grad():  # W_up = 0 blocks gradients to W_down at step 0; move off the start point
            for a in tuner.adapters:
                a.up.weight.normal_(std=0.01)
        tiny_backbone.encode_image(torch.randn(2, 3, 32, 32)).pre_proj.square().sum().backward()
        missing = [n for n, p in tuner.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
        assert not missing, missing
        assert all(p.grad is None for p in tiny_backbone.parameters())
    finally:
        tuner.detach()


def test_lora_counts_and_vpt_shapes(tiny_backbone) -> None:
    d, blocks = tiny_backbone.width, tiny_backbone.num_blocks
    lora = LoRA(d, blocks, rank=4)
    assert lora.num_own_parameters() == blocks * 2 * (2 * 4 * d)
    x = torch.randn(2, 3, 32, 32)
    ref = _features(tiny_backbone, x)[0]
    for name, per in (("vpt_deep", blocks), ("vpt_shallow", 1)):
        vpt = build_tuner(name, tiny_backbone, vpt_length=5)
        try:
            assert vpt.num_own_parameters() == per * 5 * d
            out = tiny_backbone.encode_image(x, taps=[f"blocks.{blocks - 1}"])
            assert out.pre_proj.shape == ref.shape
            n_tokens = out.taps[f"blocks.{blocks - 1}"].shape[1]
            assert n_tokens == 1 + (32 // 8) ** 2  # prompts removed at the last block's output
            out.pre_proj.square().sum().backward()
            assert vpt.prompts.grad is not None and vpt.prompts.grad.abs().sum() > 0
        finally:
            vpt.detach()


def test_partial_tuners_unfreeze_the_image_tower_only(tiny_backbone) -> None:
    visual = {id(p) for p in tiny_backbone.model.visual.parameters()}
    for name in ("full", "bitfit", "ln"):
        tuner = build_tuner(name, tiny_backbone)
        try:
            trainable = [(n, p) for n, p in tiny_backbone.named_parameters() if p.requires_grad]
            assert trainable and all(id(p) in visual for _, p in trainable)
            if name == "bitfit":
                assert all(n.endswith("bias") for n, _ in trainable)
            if name == "full":
                assert len(trainable) == len(visual)
        finally:
            tuner.detach()
        assert not any(p.requires_grad for p in tiny_backbone.parameters())


def test_registry_lists_every_lift_row() -> None:
    from tailclip.methods.lift import TUNER_NAMES

    assert set(TUNER_NAMES) == set(TUNERS)
