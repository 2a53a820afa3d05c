"""`create_backbone(name)`: one call from a model name to a ready, frozen Backbone whose preprocessing and
identity (spec, fingerprint) travel with it.

Name forms (also printed by `tailclip list models`):
  ARCH@TAG             open_clip architecture + pretrained tag    ViT-B-16@openai, RN50@openai
  ARCH@none            random init (benchmarks)                   ViT-B-16@none
  ARCH@/path/file.pt   open_clip architecture + local checkpoint (.pt, .pth, .bin, .safetensors); OpenAI's
                       TorchScript release switches QuickGELU on, an undecidable file needs ARCH-quickgelu@...
  hf-hub:org/repo      open_clip model on the Hugging Face Hub (open_clip_config.json + weights)
  local-dir:PATH       a folder holding open_clip_config.json + weights (open_clip's local-dir: schema)
  hf:org/repo, hf:/dir transformers CLIPModel, local files only
  json:CFG.json[@W]    an open_clip model config JSON, random weights or weights file W (tests)
  synthetic:NAME       tailclip's built-in tiny CLIP (tailclip.synthetic.model_files)

Where weights are found (and the messages when they are not) lives in `weights.py`; fingerprints in
`fingerprint.py`."""

from __future__ import annotations

import copy
import difflib
import json
import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, UnknownNameError, WeightsNotFoundError
from .base import Backbone, Preprocess
from .fingerprint import combined_fingerprint, file_sha256, params_sha256
from .hf import create_hf_backbone
from .openclip import OpenClipBackbone
from .weights import (
    checkpoint_quick_gelu,
    fetch_hf_file,
    find_checkpoint_in_dir,
    is_torchscript_archive,
    resolve_pretrained_file,
)

log = logging.getLogger(__name__)

NAME_FORMS = [
    "ARCH@TAG",
    "ARCH@none",
    "ARCH@/path/to/checkpoint.(pt|bin|safetensors)",
    "hf-hub:org/repo",
    "local-dir:PATH",
    "hf:org/repo",
    "hf:/local/path",
    "json:PATH.json[@weights.safetensors]",
    "synthetic:NAME",
]
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
RANDOM_TAGS = ("none", "random")


# --------------------------------------------------------------------------------------------------
# listing
# --------------------------------------------------------------------------------------------------
def list_models() -> list[str]:
    """The accepted name forms, the built-in synthetic models, then every open_clip `ARCH@TAG`."""
    import open_clip

    names = list(NAME_FORMS)
    try:
        from .. import synthetic

        names += [f"synthetic:{m}" for m in getattr(synthetic, "MODELS", ())]
    except ImportError:  # pragma: no cover - the synthetic package is part of tailclip
        pass
    names += [f"{arch}@{tag}" for arch, tag in open_clip.list_pretrained()]
    return names


# --------------------------------------------------------------------------------------------------
# the factory
# --------------------------------------------------------------------------------------------------
def create_backbone(name: str, cache_dir: str | None = None, device: str | torch.device = "cpu",
                    memory_format: str = "auto") -> Backbone:
    """Build a frozen Backbone (eval mode, requires_grad False) on `device` from any accepted name form.

    memory_format (model.memory_format): channels_last stores the conv weights channels-last, which makes every
    convolution run channels-last (inputs are converted by the first conv); auto picks it for ResNet towers."""
    name = name.strip()
    if name.startswith("synthetic:"):
        backbone = _from_synthetic(name)
    elif name.startswith("json:"):
        backbone = _from_json_name(name)
    elif name.startswith("hf-hub:"):
        backbone = _from_hf_hub(name, cache_dir)
    elif name.startswith("local-dir:"):
        backbone = _from_local_dir(name)
    elif name.startswith("hf:"):
        backbone = create_hf_backbone(name, cache_dir=cache_dir)
    elif "@" in name:
        backbone = _from_arch(name, cache_dir)
    else:
        raise UnknownNameError(_bare_name_message(name))
    backbone.requires_grad_(False)
    backbone.eval()
    backbone = backbone.to(torch.device(device))
    if memory_format == "channels_last" or (memory_format == "auto" and backbone.patch_size is None):
        backbone = backbone.to(memory_format=torch.channels_last)
    return backbone


def _bare_name_message(name: str) -> str:
    import open_clip

    if name in open_clip.list_models():
        tags = open_clip.list_pretrained_tags_by_model(name)
        example = f"{name}@{tags[0]}" if tags else f"{name}@none"
        return (
            f"model name {name!r} needs a pretrained tag, e.g. {example!r} (tags for {name}: "
            f"{', '.join(tags) or 'none'}; `{name}@none` = random init, `{name}@/path/file.pt` = a checkpoint)"
        )
    if name.count("/") == 1 and not name.startswith(("/", ".")):
        return f"unknown model {name!r}; for a Hugging Face repo write 'hf:{name}' (CLIPModel) or 'hf-hub:{name}'"
    return f"unknown model {name!r}; accepted forms: {', '.join(NAME_FORMS)} (`tailclip list models` lists all)"


# --------------------------------------------------------------------------------------------------
# ARCH@TAG / ARCH@none / ARCH@file
# --------------------------------------------------------------------------------------------------
def _from_arch(name: str, cache_dir: str | None) -> Backbone:
    import open_clip

    arch, tag = name.split("@", 1)
    arch = arch.replace("/", "-")  # open_clip accepts ViT-B/16 spelled with a slash
    known = open_clip.list_models()
    if arch not in known:
        close = difflib.get_close_matches(arch, known, n=6, cutoff=0.5)
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise UnknownNameError(f"unknown open_clip architecture {arch!r}{hint} (`tailclip list models` lists all)")
    model_cfg = open_clip.get_model_config(arch)
    preprocess_overlay: dict[str, Any] = {}
    pretrained: str | None = tag

    if tag.lower() in RANDOM_TAGS:
        weights, pretrained = None, None
    elif _looks_like_path(tag):
        path = Path(tag).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(
                f"checkpoint file not found: {path} (from model name {name!r}); give the path of an existing "
                f"{'/'.join(CHECKPOINT_SUFFIXES)} file, or use ARCH@TAG for a released checkpoint"
            )
        weights = path
        if not model_cfg.get("quick_gelu") and _path_quick_gelu(arch, path, known):
            model_cfg["quick_gelu"] = True
    else:
        pcfg = open_clip.get_pretrained_cfg(arch, tag)
        if not pcfg:
            tags = open_clip.list_pretrained_tags_by_model(arch)
            raise UnknownNameError(
                f"unknown pretrained tag {tag!r} for {arch}; known tags: {', '.join(tags) or '(none)'}; "
                f"or use {arch}@none (random) / {arch}@/path/to/checkpoint.pt"
            )
        weights = Path(resolve_pretrained_file(name, pcfg, cache_dir))
        preprocess_overlay = pcfg
        if pcfg.get("quick_gelu") and not model_cfg.get("quick_gelu"):
            # OpenAI weights were trained with QuickGELU; open_clip 3.x only warns about the mismatch, we fix it
            model_cfg["quick_gelu"] = True
    model = build_openclip_model(model_cfg, weights)
    spec = {"name": name, "source": "open_clip", "arch": arch, "pretrained": pretrained,
            "weights": str(weights) if weights else None}
    tokenizer = _tokenizer(model_cfg, builtin_arch=arch, cache_dir=cache_dir)
    return _wrap(model, model_cfg, tokenizer, name, spec, preprocess_overlay, weights)


def _path_quick_gelu(arch: str, path: Path, known: list[str]) -> bool:
    """QuickGELU for a checkpoint file given as ARCH@/path, as `ARCH@openai` switches it on for OpenAI's weights
    (open_clip builds ARCH with GELU; the wrong activation shifts features by ~2e-2). Refuses when the file cannot
    tell, so the activation is never guessed silently."""
    quick = checkpoint_quick_gelu(arch, path)
    if quick is None:
        explicit = f"{arch}-quickgelu" if f"{arch}-quickgelu" in known else None
        say_quick = (f"`{explicit}@{path}`" if explicit
                     else 'a `json:CONFIG.json@PATH` config with "quick_gelu": true')
        raise ConfigError(
            f"cannot tell whether {path} holds weights trained with QuickGELU (OpenAI, DFN, MetaCLIP releases of "
            f"{arch}) or with GELU: it is a plain state dict in OpenAI's key layout. Say it explicitly: {say_quick} "
            f"for QuickGELU weights; for GELU weights use `local-dir:DIR` (open_clip_config.json next to the file) "
            f"or `json:CONFIG.json@{path}`."
        )
    if quick:
        log.info("%s: OpenAI-layout / QuickGELU checkpoint, building %s with QuickGELU", path, arch)
    return quick


def _looks_like_path(tag: str) -> bool:
    return os.sep in tag or "/" in tag or tag.startswith((".", "~")) or tag.lower().endswith(CHECKPOINT_SUFFIXES)


# --------------------------------------------------------------------------------------------------
# hf-hub: / local-dir: / json: / synthetic:
# --------------------------------------------------------------------------------------------------
def _from_hf_hub(name: str, cache_dir: str | None) -> Backbone:
    from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    repo = name[len("hf-hub:"):]
    cfg_path = Path(fetch_hf_file(name, repo, [HF_CONFIG_NAME], cache_dir))
    config = json.loads(cfg_path.read_text())
    model_cfg = config.get("model_cfg", config)
    weights = Path(fetch_hf_file(name, repo, [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME], cache_dir))
    model = build_openclip_model(model_cfg, weights)
    spec = {"name": name, "source": "open_clip", "arch": repo, "pretrained": repo, "weights": str(weights)}
    tokenizer = _tokenizer(model_cfg, source_dir=cfg_path.parent, cache_dir=cache_dir)
    return _wrap(model, model_cfg, tokenizer, name, spec, config.get("preprocess_cfg", {}), weights)


def _from_local_dir(name: str) -> Backbone:
    folder = Path(name[len("local-dir:"):]).expanduser()
    if not folder.is_dir():
        raise WeightsNotFoundError(f"model folder not found: {folder} (from {name!r})")
    cfg_path = folder / "open_clip_config.json"
    if not cfg_path.is_file():
        raise WeightsNotFoundError(f"{name!r}: missing {cfg_path} (open_clip's model config for local-dir:)")
    config = json.loads(cfg_path.read_text())
    if "model_cfg" not in config:
        raise WeightsNotFoundError(f"{cfg_path} has no 'model_cfg' entry (open_clip_config.json format)")
    weights = find_checkpoint_in_dir(folder)
    if weights is None:
        raise WeightsNotFoundError(
            f"{name!r}: no weights in {folder}; expected one of open_clip_model.safetensors, "
            f"open_clip_pytorch_model.bin, model.safetensors, pytorch_model.bin (or any *.safetensors/*.bin/*.pth)"
        )
    model_cfg = config["model_cfg"]
    model = build_openclip_model(model_cfg, weights)
    spec = {"name": name, "source": "open_clip", "arch": folder.name, "pretrained": str(folder),
            "weights": str(weights)}
    tokenizer = _tokenizer(model_cfg, source_dir=folder)
    return _wrap(model, model_cfg, tokenizer, name, spec, config.get("preprocess_cfg", {}), weights)


def _from_json_name(name: str) -> Backbone:
    rest = name[len("json:"):]
    cfg_str, sep, weights_str = rest.partition(".json@")
    cfg_path = Path(cfg_str + ".json" if sep else cfg_str).expanduser()
    weights = Path(weights_str).expanduser() if sep else None
    return from_json(cfg_path, weights, name=name)


def _from_synthetic(name: str) -> Backbone:
    from .. import synthetic  # imported lazily: the synthetic world pulls in image generation code

    cfg_path, weights = synthetic.model_files(name[len("synthetic:"):])
    return from_json(Path(cfg_path), Path(weights), name=name)


def from_json(cfg_path: Path, weights: Path | None, name: str) -> Backbone:
    """An open_clip model from a config JSON (a bare model config or {"model_cfg", "preprocess_cfg"})."""
    if not cfg_path.is_file():
        raise WeightsNotFoundError(f"model config not found: {cfg_path} (from {name!r})")
    if weights is not None and not weights.is_file():
        raise WeightsNotFoundError(f"weights file not found: {weights} (from {name!r})")
    config = json.loads(cfg_path.read_text())
    model_cfg = config.get("model_cfg", config)
    model = build_openclip_model(model_cfg, weights)
    spec = {"name": name, "source": "open_clip", "arch": cfg_path.stem, "pretrained": str(weights) if weights else None,
            "weights": str(weights) if weights else None, "model_cfg": model_cfg}
    return _wrap(model, model_cfg, _tokenizer(model_cfg), name, spec, config.get("preprocess_cfg", {}), weights)


# --------------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------------
def build_openclip_model(model_cfg: dict[str, Any], weights: Path | None) -> nn.Module:
    """Instantiate open_clip's model class for `model_cfg` (never downloading base tower weights) and load
    `weights` strictly with open_clip's own loader (which converts OpenAI / timm / big_vision layouts)."""
    from open_clip.coca_model import CoCa
    from open_clip.factory import load_checkpoint
    from open_clip.model import CLIP, CustomTextCLIP

    cfg = copy.deepcopy(model_cfg)
    vision_cfg, text_cfg = cfg.setdefault("vision_cfg", {}), cfg.setdefault("text_cfg", {})
    if "timm_model_name" in vision_cfg:
        vision_cfg["timm_model_pretrained"] = False
    is_hf_text = "hf_model_name" in text_cfg
    if is_hf_text:
        text_cfg["hf_model_pretrained"] = False
    custom_text = cfg.pop("custom_text", False) or is_hf_text
    cls = (CoCa if "multimodal_cfg" in cfg else CustomTextCLIP) if custom_text else CLIP
    try:
        model = cls(**cfg)
    except OSError as e:  # an HF text tower whose config is not cached
        raise WeightsNotFoundError(f"could not build the text tower offline: {e}") from None
    if weights is not None:
        log.info("loading weights from %s", weights)
        jit = is_torchscript_archive(weights)  # OpenAI's release format: torch.load refuses it with weights_only
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*looks like a TorchScript archive")
            warnings.filterwarnings("ignore", message=".*torch.jit.load. is deprecated")
            load_checkpoint(model, str(weights), strict=True, weights_only=not jit)
    return model.eval()


def _preprocess(model: nn.Module, overlay: dict[str, Any]) -> Preprocess:
    """open_clip's PreprocessCfg defaults, overlaid with the pretrained/hub config, sized like the model."""
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    cfg = merge_preprocess_dict(PreprocessCfg(), dict(overlay or {}))
    size = getattr(model.visual, "image_size", cfg["size"])
    if isinstance(size, (tuple, list)):
        if len(set(size)) > 1:
            log.warning("non-square model input %s; recording the first side as image_size", size)
        size = size[0]
    return Preprocess(
        image_size=int(size),
        mean=tuple(float(v) for v in cfg["mean"]),  # type: ignore[arg-type]
        std=tuple(float(v) for v in cfg["std"]),  # type: ignore[arg-type]
        interpolation=str(cfg["interpolation"]),
        resize_mode=str(cfg["resize_mode"]),
    )


def _tokenizer(
    model_cfg: dict[str, Any],
    builtin_arch: str | None = None,
    source_dir: Path | None = None,
    cache_dir: str | None = None,
) -> Callable:
    """open_clip's tokenizer for the model. The default BPE tokenizer ships with open_clip (offline); models
    with a Hugging Face tokenizer need its files locally (the hub/local folder or the HF cache)."""
    import open_clip
    from open_clip.tokenizer import SimpleTokenizer

    text_cfg = model_cfg.get("text_cfg", {})
    siglip = builtin_arch is not None and "siglip" in builtin_arch.lower()
    needs_hf = bool(text_cfg.get("hf_tokenizer_name")) or siglip
    if not needs_hf:
        return SimpleTokenizer(context_length=text_cfg.get("context_length", 77),
                               **text_cfg.get("tokenizer_kwargs", {}))
    source = f"local-dir:{source_dir}" if source_dir is not None else (builtin_arch or "")
    try:
        return open_clip.get_tokenizer(source, cache_dir=cache_dir)
    except Exception as e:  # noqa: BLE001 - any failure here is "tokenizer files not available"
        hf_name = text_cfg.get("hf_tokenizer_name") or builtin_arch
        raise WeightsNotFoundError(
            f"tokenizer files for {hf_name!r} are not available offline ({type(e).__name__}: {str(e)[:200]}). "
            "Put the tokenizer files next to the weights and use `local-dir:DIR`, or set `model.cache_dir`."
        ) from None


def _wrap(
    model: nn.Module,
    model_cfg: dict[str, Any],
    tokenizer: Callable,
    name: str,
    spec: dict[str, Any],
    preprocess_overlay: dict[str, Any],
    weights: Path | None,
) -> Backbone:
    preprocess = _preprocess(model, preprocess_overlay)
    spec = {**spec, "preprocess": preprocess.to_dict()}
    spec.setdefault("model_cfg", model_cfg)

    def fingerprint(current: nn.Module) -> str:  # takes the module so a deep copy hashes its own weights
        weights_id = file_sha256(weights) if weights is not None else "params:" + params_sha256(current)
        return combined_fingerprint(weights_id, model_cfg, "open_clip")

    return OpenClipBackbone(model, tokenizer, name, preprocess, spec, fingerprint)
