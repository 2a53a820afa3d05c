"""Tuners: contract tests generated from the TUNERS registry (identity at init, detach restores the frozen
forward, frozen weights untouched by a step, formulas equal counted parameters), LIFT's bottleneck rule, typed
options, inits as LIFT's code, and which towers each tuner accepts."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tailclip.errors import ConfigError, UnknownNameError
from tailclip.tuners import (
    TUNERS,
    AdapterOptions,
    AdaptFormerOptions,
    Bottleneck,
    LoRA,
    LoRAOptions,
    NoOptions,
    SGAdapterOptions,
    VPTOptions,
    auto_bottleneck,
    build_tuner,
    resolve_bottleneck,
)

HOOK_TUNERS = [n for n in TUNERS if TUNERS.get(n).needs_hooks]
BLOCK_TUNERS = ("full", "bitfit", "ln")


@pytest.mark.parametrize(("classes", "expected"), [(100, 4), (365, 8), (1000, 32), (8142, 256)])
def test_bottleneck_rule_matches_lift(classes: int, expected: int) -> None:
    assert auto_bottleneck(classes, 12) == expected
    assert auto_bottleneck(classes, 12) == 2 ** max(0, int(math.log2(classes / (12 * 2))))  # LIFT's expression


def test_bottleneck_rule_edges() -> None:
    assert auto_bottleneck(2, 12) == 1  # C < 2L: r = 2^0
    assert auto_bottleneck(48, 12) == 2  # exactly 2L * 2 -> 2^1, no float rounding at powers of two
    assert auto_bottleneck(47, 12) == 1
    assert resolve_bottleneck(7, None, 12, "adapter") == 7
    with pytest.raises(ConfigError, match="adapter"):
        resolve_bottleneck(None, None, 12, "adapter")


def _features(backbone, x):
    with torch.no_grad():
        return backbone.encode_image(x).pre_proj


def _guidance(backbone, classes: int = 10):
    """A stand-in classifier weight (C, d) for the SG-Adapter's guidance (a method hands over its head's)."""
    weight = torch.randn(classes, backbone.width, generator=torch.Generator().manual_seed(0))
    return lambda: weight


def _build(name: str, backbone, **kw):
    """Each tuner with small typed options (bottleneck 4, 3 prompts) so the test is about the contract."""
    options = {"adaptformer": AdaptFormerOptions(bottleneck=4), "adapter": AdapterOptions(bottleneck=4),
               "lora": LoRAOptions(rank=4), "vpt_deep": VPTOptions(length=3), "vpt_shallow": VPTOptions(length=3),
               "sg_adapter": SGAdapterOptions(bottleneck=4, guidance=_guidance(backbone))}
    return build_tuner(name, backbone, options.get(name), num_classes=10, **kw)


def _perturb(tuner) -> None:
    with torch.no_grad():
        for p in tuner.parameters():
            p.add_(0.05 * torch.randn_like(p))


@pytest.mark.parametrize("name", list(TUNERS))
def test_identity_at_init_and_detach_restores(tiny_backbone, name: str) -> None:
    torch.manual_seed(1)
    x = torch.randn(3, 3, 32, 32)
    ref = _features(tiny_backbone, x)
    tuner = _build(name, tiny_backbone)
    try:
        out = _features(tiny_backbone, x)
        if name.startswith("vpt"):  # prompts are attended to: not the identity, but the output keeps its shape
            assert out.shape == ref.shape and not torch.allclose(out, ref, atol=1e-4)
        else:
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
        if tuner.num_own_parameters():  # the branch is live: moving its parameters changes the output
            _perturb(tuner)
            assert not torch.allclose(_features(tiny_backbone, x), out, atol=1e-4)
        tuned = _features(tiny_backbone, x)
    finally:
        tuner.detach()
    assert not tuner.attached and not tiny_backbone.hooks
    assert not any(p.requires_grad for p in tiny_backbone.parameters())
    torch.testing.assert_close(_features(tiny_backbone, x), ref, rtol=0, atol=0)
    tuner.attach(tiny_backbone)  # re-attaching after detach brings the tuned forward back
    try:
        assert tuner.attached
        torch.testing.assert_close(_features(tiny_backbone, x), tuned, rtol=0, atol=0)
    finally:
        tuner.detach()


@pytest.mark.parametrize("name", list(TUNERS))
def test_sgd_step_leaves_frozen_weights_bit_identical(tiny_backbone, name: str) -> None:
    before = {k: v.clone() for k, v in tiny_backbone.state_dict().items()}
    tuner = _build(name, tiny_backbone)
    try:
        _perturb(tuner)  # zero-initialised W_up / B block gradients to the rest at step 0
        params = list(tuner.parameters()) + [p for p in tiny_backbone.parameters() if p.requires_grad]
        if not params:
            assert name == "classifier"
            return
        opt = torch.optim.SGD(params, lr=0.1)
        tiny_backbone.encode_image(torch.randn(2, 3, 32, 32)).pre_proj.square().sum().backward()
        opt.step()
        trained = {id(p) for p in tiny_backbone.parameters() if p.requires_grad}
        named = dict(tiny_backbone.named_parameters())
        for key, value in tiny_backbone.state_dict().items():
            if key in named and id(named[key]) in trained:
                continue
            assert torch.equal(value, before[key]), key
        if name in BLOCK_TUNERS:
            changed = [k for k in named if id(named[k]) in trained and not torch.equal(named[k], before[k])]
            assert changed and all(k.startswith("model.visual.transformer.resblocks.") for k in changed)
    finally:
        tuner.detach()
        tiny_backbone.zero_grad(set_to_none=True)
        tiny_backbone.load_state_dict(before)
    assert all(torch.equal(v, before[k]) for k, v in tiny_backbone.state_dict().items())


@pytest.mark.parametrize("name", list(TUNERS))
def test_formula_equals_counted_parameters(tiny_backbone, name: str) -> None:
    d, blocks = tiny_backbone.width, tiny_backbone.num_blocks
    h = tiny_backbone.model.visual.transformer.resblocks[0].mlp.c_fc.out_features
    per_block = {  # the per-block formula of each row (docs/methods/lift.md)
        "adaptformer": (2 * 4 + 3) * d + 4 + 1, "adapter": (2 * 4 + 3) * d + 4, "lora": 2 * (2 * 4 * d),
        "vpt_deep": 3 * d, "vpt_shallow": 3 * d, "classifier": 0,
        "full": 4 * d * d + 2 * d * h + 9 * d + h, "bitfit": 7 * d + h, "ln": 4 * d,
        "sg_adapter": (5 * 4 + d + 4) * d + 3 * 4 + 2,  # Sage's Table 9
    }[name]
    tuner = _build(name, tiny_backbone)
    try:
        own = tuner.num_own_parameters()
        unfrozen = sum(p.numel() for p in tiny_backbone.parameters() if p.requires_grad)
        if tuner.params_per_block() is None:
            assert own == 0 and unfrozen == blocks * per_block
        else:
            assert unfrozen == 0 and tuner.params_per_block() == per_block
            assert own == len(tuner.blocks) * per_block
            assert len(tuner.blocks) == {"vpt_shallow": 1, "classifier": 0}.get(name, blocks)
    finally:
        tuner.detach()


def test_gradients_reach_every_tuner_parameter(tiny_backbone) -> None:
    for name in HOOK_TUNERS:
        tuner = _build(name, tiny_backbone)
        try:
            _perturb(tuner)
            tiny_backbone.encode_image(torch.randn(2, 3, 32, 32)).pre_proj.square().sum().backward()
            missing = [n for n, p in tuner.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
            assert not missing, (name, missing)
            assert all(p.grad is None for p in tiny_backbone.parameters())
        finally:
            tuner.detach()


def test_bottleneck_inits_follow_lift() -> None:
    torch.manual_seed(0)
    a = Bottleneck(768, 64, scale=1.0)
    # kaiming_normal_(a=sqrt(5)), fan_in: std = sqrt(2 / (1 + 5)) / sqrt(d) = 1 / sqrt(3 d)
    assert a.down.weight.std().item() == pytest.approx(1 / math.sqrt(3 * 768), rel=0.02)
    assert a.down.weight.mean().abs().item() < 1e-3
    assert torch.all(a.up.weight == 0) and torch.all(a.up.bias == 0) and torch.all(a.down.bias == 0)
    assert float(a.scale.detach()) == 1.0 and a.scale.requires_grad
    fixed = Bottleneck(16, 2, scale=0.1, learnable_scale=False)
    assert "scale" not in dict(fixed.named_parameters()) and float(fixed.scale) == pytest.approx(0.1)
    assert Bottleneck(16, 2).scale is None


def test_lora_init_and_scaling_follow_lift(tiny_backbone) -> None:
    d = tiny_backbone.width
    lora = build_tuner("lora", tiny_backbone, LoRAOptions(rank=16))
    try:
        pair = lora.lora[0]["q"]
        assert set(lora.lora[0]) == {"q", "v"} and tuple(pair.a.shape) == (d, 16) and tuple(pair.b.shape) == (16, d)
        assert pair.scaling == 1 / 16 and torch.all(pair.b == 0)
        bound = 1 / math.sqrt(16)  # kaiming_uniform_(a=sqrt(5)) on (d, r): fan_in = r
        assert pair.a.abs().max().item() <= bound and pair.a.abs().max().item() > 0.95 * bound
        with torch.no_grad():
            pair.b.normal_()
        x = torch.randn(5, d)
        torch.testing.assert_close(pair(x), (x @ pair.a @ pair.b) / 16)
    finally:
        lora.detach()
    every = LoRA.build(tiny_backbone, LoRAOptions(rank=2, alpha=4.0, targets=("q", "k", "v")), None)
    assert every.params_per_block() == 3 * 2 * 2 * d and every.lora[0]["k"].scaling == 2.0


def test_typed_options_are_checked(tiny_backbone) -> None:
    with pytest.raises(ConfigError, match="takes LoRAOptions"):
        build_tuner("lora", tiny_backbone, AdapterOptions(bottleneck=2))
    with pytest.raises(ConfigError, match="adaptformer.bottleneck=0"):
        AdaptFormerOptions(bottleneck=0)
    with pytest.raises(ConfigError, match="lora.targets"):
        LoRAOptions(targets=("q", "o"))
    with pytest.raises(ConfigError, match="vpt.length"):
        VPTOptions(length=0)
    with pytest.raises(UnknownNameError, match="adaptformer"):
        build_tuner("nope", tiny_backbone)
    tuner = build_tuner("adaptformer", tiny_backbone, num_classes=100)
    try:  # the resolved options record the bottleneck LIFT's rule chose
        assert tuner.options == AdaptFormerOptions(bottleneck=auto_bottleneck(100, 4)) and tuner.bottleneck == 8
    finally:
        tuner.detach()
    assert all(TUNERS.get(n).Options is NoOptions for n in (*BLOCK_TUNERS, "classifier"))


def test_vpt_tokens_and_patch_size(tiny_backbone) -> None:
    blocks = tiny_backbone.num_blocks
    vpt = build_tuner("vpt_deep", tiny_backbone, VPTOptions(length=5))
    try:
        bound = math.sqrt(6 / (3 * 8 * 8 + tiny_backbone.width))  # patch 8 read from the model
        assert vpt.prompts.abs().max().item() <= bound and vpt.prompts.abs().max().item() > 0.9 * bound
        out = tiny_backbone.encode_image(torch.randn(2, 3, 32, 32), taps=[f"blocks.{blocks - 1}", "blocks.0"])
        assert out.taps["blocks.0"].shape[1] == 1 + 16 + 5  # prompts appended after the 16 patch tokens
        assert out.taps[f"blocks.{blocks - 1}"].shape[1] == 1 + 16  # and cut off at the last block's output
    finally:
        vpt.detach()


def test_block_tuners_on_hf_tower(hf_backbone) -> None:
    layers = {id(p) for p in hf_backbone.model.vision_model.encoder.layers.parameters()}
    for name in BLOCK_TUNERS:
        tuner = build_tuner(name, hf_backbone)
        try:
            trainable = [p for p in hf_backbone.parameters() if p.requires_grad]
            assert trainable and all(id(p) in layers for p in trainable)
            d, h = 48, 96
            assert sum(p.numel() for p in trainable) == 3 * {"full": 4 * d * d + 2 * d * h + 9 * d + h,
                                                             "bitfit": 7 * d + h, "ln": 4 * d}[name]
        finally:
            tuner.detach()
    assert not any(p.requires_grad for p in hf_backbone.parameters())


def test_resnet_tower_takes_only_block_tuners(tiny_rn_json: Path) -> None:
    from tailclip.backbones import create_backbone

    rn = create_backbone(f"json:{tiny_rn_json}")
    for name in HOOK_TUNERS:
        with pytest.raises(ConfigError, match="hook points"):
            build_tuner(name, rn, num_classes=10)
    with pytest.raises(ConfigError, match="nothing to train"):
        build_tuner("ln", rn)
    full = build_tuner("full", rn)
    try:
        stages = {id(p) for s in ("layer1", "layer2", "layer3", "layer4")
                  for p in getattr(rn.model.visual, s).parameters()}
        assert {id(p) for p in rn.parameters() if p.requires_grad} == stages
    finally:
        full.detach()


@pytest.fixture(scope="module")
def hf_backbone(tmp_path_factory: pytest.TempPathFactory):
    transformers = pytest.importorskip("transformers")
    from tailclip.backbones import create_backbone

    cfg = transformers.CLIPConfig(
        text_config={"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "max_position_embeddings": 77},
        vision_config={"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hf-clip-tuners")
    transformers.CLIPModel(cfg).eval().save_pretrained(path)
    return create_backbone(f"hf:{path}")
