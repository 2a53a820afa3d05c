"""Hugging Face `transformers.CLIPModel` behind the Backbone contract, local files only.

The vision tower runs the same block loop (and hook points) as the open_clip ViT; HF keeps q/k/v as three
projections, so the fused (B, N, 3d) q/k/v the `qkv` hook sees is built by concatenating their weights. The text
tower runs the same loop with causal attention, from token embeddings on (prompt learning), so its forward does
not depend on how the installed transformers version builds masks; only its pooling rule is read from HF."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import WeightsNotFoundError
from .base import Backbone, HookPoints, ImageFeatures, Preprocess
from .fingerprint import combined_fingerprint, file_sha256, params_sha256
from .openclip import BlockView, check_taps, run_blocks, run_blocks_fast, vit_tap_names
from .weights import cached_hf_file, hf_cache_dirs

log = logging.getLogger(__name__)

# CLIP's own normalisation constants (used when the repo carries no preprocessor_config.json)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _identity(x: Tensor) -> Tensor:
    return x


def _hf_block_view(layer: nn.Module) -> BlockView:
    attn = layer.self_attn

    def qkv(x: Tensor) -> Tensor:
        w = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
        b = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
        return F.linear(x, w, b)

    return BlockView(
        ln_1=layer.layer_norm1,
        qkv=qkv,
        out=attn.out_proj,
        ls_1=_identity,
        ln_2=layer.layer_norm2,
        mlp=layer.mlp,
        ls_2=_identity,
        heads=attn.num_heads,
    )


class HFClipBackbone(Backbone):
    """A frozen transformers CLIPModel with tailclip's ViT forward (hooks and taps as for open_clip)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Callable[[Sequence[str]], Tensor],
        name: str,
        preprocess: Preprocess,
        spec: dict[str, Any],
        weights: Path | None,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.preprocess = preprocess
        self._weights = weights
        self._fingerprint: str | None = None
        vcfg = model.config.vision_config
        self.arch = "vit"
        self.width = int(vcfg.hidden_size)
        self.embed_dim = int(model.config.projection_dim)
        self.text_width = int(model.config.text_config.hidden_size)
        self.num_blocks = int(vcfg.num_hidden_layers)
        self.patch_size = int(vcfg.patch_size)
        self.logit_scale = float(model.logit_scale.detach().exp().item())
        self.hooks = HookPoints(self.num_blocks)
        self._tap_names = vit_tap_names(self.num_blocks)
        self._spec = {**spec, "tower": "vit"}

    @property
    def fingerprint(self) -> str:  # type: ignore[override]
        if self._fingerprint is None:
            wid = file_sha256(self._weights) if self._weights is not None else "params:" + params_sha256(self.model)
            self._fingerprint = combined_fingerprint(wid, self.model.config.to_dict(), "transformers")
        return self._fingerprint

    @property
    def spec(self) -> dict[str, Any]:  # type: ignore[override]
        return {**self._spec, "fingerprint": self.fingerprint}

    @property
    def visual_proj(self) -> Tensor:
        return self.model.visual_projection.weight.t()

    def block_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        layers = self.model.vision_model.encoder.layers
        yield from (("model.vision_model.encoder.layers." + n, p) for n, p in layers.named_parameters())

    def vision_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        yield from (("model.vision_model." + n, p) for n, p in self.model.vision_model.named_parameters())
        yield from (("model.visual_projection." + n, p) for n, p in self.model.visual_projection.named_parameters())

    def encode_image(self, images: Tensor, taps: Sequence[str] = ()) -> ImageFeatures:
        wanted = check_taps(taps, self._tap_names) if taps else set()
        vm = self.model.vision_model
        blocks = [_hf_block_view(layer) for layer in vm.encoder.layers]
        x = vm.pre_layrnorm(vm.embeddings(images))
        if self.hooks or wanted:
            x, tapped = run_blocks(x, blocks, self.hooks, wanted)
        else:
            x, tapped = run_blocks_fast(x, blocks), {}
        pooled = vm.post_layernorm(x[:, 0])
        return ImageFeatures(pre_proj=pooled, proj=self.model.visual_projection(pooled), taps=tapped)

    def tokenize(self, prompts: Sequence[str]) -> Tensor:
        return self.tokenizer(list(prompts)).to(self.model.logit_scale.device)

    def encode_text(self, prompts: Sequence[str]) -> Tensor:
        """(N, D) un-normalised text features, equal to CLIPModel.get_text_features on the same ids."""
        ids = self.tokenize(prompts)
        return self.encode_text_embeddings(self.token_embedding(ids), self.eot_positions(ids))

    def token_embedding(self, token_ids: Tensor) -> Tensor:
        return self.model.text_model.embeddings.token_embedding(token_ids)

    def eot_positions(self, token_ids: Tensor) -> Tensor:
        """HF CLIP's pooling rule: configs with the legacy eos_token_id 2 pool at the largest id (argmax), others
        at the first `eos_token_id` (padding may reuse that id, so the first occurrence)."""
        eos = getattr(self.model.text_model, "eos_token_id", self.model.config.text_config.eos_token_id)
        ids = token_ids.to(torch.int)
        return ids.argmax(dim=-1) if eos == 2 else (ids == eos).int().argmax(dim=-1)

    def encode_text_embeddings(self, token_embeddings: Tensor, eot_positions: Tensor) -> Tensor:
        """CLIPTextModel's forward from the token embeddings on: position embeddings, the encoder under a causal
        mask (padding never reaches the pooled token, so no padding mask is needed), final LayerNorm, the feature
        at `eot_positions`, text_projection."""
        tm = self.model.text_model
        n = token_embeddings.shape[1]
        pos = tm.embeddings.position_embedding.weight
        if n > pos.shape[0]:
            raise ValueError(f"{n} token embeddings exceed the context length {pos.shape[0]}")
        x = token_embeddings + pos[:n]
        x = run_blocks_fast(x, [_hf_block_view(layer) for layer in tm.encoder.layers], causal=True)
        x = tm.final_layer_norm(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot_positions.to(x.device)]
        return self.model.text_projection(x)


def _make_tokenizer(source: str, cache_dir: str | None, context_length: int) -> Callable:
    """The repo's CLIP tokenizer when its files are local; else open_clip's bundled BPE tokenizer (same
    vocabulary and EOT id as OpenAI CLIP; the causal text tower makes its padding irrelevant)."""
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(source, local_files_only=True, cache_dir=cache_dir)

        def hf_tokenize(prompts: Sequence[str]) -> Tensor:
            enc = tok(list(prompts), padding=True, truncation=True, max_length=context_length, return_tensors="pt")
            return enc["input_ids"]

        return hf_tokenize
    except Exception as e:  # noqa: BLE001 - no tokenizer files: fall back, say so in the log
        log.info("no local tokenizer files for %s (%s); using open_clip's CLIP BPE tokenizer", source, type(e).__name__)
        from open_clip.tokenizer import SimpleTokenizer

        return SimpleTokenizer(context_length=context_length)


def _preprocess(source: str, cache_dir: str | None, image_size: int) -> Preprocess:
    try:
        from transformers import CLIPImageProcessor

        proc = CLIPImageProcessor.from_pretrained(source, local_files_only=True, cache_dir=cache_dir)
        crop = proc.crop_size
        size = int(crop["height"]) if isinstance(crop, dict) else int(crop or image_size)
        resample = proc.resample
        interp = _RESAMPLE.get(int(resample), "bicubic") if resample is not None else "bicubic"
        return Preprocess(size, tuple(proc.image_mean), tuple(proc.image_std), interp, "shortest")  # type: ignore[arg-type]
    except Exception as e:  # noqa: BLE001 - no preprocessor_config.json: CLIP's constants
        log.info("no local image processor for %s (%s); using CLIP's constants", source, type(e).__name__)
        return Preprocess(image_size, CLIP_MEAN, CLIP_STD, "bicubic", "shortest")


def create_hf_backbone(name: str, cache_dir: str | None = None) -> HFClipBackbone:
    """`hf:org/repo` (from the local Hugging Face cache) or `hf:/path/to/folder` (save_pretrained layout)."""
    try:
        from transformers import CLIPModel
    except ImportError as e:  # pragma: no cover - transformers is an optional extra
        raise WeightsNotFoundError(f"{name!r} needs transformers: pip install 'tailclip[hf]' ({e})") from None
    ref = name[len("hf:"):]
    folder = Path(ref).expanduser()
    is_path = ref.startswith(("/", ".", "~")) or folder.exists()
    if is_path:
        if not folder.is_dir():
            raise WeightsNotFoundError(f"Hugging Face model folder not found: {folder} (from {name!r})")
        weights = next((folder / f for f in _WEIGHT_FILES if (folder / f).is_file()), None)
        missing = [f for f in ("config.json",) if not (folder / f).is_file()]
        missing += [] if weights else [" or ".join(_WEIGHT_FILES)]
        if missing:
            raise WeightsNotFoundError(f"{name!r}: missing {', '.join(missing)} in {folder}")
        source = str(folder)
    else:
        weights_str = next((w for f in _WEIGHT_FILES if (w := cached_hf_file(ref, f, cache_dir))), None)
        weights = Path(weights_str) if weights_str else None
        source = ref
    try:
        model = CLIPModel.from_pretrained(source, local_files_only=True, cache_dir=cache_dir)
    except (OSError, ValueError) as e:
        where = ", ".join(str(d) for d in hf_cache_dirs(cache_dir))
        raise WeightsNotFoundError(
            f"Hugging Face CLIPModel {ref!r} is not available locally: missing config.json and "
            f"{' or '.join(_WEIGHT_FILES)} of repo {ref} (looked in {where}; {type(e).__name__}). Download it where "
            f"there is internet (`huggingface-cli download {ref}`) and set `model.cache_dir=` to that cache, or "
            "pass `model.name=hf:/path/to/folder`."
        ) from None
    model.eval()
    tcfg, vcfg = model.config.text_config, model.config.vision_config
    tokenizer = _make_tokenizer(source, cache_dir, int(tcfg.max_position_embeddings))
    preprocess = _preprocess(source, cache_dir, int(vcfg.image_size))
    spec = {"name": name, "source": "transformers", "arch": "CLIPModel", "pretrained": ref,
            "weights": str(weights) if weights else None, "preprocess": preprocess.to_dict()}
    return HFClipBackbone(model, tokenizer, name, preprocess, spec, weights)
