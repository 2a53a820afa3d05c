"""ARCH@/path checkpoints: OpenAI's TorchScript release switches QuickGELU on (as ARCH@openai does), recognisable
releases follow their tag, and a plain OpenAI-layout state dict that could be either activation is refused with a
message naming ARCH-quickgelu."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from conftest import TINY_VIT
from safetensors.torch import save_file
from torch import nn

from tailclip.backbones import create_backbone
from tailclip.backbones.weights import checkpoint_quick_gelu, is_torchscript_archive
from tailclip.errors import ConfigError

ARCH = "TinyTest-ViT"


@pytest.fixture
def tiny_arch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Register a tiny open_clip architecture (+ its -quickgelu twin) with an OpenAI-like QuickGELU release and a
    GELU release, and one architecture without any QuickGELU release."""
    import open_clip.factory as ocf
    import open_clip.pretrained as ocp

    cfg = json.loads(json.dumps(TINY_VIT))
    monkeypatch.setitem(ocf._MODEL_CONFIGS, ARCH, cfg)
    monkeypatch.setitem(ocf._MODEL_CONFIGS, f"{ARCH}-quickgelu", {**cfg, "quick_gelu": True})
    monkeypatch.setitem(ocf._MODEL_CONFIGS, "TinyTest-Plain", cfg)
    monkeypatch.setitem(ocp._PRETRAINED, ARCH, {
        "openai": ocp._pcfg(url="https://openaipublic.example/clip/TinyTest-ViT.pt", hf_hub="timm/tiny_vit.openai/",
                            quick_gelu=True),
        "laion": ocp._pcfg(hf_hub="laion/tiny-vit-laion/"),
    })
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def quick_model() -> nn.Module:
    """A tiny CLIP built with QuickGELU: the stand-in for OpenAI's weights."""
    from tailclip.backbones.factory import build_openclip_model

    torch.manual_seed(3)
    return build_openclip_model({**json.loads(json.dumps(TINY_VIT)), "quick_gelu": True}, None)


class _Holder(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def save_openai_jit(model: nn.Module, path: Path) -> None:
    """A TorchScript archive laid out as OpenAI's CLIP releases: the CLIP state dict plus the
    input_resolution / context_length / vocab_size entries of their JIT modules."""
    root = _Holder()
    extra = {"input_resolution": torch.tensor(32), "context_length": torch.tensor(77),
             "vocab_size": torch.tensor(49408)}
    for key, value in {**model.state_dict(), **extra}.items():
        *parents, leaf = key.split(".")
        mod = root
        for p in parents:
            if p not in mod._modules:
                mod.add_module(p, _Holder())
            mod = mod._modules[p]
        mod.register_buffer(leaf, value.detach().clone())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.* deprecation notices
        torch.jit.save(torch.jit.script(root), str(path))


def _flat(model: nn.Module, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    else:
        torch.save(model.state_dict(), path)
    return path


def _images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_openai_jit_archive_switches_quick_gelu_on(tiny_arch: None, quick_model: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "TinyTest-ViT.pt"
    save_openai_jit(quick_model, path)
    assert is_torchscript_archive(path)
    b = create_backbone(f"{ARCH}@{path}")
    assert b.spec["model_cfg"]["quick_gelu"] is True
    # the same weights under GELU: what ARCH@/path built before
    (tmp_path / "gelu.json").write_text(json.dumps(TINY_VIT))
    gelu = create_backbone(f"json:{tmp_path / 'gelu.json'}@{_flat(quick_model, tmp_path / 'w.safetensors')}")
    x = _images()
    with torch.no_grad():
        want = quick_model.encode_image(x)
        assert (b.encode_image(x).proj - want).abs().max().item() <= 1e-6
        assert (gelu.encode_image(x).proj - want).abs().max().item() > 1e-3


def test_plain_state_dict_is_refused_naming_quickgelu(tiny_arch: None, quick_model: nn.Module,
                                                      tmp_path: Path) -> None:
    path = _flat(quick_model, tmp_path / "mine.safetensors")
    assert checkpoint_quick_gelu(ARCH, path) is None
    with pytest.raises(ConfigError, match=f"`{ARCH}-quickgelu@{path}`") as err:
        create_backbone(f"{ARCH}@{path}")
    assert "local-dir:" in str(err.value)
    b = create_backbone(f"{ARCH}-quickgelu@{path}")  # the explicit spelling the message names
    x = _images()
    with torch.no_grad():
        assert torch.allclose(b.encode_image(x).proj, quick_model.encode_image(x), atol=1e-6)


def test_recognised_releases_and_architectures_without_quickgelu(tiny_arch: None, quick_model: nn.Module,
                                                                  tmp_path: Path) -> None:
    bin_file = _flat(quick_model, tmp_path / "src" / "open_clip_pytorch_model.bin")
    hub = tmp_path / "hub"
    for repo in ("timm/tiny_vit.openai", "laion/tiny-vit-laion"):
        snap = hub / f"models--{repo.replace('/', '--')}" / "snapshots" / "abc"
        snap.mkdir(parents=True)
        shutil.copy(bin_file, snap / "open_clip_pytorch_model.bin")
    openai_file = hub / "models--timm--tiny_vit.openai" / "snapshots" / "abc" / "open_clip_pytorch_model.bin"
    laion_file = hub / "models--laion--tiny-vit-laion" / "snapshots" / "abc" / "open_clip_pytorch_model.bin"
    assert checkpoint_quick_gelu(ARCH, openai_file) is True
    assert checkpoint_quick_gelu(ARCH, laion_file) is False
    assert checkpoint_quick_gelu(ARCH, bin_file) is None
    assert checkpoint_quick_gelu("TinyTest-Plain", bin_file) is False  # no release of it used QuickGELU
    assert create_backbone(f"{ARCH}@{openai_file}").spec["model_cfg"]["quick_gelu"] is True
    assert "quick_gelu" not in create_backbone(f"{ARCH}@{laion_file}").spec["model_cfg"]
    assert "quick_gelu" not in create_backbone(f"TinyTest-Plain@{bin_file}").spec["model_cfg"]
    # a layout OpenAI never shipped (no CLIP text tower keys) cannot be OpenAI weights
    partial = tmp_path / "visual.safetensors"
    save_file({k: v.contiguous() for k, v in quick_model.state_dict().items() if k.startswith("visual.")}, str(partial))
    assert checkpoint_quick_gelu(ARCH, partial) is False
