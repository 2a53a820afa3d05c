"""Backbones: our ViT forward matches open_clip / transformers numerically, hooks and taps work, ResNet taps,
text features, name resolution, and the offline error messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tailclip.backbones import HOOK_KINDS, create_backbone, list_models
from tailclip.backbones.fingerprint import file_sha256
from tailclip.backbones.weights import resolve_pretrained_file
from tailclip.errors import UnknownNameError, WeightsNotFoundError

TOL = 1e-4


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _ref_tokens(backbone, x: torch.Tensor) -> list[torch.Tensor]:
    """Block outputs computed with open_clip's own resblocks."""
    visual = backbone.model.visual
    h, outs = visual._embeds(x), []
    for blk in visual.transformer.resblocks:
        h = blk(h)
        outs.append(h)
    return outs


# --------------------------------------------------------------------------------------------------
# ViT equivalence
# --------------------------------------------------------------------------------------------------
def test_tiny_vit_matches_open_clip(tiny_backbone) -> None:
    b = tiny_backbone
    x = _images(4, 32)
    with torch.no_grad():
        f = b.encode_image(x)
        ref = b.model.encode_image(x)
    assert f.proj.shape == (4, 32) and f.pre_proj.shape == (4, 64)
    assert (f.proj - ref).abs().max().item() <= TOL
    assert torch.allclose(f.pre_proj @ b.visual_proj, f.proj, atol=1e-5)
    assert (b.arch, b.width, b.embed_dim, b.num_blocks) == ("vit", 64, 32, 4)
    assert tuple(b.visual_proj.shape) == (64, 32)
    assert b.logit_scale == pytest.approx(1 / 0.07, rel=1e-4)  # open_clip's init for random weights
    assert not any(p.requires_grad for p in b.parameters())
    assert not b.model.training


def test_vit_b16_random_matches_open_clip() -> None:
    torch.manual_seed(0)
    b = create_backbone("ViT-B-16@none")
    assert (b.width, b.embed_dim, b.num_blocks, b.preprocess.image_size) == (768, 512, 12, 224)
    x = _images(2, 224)
    with torch.no_grad():
        ours = b.encode_image(x).proj
        ref = b.model.encode_image(x)
    diff = (ours - ref).abs().max().item()
    assert diff <= TOL, diff
    # the text tower from token embeddings (prompt learners) is open_clip's encode_text
    tokens = b.tokenize(["a photo of a cat.", "a dog"])
    with torch.no_grad():
        ref_text = b.model.encode_text(tokens)
        ours_text = b.encode_text_embeddings(b.token_embedding(tokens), b.eot_positions(tokens))
    assert b.text_width == 512 and (ours_text - ref_text).abs().max().item() <= 1e-5


def test_bf16_autocast_close_to_open_clip(tiny_backbone) -> None:
    x = _images(2, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours = tiny_backbone.encode_image(x).proj.float()
        ref = tiny_backbone.model.encode_image(x).float()
    assert (ours - ref).abs().max().item() <= 0.05 * ref.abs().max().item()


# --------------------------------------------------------------------------------------------------
# taps and hooks
# --------------------------------------------------------------------------------------------------
def test_vit_taps(tiny_backbone) -> None:
    x = _images(2, 32)
    taps = ["blocks.0", "blocks.3", "blocks.1.attn", "blocks.2.mlp"]
    with torch.no_grad():
        f = tiny_backbone.encode_image(x, taps=taps)
        ref = _ref_tokens(tiny_backbone, x)
    assert set(f.taps) == set(taps)
    for name in taps:
        assert tuple(f.taps[name].shape) == (2, 17, 64)  # 16 patches + CLS, width 64
    assert (f.taps["blocks.0"] - ref[0]).abs().max().item() <= TOL
    assert (f.taps["blocks.3"] - ref[3]).abs().max().item() <= TOL
    assert "blocks.3.mlp" in tiny_backbone.tap_names()
    with pytest.raises(KeyError, match="blocks.9"):
        tiny_backbone.encode_image(x, taps=["blocks.9"])


def test_hooks_change_output_and_removal_restores(tiny_backbone) -> None:
    b = tiny_backbone
    x = _images(2, 32)
    # not a uniform constant: the next LayerNorm would cancel a shift shared by all features
    delta = torch.linspace(-1.0, 1.0, 64)
    with torch.no_grad():
        base = b.encode_image(x, taps=["blocks.1.mlp"])
        remove = b.hooks.add("blocks.1.mlp", lambda h, m: m + delta)
        hooked = b.encode_image(x, taps=["blocks.1.mlp"])
        remove()
        restored = b.encode_image(x).proj
    assert (hooked.proj - base.proj).abs().max().item() > 1e-2
    assert not b.hooks
    assert torch.equal(restored, base.proj)
    # the tap sees the branch after its hook
    assert torch.allclose(hooked.taps["blocks.1.mlp"] - base.taps["blocks.1.mlp"], delta.expand(2, 17, 64), atol=1e-5)


def test_every_hook_kind_is_applied_in_order(tiny_backbone) -> None:
    b = tiny_backbone
    x = _images(1, 32)
    seen: list[str] = []
    removers = []
    for kind in HOOK_KINDS:
        def fn(*args: torch.Tensor, _k: str = kind) -> torch.Tensor:
            seen.append(_k)
            return args[-1]  # identity: (x) -> x, (x_ln, qkv) -> qkv, (h, m) -> m

        removers.append(b.hooks.add(f"blocks.2.{kind}", fn))
    try:
        with torch.no_grad():
            out = b.encode_image(x).proj
            ref = b.model.encode_image(x)
    finally:
        for r in removers:
            r()
    assert seen == list(HOOK_KINDS)
    assert (out - ref).abs().max().item() <= TOL
    with pytest.raises(KeyError):
        b.hooks.add("blocks.4.mlp", lambda h, m: m)


def test_hook_parameters_get_gradients(tiny_backbone) -> None:
    """Adapters train through the frozen tower: the hook's parameter gets a gradient, CLIP's none."""
    b = tiny_backbone
    scale = torch.nn.Parameter(torch.zeros(64))
    remove = b.hooks.add("blocks.0.mlp", lambda h, m: m + scale * h)
    try:
        b.encode_image(_images(2, 32)).pre_proj.square().sum().backward()
    finally:
        remove()
    assert scale.grad is not None and scale.grad.abs().sum().item() > 0
    assert all(p.grad is None for p in b.parameters())


def test_train_mode_keeps_clip_in_eval(tiny_backbone) -> None:
    tiny_backbone.train()
    try:
        assert tiny_backbone.training and not tiny_backbone.model.training
    finally:
        tiny_backbone.eval()


# --------------------------------------------------------------------------------------------------
# ResNet tower
# --------------------------------------------------------------------------------------------------
def test_resnet_taps_and_projection(tiny_rn_json: Path) -> None:
    torch.manual_seed(0)
    b = create_backbone(f"json:{tiny_rn_json}")
    x = _images(2, 64)
    with torch.no_grad():
        f = b.encode_image(x, taps=["layer1", "layer2", "layer3", "layer4"])
        ref = b.model.encode_image(x)
    assert (b.arch, b.width, b.embed_dim, b.num_blocks) == ("resnet", 512, 32, 4)
    shapes = {k: tuple(v.shape) for k, v in f.taps.items()}
    assert shapes == {"layer1": (2, 64, 16, 16), "layer2": (2, 128, 8, 8), "layer3": (2, 256, 4, 4),
                      "layer4": (2, 512, 2, 2)}
    assert (f.proj - ref).abs().max().item() <= TOL
    assert torch.equal(f.pre_proj, f.proj)
    assert b.visual_proj is None
    assert b.attnpool is b.model.visual.attnpool
    with torch.no_grad():
        assert torch.allclose(b.attnpool(f.taps["layer4"]), f.proj, atol=1e-6)
    assert b.hooks.names() == []
    b.train()
    assert not b.model.visual.bn1.training  # BatchNorm statistics stay frozen


# --------------------------------------------------------------------------------------------------
# text side
# --------------------------------------------------------------------------------------------------
def test_encode_text_matches_open_clip_and_classifier(tiny_backbone) -> None:
    b = tiny_backbone
    prompts = ["a photo of a cat.", "a dog", "a very long prompt about a small red triangle on a blue field."]
    with torch.no_grad():
        ours = b.encode_text(prompts)
        ref = b.model.encode_text(b.tokenize(prompts))
    assert ours.shape == (3, 32)
    assert (ours - ref).abs().max().item() <= 1e-5
    w = b.text_classifier(["red_square", "blue circle", "cat"], ["a photo of a {}.", "a {}.", "art of the {}."])
    assert w.shape == (3, 32)
    assert torch.allclose(w.norm(dim=-1), torch.ones(3), atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Hugging Face CLIPModel
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPConfig(
        text_config={"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                         "num_attention_heads": 4, "max_position_embeddings": 77},
        vision_config={"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4,
                           "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hf-clip")
    transformers.CLIPModel(cfg).eval().save_pretrained(path)
    return path


def test_hf_clip_matches_get_image_features(hf_dir: Path) -> None:
    b = create_backbone(f"hf:{hf_dir}")
    x = _images(3, 32)
    with torch.no_grad():
        f = b.encode_image(x, taps=["blocks.2", "blocks.0.attn"])
        ref = b.model.get_image_features(pixel_values=x)
        ref = ref if isinstance(ref, torch.Tensor) else ref.pooler_output
    assert (f.proj - ref).abs().max().item() <= TOL
    assert (b.arch, b.width, b.embed_dim, b.num_blocks) == ("vit", 48, 16, 3)
    assert tuple(b.visual_proj.shape) == (48, 16) and f.pre_proj.shape == (3, 48)
    assert tuple(f.taps["blocks.2"].shape) == (3, 17, 48)
    assert b.preprocess.image_size == 32 and b.spec["source"] == "transformers"
    remove = b.hooks.add("blocks.1.attn", lambda h: h * 0.5)
    with torch.no_grad():
        hooked = b.encode_image(x).proj
    remove()
    assert (hooked - ref).abs().max().item() > 1e-3
    w = b.text_classifier(["cat", "dog"], ["a photo of a {}."])
    assert w.shape == (2, 16) and torch.allclose(w.norm(dim=-1), torch.ones(2), atol=1e-5)


def _hf_text_ref(model, ids: torch.Tensor) -> torch.Tensor:
    out = model.get_text_features(input_ids=ids)
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def test_hf_text_embeddings_equal_get_text_features(hf_dir: Path) -> None:
    b = create_backbone(f"hf:{hf_dir}")
    prompts = ["a photo of a cat.", "a dog", "a very long prompt about a small red triangle on a blue field."]
    ids = b.tokenize(prompts)
    tm = b.model.text_model
    assert b.text_width == 32 and tm.eos_token_id == 49407
    with torch.no_grad():
        ref = _hf_text_ref(b.model, ids)
        emb = b.token_embedding(ids)
        ours = b.encode_text_embeddings(emb, b.eot_positions(ids))
        assert (ours - ref).abs().max().item() <= 1e-5
        assert (b.encode_text(prompts) - ref).abs().max().item() <= 1e-5
        # padding that reuses the EOS id: HF pools at the first EOS, and so do we
        padded = torch.tensor([[49406, 320, 1929, 49407, 49407, 49407]])
        assert b.eot_positions(padded).tolist() == [3]
        assert (b.encode_text_embeddings(b.token_embedding(padded), b.eot_positions(padded))
                - _hf_text_ref(b.model, padded)).abs().max().item() <= 1e-5
        tm.eos_token_id = 2  # configs from before transformers' PR #24773 pool at the largest id
        try:
            legacy = torch.tensor([[49406, 320, 49407, 0, 0]])
            assert b.eot_positions(legacy).tolist() == [2]
            assert (b.encode_text_embeddings(b.token_embedding(legacy), b.eot_positions(legacy))
                    - _hf_text_ref(b.model, legacy)).abs().max().item() <= 1e-5
        finally:
            tm.eos_token_id = 49407


def test_hf_parameter_groups_and_block_bias_step(hf_dir: Path) -> None:
    """Full/BitFit/LN tuners select from block_named_parameters(): for HF towers exactly the encoder layers of the
    vision model; one SGD step through tailclip's own forward changes exactly the unfrozen biases."""
    b = create_backbone(f"hf:{hf_dir}")
    blocks = dict(b.block_named_parameters())
    vision = dict(b.vision_named_parameters())
    encoder_layers = b.model.vision_model.encoder.layers
    layers = {"model.vision_model.encoder.layers." + n for n, _ in encoder_layers.named_parameters()}
    assert set(blocks) == layers
    every = {"model." + n for n, _ in b.model.named_parameters()}
    assert set(vision) == {n for n in every if n.startswith(("model.vision_model.", "model.visual_projection."))}
    assert set(blocks) < set(vision) and not any("text" in n for n in vision)
    # per layer: q/k/v/out + fc1/fc2 + 2 LayerNorm biases, widths 48 (96 for fc1): 3 layers
    biases = {n: p for n, p in blocks.items() if n.endswith("bias")}
    assert sum(p.numel() for p in biases.values()) == 3 * (4 * 48 + 96 + 48 + 2 * 48)
    before = {k: v.clone() for k, v in b.state_dict().items()}
    for p in biases.values():
        p.requires_grad_(True)
    try:
        opt = torch.optim.SGD(biases.values(), lr=0.1)
        b.train()
        b.encode_image(_images(2, 32)).proj.square().sum().backward()
        opt.step()
    finally:
        for p in biases.values():
            p.requires_grad_(False)
    after = b.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == set(biases)


# --------------------------------------------------------------------------------------------------
# names, files, spec
# --------------------------------------------------------------------------------------------------
def _tiny_files(tiny_vit_json: Path, tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(1)
    src = create_backbone(f"json:{tiny_vit_json}")
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, str(weights))
    return src, weights


def test_json_with_weights_and_local_dir_round_trip(tiny_vit_json: Path, tmp_path: Path) -> None:
    src, weights = _tiny_files(tiny_vit_json, tmp_path)
    x = _images(2, 32)
    with torch.no_grad():
        want = src.encode_image(x).proj
        a = create_backbone(f"json:{tiny_vit_json}@{weights}")
        assert torch.equal(a.encode_image(x).proj, want)
    folder = tmp_path / "model"
    folder.mkdir()
    preprocess_cfg = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bilinear"}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": json.loads(tiny_vit_json.read_text()),
                                                               "preprocess_cfg": preprocess_cfg}))
    (folder / "open_clip_model.safetensors").write_bytes(weights.read_bytes())
    c = create_backbone(f"local-dir:{folder}")
    with torch.no_grad():
        assert torch.equal(c.encode_image(x).proj, want)
    assert c.preprocess.mean == (0.5, 0.5, 0.5) and c.preprocess.interpolation == "bilinear"
    # identity: same weights -> same fingerprint; JSON-able spec that names weights and preprocessing
    assert a.fingerprint == create_backbone(f"json:{tiny_vit_json}@{weights}").fingerprint
    assert a.fingerprint != src.fingerprint
    spec = json.loads(json.dumps(a.spec))
    assert spec["fingerprint"] == a.fingerprint and spec["preprocess"]["image_size"] == 32
    assert spec["weights"] == str(weights) and spec["tower"] == "vit"


def test_synthetic_names_resolve_through_model_files(tiny_vit_json: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from tailclip import synthetic

    _, weights = _tiny_files(tiny_vit_json, tmp_path)
    monkeypatch.setattr(synthetic, "model_files", lambda name: (tiny_vit_json, weights))
    b = create_backbone("synthetic:tiny-clip")
    assert b.spec["name"] == "synthetic:tiny-clip" and b.spec["weights"] == str(weights)


def test_pretrained_file_found_in_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ARCH@TAG resolves through open_clip's pretrained cfg to a file in a Hugging Face cache (no network)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snap = tmp_path / "models--org--clip-repo" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (tmp_path / "models--org--clip-repo" / "refs").mkdir()
    (tmp_path / "models--org--clip-repo" / "refs" / "main").write_text("abc123")
    (snap / "open_clip_pytorch_model.bin").write_bytes(b"weights")
    pcfg = {"hf_hub": "org/clip-repo/", "url": ""}
    found = resolve_pretrained_file("X@tag", pcfg, cache_dir=str(tmp_path))
    assert found == str(snap / "open_clip_pytorch_model.bin")
    assert len(file_sha256(found)) == 64


def test_missing_pretrained_weights_error_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError) as err:
        create_backbone("ViT-B-16@openai", cache_dir=str(tmp_path / "empty"))
    msg = str(err.value)
    assert "timm/vit_base_patch16_clip_224.openai" in msg and "open_clip_pytorch_model.bin" in msg
    assert "ViT-B-16.pt" in msg  # the URL alternative
    assert "ARCH@/path/to/file" in msg and "local-dir:" in msg and "model.cache_dir" in msg


def test_missing_files_and_unknown_names(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "ckpt.pt"
    with pytest.raises(WeightsNotFoundError, match=str(missing)):
        create_backbone(f"ViT-B-16@{missing}")
    with pytest.raises(WeightsNotFoundError, match="open_clip_config.json"):
        (tmp_path / "empty-dir").mkdir()
        create_backbone(f"local-dir:{tmp_path / 'empty-dir'}")
    with pytest.raises(WeightsNotFoundError, match="missing config.json"):
        create_backbone(f"hf:{tmp_path / 'empty-dir'}")
    with pytest.raises(UnknownNameError, match="ViT-B-16"):
        create_backbone("ViT-B-61@openai")
    with pytest.raises(UnknownNameError, match="openai"):
        create_backbone("ViT-B-16@not-a-tag")
    with pytest.raises(UnknownNameError, match="needs a pretrained tag"):
        create_backbone("ViT-B-16")


def test_list_models() -> None:
    names = list_models()
    assert {"ViT-B-16@openai", "RN50@openai", "ViT-L-14@laion2b_s32b_b82k", "hf-hub:org/repo"} <= set(names)
    assert "synthetic:tiny-clip" in names


def test_unsupported_vit_variant_falls_back_with_warning(tmp_path: Path) -> None:
    from conftest import TINY_VIT

    cfg = json.loads(json.dumps(TINY_VIT))
    cfg["vision_cfg"]["qk_norm"] = True  # open_clip's custom block: not reproduced by our forward
    path = tmp_path / "qknorm.json"
    path.write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="not supported by tailclip's ViT forward"):
        b = create_backbone(f"json:{path}")
    x = _images(2, 32)
    with torch.no_grad():
        f = b.encode_image(x)
        assert torch.equal(f.proj, b.model.encode_image(x))
    assert b.hooks.names() == [] and b.tap_names() == [] and b.visual_proj is None
    with pytest.raises(KeyError):
        b.encode_image(x, taps=["blocks.0"])


def test_an_open_clip_without_the_private_vit_steps_falls_back_to_its_own_forward(tiny_vit_json) -> None:
    """tailclip's ViT forward calls open_clip's private `_embeds` and `_pool`; an open_clip without them is named as
    the reason the tower runs open_clip's own forward (no hooks, no taps) instead of failing mid-forward."""
    from tailclip.backbones import create_backbone
    from tailclip.backbones.openclip import _unsupported_vit_reason

    visual = create_backbone(f"json:{tiny_vit_json}").model.visual
    assert _unsupported_vit_reason(visual) is None
    visual._pool = None  # (an instance attribute hides the method, as a release without it would)
    assert "_embeds/_pool" in (_unsupported_vit_reason(visual) or "")
