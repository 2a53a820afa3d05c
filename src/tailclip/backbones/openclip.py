"""Backbones around an open_clip CLIP: our own ViT vision-tower forward (contiguous q/k/v + SDPA) with
named hook points, a ResNet tower with layer1..4 taps, and open_clip's text tower and tokenizer.

We never edit open_clip's modules; the forward below reads their weights (`in_proj_weight`, `out_proj`,
`ln_*`, `mlp`, `ls_*`) so tuners plug in at hook points instead of monkey-patching CLIP."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from .base import HOOK_KINDS, Backbone, HookPoints, ImageFeatures, Preprocess

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# The generic pre-LN ViT block loop, shared by the open_clip and Hugging Face towers
# --------------------------------------------------------------------------------------------------
@dataclass
class BlockView:
    """What our forward needs from one pre-LN transformer block, whatever library built it.

    qkv(x_ln) -> (B, N, 3d) fused q/k/v projection; out(o) -> (B, N, d) output projection;
    ls_1 / ls_2: layer scale (identity when the model has none); mlp: the MLP module (fc, act, fc).
    """

    ln_1: Callable[[Tensor], Tensor]
    qkv: Callable[[Tensor], Tensor]
    out: Callable[[Tensor], Tensor]
    ls_1: Callable[[Tensor], Tensor]
    ln_2: Callable[[Tensor], Tensor]
    mlp: Callable[[Tensor], Tensor]
    ls_2: Callable[[Tensor], Tensor]
    heads: int


def attention(qkv: Tensor, heads: int, causal: bool = False) -> Tensor:
    """Multi-head self-attention from a fused (B, N, 3d) q/k/v tensor (`causal`: each token sees only itself
    and earlier tokens, as in CLIP's text tower).

    On CPU in reduced precision (bf16/fp16 autocast) q/k/v are made contiguous (one copy of the permuted
    tensor) before `scaled_dot_product_attention`: the CPU kernels are several times slower on the strided
    views nn.MultiheadAttention hands them, which is open_clip 3.3's bf16 slowdown. In fp32 and on CUDA the
    strided views (head_dim still unit-stride) are as fast, so the copy is skipped there (measured)."""
    b, n, three_d = qkv.shape
    d = three_d // 3
    qkv = qkv.view(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)  # (3, B, H, N, hd)
    if qkv.device.type == "cpu" and qkv.dtype != torch.float32:
        qkv = qkv.contiguous()
    q, k, v = qkv.unbind(0)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return o.transpose(1, 2).reshape(b, n, d)


def run_blocks_fast(x: Tensor, blocks: Sequence[BlockView], causal: bool = False) -> Tensor:
    """The block loop with no hooks and no taps: nothing but the arithmetic."""
    for blk in blocks:
        x = x + blk.ls_1(blk.out(attention(blk.qkv(blk.ln_1(x)), blk.heads, causal)))
        x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
    return x


def run_blocks(x: Tensor, blocks: Sequence[BlockView], hooks: HookPoints, taps: set[str]) -> tuple[Tensor, dict]:
    """The block loop applying every hook point (see base.HOOK_KINDS) and collecting the requested taps.

    Per block i: pre(x) -> x;  qkv(x_ln, qkv) -> qkv;  h = x + ls_1(attn);  attn(h) -> h;
    m = ls_2(mlp(ln_2(h)));  mlp(h, m) -> m;  x = h + m;  out(x) -> x.
    Taps: blocks.{i} = block output x, blocks.{i}.attn = h, blocks.{i}.mlp = m (after their hooks)."""
    out: dict[str, Tensor] = {}
    for i, blk in enumerate(blocks):
        p = f"blocks.{i}"
        for fn in hooks.get(f"{p}.pre"):
            x = fn(x)
        x_ln = blk.ln_1(x)
        qkv = blk.qkv(x_ln)
        for fn in hooks.get(f"{p}.qkv"):
            qkv = fn(x_ln, qkv)
        h = x + blk.ls_1(blk.out(attention(qkv, blk.heads)))
        for fn in hooks.get(f"{p}.attn"):
            h = fn(h)
        m = blk.ls_2(blk.mlp(blk.ln_2(h)))
        for fn in hooks.get(f"{p}.mlp"):
            m = fn(h, m)
        x = h + m
        for fn in hooks.get(f"{p}.out"):
            x = fn(x)
        if taps:
            if p in taps:
                out[p] = x
            if f"{p}.attn" in taps:
                out[f"{p}.attn"] = h
            if f"{p}.mlp" in taps:
                out[f"{p}.mlp"] = m
    return x, out


def vit_tap_names(num_blocks: int) -> list[str]:
    return [n for i in range(num_blocks) for n in (f"blocks.{i}", f"blocks.{i}.attn", f"blocks.{i}.mlp")]


def check_taps(taps: Sequence[str], known: Sequence[str]) -> set[str]:
    """Validate requested tap names up front (a typo should not silently return nothing)."""
    wanted = set(taps)
    bad = wanted.difference(known)
    if bad:
        sample = ", ".join(list(known)[:6]) + (", ..." if len(known) > 6 else "")
        raise KeyError(f"unknown tap(s) {sorted(bad)}; this backbone offers: {sample or '(none)'}")
    return wanted


# --------------------------------------------------------------------------------------------------
# open_clip backbone
# --------------------------------------------------------------------------------------------------
def _identity(x: Tensor) -> Tensor:
    return x


def _openclip_block_view(blk: nn.Module) -> BlockView:
    # read weights at call time: views are rebuilt every forward, so .to(), deepcopy and load_state_dict
    # never leave them pointing at stale tensors
    attn = blk.attn
    ls_1 = _identity if isinstance(blk.ls_1, nn.Identity) else blk.ls_1
    ls_2 = _identity if isinstance(blk.ls_2, nn.Identity) else blk.ls_2
    return BlockView(
        ln_1=blk.ln_1,
        qkv=lambda x: F.linear(x, attn.in_proj_weight, attn.in_proj_bias),
        out=lambda o: F.linear(o, attn.out_proj.weight, attn.out_proj.bias),
        ls_1=ls_1,
        ln_2=blk.ln_2,
        mlp=blk.mlp,
        ls_2=ls_2,
        heads=attn.num_heads,
    )


def _unsupported_vit_reason(visual: nn.Module) -> str | None:
    """Why our forward cannot reproduce this open_clip ViT exactly (None: it can)."""
    from open_clip.transformer import ResidualAttentionBlock

    if not (callable(getattr(visual, "_embeds", None)) and callable(getattr(visual, "_pool", None))):
        # our forward calls these two private open_clip steps; pyproject pins the releases where their source is the
        # same (3.0.0-3.3.0)
        return "an open_clip without VisionTransformer._embeds/_pool (tailclip supports open_clip_torch 3.0-3.3)"
    if getattr(visual, "attn_pool", None) is not None:
        return "attentional pooler"
    if not visual.transformer.batch_first:
        return "sequence-first transformer"
    for blk in visual.transformer.resblocks:
        if type(blk) is not ResidualAttentionBlock:
            return f"custom block type {type(blk).__name__}"
        if getattr(blk.attn, "in_proj_weight", None) is None:
            return "separate q/k/v projections"
        if hasattr(blk, "ln_1_kv"):
            return "cross-attention block"
    return None


def _causal_text_reason(model: nn.Module) -> str | None:
    """Why the text tower is not CLIP's causal tower pooled at a token position (None: it is)."""
    if not hasattr(model, "token_embedding"):
        return f"a separate text module ({type(getattr(model, 'text', None)).__name__})"
    if getattr(model, "attn_mask", None) is None:
        return "no causal attention mask"
    if getattr(model, "text_pool_type", None) not in ("argmax", "eos"):
        return f"text pooling {getattr(model, 'text_pool_type', None)!r}"
    return None


class OpenClipBackbone(Backbone):
    """A frozen open_clip CLIP. ViT towers run our own forward with hook points; ResNet towers expose
    layer1..layer4 taps and their attention pool; anything else falls back to open_clip's forward. The
    standard causal text tower (CLIP class) also runs from token embeddings (prompt learning)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Callable[..., Tensor],
        name: str,
        preprocess: Preprocess,
        spec: dict[str, Any],
        fingerprint: Callable[[nn.Module], str],
    ) -> None:
        super().__init__()
        from open_clip.modified_resnet import ModifiedResNet
        from open_clip.transformer import VisionTransformer

        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.preprocess = preprocess
        self._spec = spec
        self._fingerprint_fn = fingerprint
        self._fingerprint: str | None = None
        visual = model.visual
        self.embed_dim = int(getattr(visual, "output_dim", 0) or model.text_projection.shape[-1])
        self.logit_scale = float(model.logit_scale.detach().exp().item())
        self._own_vit = False  # True: our block loop runs this tower
        self._fallback = False
        self._text_reason = _causal_text_reason(model)  # None: encode_text_embeddings is available
        text_owner = model if hasattr(model, "token_embedding") else getattr(model, "text", None)
        emb = getattr(text_owner, "token_embedding", None)
        self.text_width = int(emb.embedding_dim) if isinstance(emb, nn.Embedding) else 0

        if isinstance(visual, VisionTransformer):
            self.arch = "vit"
            self.width = int(visual.transformer.width)
            self.num_blocks = len(visual.transformer.resblocks)
            self.patch_size = int(visual.conv1.kernel_size[0])
            reason = _unsupported_vit_reason(visual)
            if reason is None:
                self._own_vit = True
            else:
                warnings.warn(
                    f"{name}: {reason} is not supported by tailclip's ViT forward; using open_clip's forward "
                    "(no hook points, no taps, pre_proj == proj)",
                    stacklevel=2,
                )
                self._fallback = True
        elif isinstance(visual, ModifiedResNet):
            self.arch = "resnet"
            self.width = int(visual.attnpool.c_proj.in_features)
            self.num_blocks = 4
            self.patch_size = None
        else:
            warnings.warn(
                f"{name}: vision tower {type(visual).__name__} is run by open_clip's forward "
                "(no hook points, no taps, pre_proj == proj)",
                stacklevel=2,
            )
            self.arch = "other"
            self.width = self.embed_dim
            self.num_blocks = 0
            self.patch_size = None
            self._fallback = True
        self.hooks = HookPoints(self.num_blocks if self.arch == "vit" and not self._fallback else 0)
        self._tap_names = (
            vit_tap_names(self.num_blocks)
            if self._own_vit
            else ["layer1", "layer2", "layer3", "layer4"]
            if self.arch == "resnet"
            else []
        )
        self.spec = {**spec, "tower": self.arch}

    # -- identity ---------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:  # type: ignore[override]
        """Computed on first use: hashing a large checkpoint should not slow down every model load."""
        if self._fingerprint is None:
            self._fingerprint = self._fingerprint_fn(self.model)
        return self._fingerprint

    @property
    def spec(self) -> dict[str, Any]:  # type: ignore[override]
        return {**self._spec, "fingerprint": self.fingerprint}

    @spec.setter
    def spec(self, value: dict[str, Any]) -> None:
        self._spec = dict(value)
        self._spec.pop("fingerprint", None)

    # -- properties methods use -------------------------------------------------------------------
    @property
    def visual_proj(self) -> Tensor | None:
        proj = getattr(self.model.visual, "proj", None)
        return proj if isinstance(proj, Tensor) and self.arch == "vit" and not self._fallback else None

    @property
    def attnpool(self) -> nn.Module | None:
        return self.model.visual.attnpool if self.arch == "resnet" else None

    def block_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        visual = self.model.visual
        if self.arch == "vit":
            yield from (("model.visual.transformer." + n, p) for n, p in visual.transformer.named_parameters())
        elif self.arch == "resnet":
            for stage in ("layer1", "layer2", "layer3", "layer4"):
                yield from ((f"model.visual.{stage}.{n}", p) for n, p in getattr(visual, stage).named_parameters())
        else:
            raise RuntimeError(f"{self.name}: this vision tower has no transformer blocks tailclip can address")

    def vision_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        yield from (("model.visual." + n, p) for n, p in self.model.visual.named_parameters())

    # -- image tower ------------------------------------------------------------------------------
    def encode_image(self, images: Tensor, taps: Sequence[str] = ()) -> ImageFeatures:
        """(pre_proj, proj, taps) for a batch of preprocessed images. Gradients flow when the caller wants them
        (tuners); wrap in torch.no_grad() for frozen feature extraction."""
        wanted = check_taps(taps, self._tap_names) if taps else set()
        if self._own_vit:
            return self._encode_vit(images, wanted)
        if self.arch == "resnet":
            return self._encode_resnet(images, wanted)
        if self.hooks:
            raise RuntimeError(f"{self.name}: hooks were registered but this tower runs open_clip's own forward")
        feats = self.model.encode_image(images)
        return ImageFeatures(pre_proj=feats, proj=feats)

    def _encode_vit(self, images: Tensor, taps: set[str]) -> ImageFeatures:
        visual = self.model.visual
        blocks = [_openclip_block_view(b) for b in visual.transformer.resblocks]
        x = visual._embeds(images)  # conv1 patches, CLS, positional embedding, patch dropout, ln_pre
        if self.hooks or taps:
            x, tapped = run_blocks(x, blocks, self.hooks, taps)
        else:
            x, tapped = run_blocks_fast(x, blocks), {}
        pooled, _ = visual._pool(x)  # ln_post + CLS / avg pooling exactly as open_clip configures it
        proj = pooled @ visual.proj if visual.proj is not None else pooled
        return ImageFeatures(pre_proj=pooled, proj=proj, taps=tapped)

    def _encode_resnet(self, images: Tensor, taps: set[str]) -> ImageFeatures:
        visual = self.model.visual
        x = visual.stem(images)
        tapped: dict[str, Tensor] = {}
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(visual, name)(x)
            if name in taps:
                tapped[name] = x
        proj = visual.attnpool(x)
        return ImageFeatures(pre_proj=proj, proj=proj, taps=tapped)

    # -- text tower -------------------------------------------------------------------------------
    def tokenize(self, prompts: Sequence[str]) -> Tensor:
        return self.tokenizer(list(prompts)).to(self.model.logit_scale.device)

    def encode_text(self, prompts: Sequence[str]) -> Tensor:
        """(N, D) un-normalised text features: open_clip's encode_text, except that for the causal text tower
        the padding after the last pooled token is dropped first. With a causal mask those positions never
        influence the pooled one, so the result is the same and prompt ensembles get several times cheaper."""
        tokens = self.tokenize(prompts)
        if self._text_reason is not None:
            return self.model.encode_text(tokens)
        pos = self.eot_positions(tokens)
        n = int(pos.max().item()) + 1
        return self.encode_text_embeddings(self.token_embedding(tokens[:, :n]), pos)

    def _causal_text(self) -> nn.Module:
        if self._text_reason is not None:
            raise ConfigError(
                f"{self.name}: running the text tower from token embeddings (prompt learning) needs CLIP's causal "
                f"text tower pooled at the end-of-text token; this model has {self._text_reason}"
            )
        return self.model

    def token_embedding(self, token_ids: Tensor) -> Tensor:
        return self._causal_text().token_embedding(token_ids)

    def eot_positions(self, token_ids: Tensor) -> Tensor:
        """open_clip's text pooling: "argmax" (the EOT token has the largest id) or the first `text_eos_id`."""
        m = self._causal_text()
        if m.text_pool_type == "argmax":
            return token_ids.argmax(dim=-1)
        return (token_ids == m.text_eos_id).int().argmax(dim=-1)

    def encode_text_embeddings(self, token_embeddings: Tensor, eot_positions: Tensor) -> Tensor:
        """open_clip's CLIP.encode_text from the token embeddings on: cast to the tower's dtype, positional
        embedding, transformer under the causal mask, ln_final, pooling at `eot_positions`, text projection."""
        m = self._causal_text()
        n = token_embeddings.shape[1]
        if n > m.positional_embedding.shape[0]:
            raise ValueError(f"{n} token embeddings exceed the context length {m.positional_embedding.shape[0]}")
        cast_dtype = m.transformer.get_cast_dtype()
        x = token_embeddings.to(cast_dtype) + m.positional_embedding[:n].to(cast_dtype)
        x = m.transformer(x, attn_mask=m.attn_mask[:n, :n])
        x = m.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot_positions.to(x.device)]
        if m.text_projection is not None:
            x = m.text_projection(x) if isinstance(m.text_projection, nn.Linear) else x @ m.text_projection
        return x


__all__ = [
    "HOOK_KINDS",
    "BlockView",
    "OpenClipBackbone",
    "attention",
    "check_taps",
    "run_blocks",
    "run_blocks_fast",
    "vit_tap_names",
]
