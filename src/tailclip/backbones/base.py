"""The Backbone contract every method codes against: image features with taps, text features, prompt
ensembles, and named hook points inside the vision tower where tuners plug in without forking CLIP."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class ImageFeatures:
    """Outputs of one image-tower pass.

    pre_proj: (B, d) feature before CLIP's projection (ViT: CLS token after ln_post; RN: attention-pool
              output before its c_proj is not separable, so pre_proj == proj for ResNets).
    proj:     (B, D) projected, *un-normalised* joint-space feature (what open_clip's encode_image returns).
    taps:     requested intermediate tensors by tap name (see `Backbone.tap_names()`):
              ViT  "blocks.{i}" block output, "blocks.{i}.attn" residual after attention, "blocks.{i}.mlp" MLP
                   branch output: (B, N, d) tokens (CLS first), after any hooks at that point.
              RN   "layer1".."layer4": the stage outputs as (B, C, H, W) feature maps; for an input of side S and
                   stem width w: layer1 (B, 4w, S/4, S/4), layer2 (B, 8w, S/8, S/8), layer3 (B, 16w, S/16, S/16),
                   layer4 (B, 32w = d, S/32, S/32). `Backbone.attnpool(taps["layer4"]) == proj`.
    """

    pre_proj: Tensor
    proj: Tensor
    taps: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class Preprocess:
    """The preprocessing that travels with the weights; recorded in every run folder."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    def to_dict(self) -> dict[str, Any]:
        return {
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "resize_mode": self.resize_mode,
        }


# Hook kinds (per block i, 0-based, named f"blocks.{i}.{kind}"):
#   pre      x -> x                 tokens entering the block (VPT-deep swaps its prompt tokens here)
#   qkv      (x_ln, qkv) -> qkv     fused q/k/v projection output, (B, N, 3d) (LoRA adds its deltas)
#   attn     h -> h                 residual stream after attention, h = x + attn(ln_1(x))
#   mlp      (h, m) -> m            MLP branch output m = mlp(ln_2(h)); parallel adapters add s*A(h) here
#   out      x -> x                 block output
HOOK_KINDS = ("pre", "qkv", "attn", "mlp", "out")


class HookPoints:
    """Named hook points of a tower: tuners register callables; the tower's forward applies them in order."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._hooks: dict[str, list[Callable[..., Tensor]]] = defaultdict(list)
        self._paused = 0  # depth of nested paused() contexts

    def names(self) -> list[str]:
        return [f"blocks.{i}.{k}" for i in range(self.num_blocks) for k in HOOK_KINDS]

    def add(self, name: str, fn: Callable[..., Tensor]) -> Callable[[], None]:
        """Register `fn` at `name`; returns a function that removes it again."""
        if name not in self.names():
            kinds = ",".join(HOOK_KINDS)
            raise KeyError(f"unknown hook point {name!r}; known: blocks.<0..{self.num_blocks - 1}>.{{{kinds}}}")
        self._hooks[name].append(fn)
        return lambda: self._hooks[name].remove(fn)

    def get(self, name: str) -> list[Callable[..., Tensor]]:
        """The hooks the forward applies at `name` (none while paused)."""
        return [] if self._paused else self._hooks.get(name, [])

    def clear(self) -> None:
        self._hooks.clear()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Bypass every registered hook inside the block: `encode_image` then computes the frozen zero-shot
        feature of the same batch (Sage's feature interchange needs f_zs of the crop it is training on).

        Only hook-based tuners (adapters, LoRA, VPT, ...) are bypassed. Tuners that unfreeze and train the
        backbone's own parameters (full, BitFit, LN tuning) are not hooks: their updated weights stay in effect,
        so under them this is *not* the zero-shot model. Hooks stay registered; taps still work. Nested use
        and exceptions are safe: hooks apply again once the outermost context exits, however it exits."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def registered(self) -> list[str]:
        """The hook points holding at least one hook (paused or not)."""
        return sorted(name for name, fns in self._hooks.items() if fns)

    def __bool__(self) -> bool:
        """Whether the forward has hooks to apply now (False while paused)."""
        return not self._paused and any(self._hooks.values())


class Backbone(nn.Module, ABC):
    """A frozen CLIP with our own vision-tower forward. Built by `tailclip.backbones.create_backbone`.

    Attributes a method may rely on:
      name (str), spec (dict, JSON-able: everything needed to rebuild it), fingerprint (str: identifies the
      weights + architecture, keys the feature cache), preprocess (Preprocess),
      arch ("vit" | "resnet" | "other": a tower open_clip runs itself, with no hooks or taps),
      width d (ViT width; RN: final feature channels, layer4's C), embed_dim D, text_width (width of the text
      tower's token embeddings), num_blocks L (ViT blocks; RN: 4 stages), patch_size (ViT; None otherwise),
      hooks (HookPoints; empty for ResNets), visual_proj: (d, D) tensor or None (RN: use `attnpool`),
      attnpool (RN only: the frozen attention pool, (B, d, H, W) layer4 maps -> (B, D)), logit_scale (float,
      CLIP's exp(logit_scale), 100 for OpenAI), model (the wrapped open_clip / transformers module, frozen),
      tap_names().

    Text side for prompt learners (CoOp/CoCoOp): `tokenize` -> `token_embedding` (frozen lookup) -> replace
    some embeddings by learned context vectors -> `encode_text_embeddings(emb, eot_positions(tokens))`.
    """

    name: str
    spec: dict[str, Any]
    fingerprint: str
    preprocess: Preprocess
    arch: str
    width: int
    embed_dim: int
    text_width: int
    num_blocks: int
    patch_size: int | None  # ViT patch size read from the model (None for ResNet towers)
    logit_scale: float
    hooks: HookPoints
    model: nn.Module
    _tap_names: list[str]  # set by each backbone from what its forward can actually return

    # -- image tower ------------------------------------------------------------------------------
    @abstractmethod
    def encode_image(self, images: Tensor, taps: Sequence[str] = ()) -> ImageFeatures:
        """Pre-projection and projected features plus the requested taps."""

    def tap_names(self) -> list[str]:
        """Names accepted by `encode_image(taps=...)`: ViT towers run by tailclip "blocks.{i}[.attn|.mlp]",
        ResNet towers "layer1".."layer4", towers open_clip runs itself none."""
        return list(self._tap_names)

    @property
    def attnpool(self) -> nn.Module | None:
        """ResNet towers: the frozen attention pool, (B, d, H, W) layer4 feature maps -> (B, D) projected
        features (its positional embedding fixes H, W to layer4's size at the model's input resolution); LDC
        projects fused maps with it. None for other towers (ViT: use `visual_proj`)."""
        return None

    @property
    @abstractmethod
    def visual_proj(self) -> Tensor | None:
        """(d, D) projection of the image tower (None where it is not a matrix, e.g. ResNet attention pooling)."""

    @property
    def pre_proj_width(self) -> int:
        """Width of `encode_image(...).pre_proj`: d where the projection is a matrix, else D (a tower whose pooling
        projects, e.g. ResNet attention pooling, has no separate pre-projection feature)."""
        return self.width if self.visual_proj is not None else self.embed_dim

    @abstractmethod
    def block_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Parameters of the image tower's transformer blocks (ResNet: layer1..layer4) only: what LIFT's full,
        BitFit and LN rows train. Patch embedding, ln_pre, ln_post, the projection and the text tower are out."""

    @abstractmethod
    def vision_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Every parameter of the image tower (embeddings, blocks, final norm, projection / attention pool); never
        the text tower or logit_scale."""

    # -- text tower -------------------------------------------------------------------------------
    @abstractmethod
    def encode_text(self, prompts: Sequence[str]) -> Tensor:
        """(N, D) un-normalised text features."""

    @abstractmethod
    def tokenize(self, prompts: Sequence[str]) -> Tensor:
        """(N, L) token ids on the model's device, L <= the text tower's context length; each row holds one
        end-of-text token (see `eot_positions`) followed by padding."""

    @abstractmethod
    def token_embedding(self, token_ids: Tensor) -> Tensor:
        """(N, L) ids -> (N, L, text_width): the frozen embedding lookup, before positional embeddings."""

    @abstractmethod
    def eot_positions(self, token_ids: Tensor) -> Tensor:
        """(N,) index of the token each sequence's text feature is read at, exactly as the wrapped model's
        own text forward pools (CLIP: the end-of-text token)."""

    @abstractmethod
    def encode_text_embeddings(self, token_embeddings: Tensor, eot_positions: Tensor) -> Tensor:
        """The text tower from already-embedded tokens (N, L, text_width), L <= context length: adds the
        positional embedding, runs the causal transformer and final norm, takes the feature at `eot_positions`
        (N,) and projects it: (N, D), un-normalised. Equals `encode_text` on `token_embedding(tokenize(p))`;
        prompt learners put learned context vectors into `token_embeddings`."""

    def forward(self, images: Tensor) -> Tensor:
        """Projected, un-normalised image features (so a Backbone can stand wherever an encoder module is used)."""
        return self.encode_image(images).proj

    def train(self, mode: bool = True) -> Backbone:
        """Switch tuners attached to the backbone, but keep the wrapped CLIP in eval mode: its BatchNorm
        statistics (ResNets) and any patch dropout stay frozen however the method is trained."""
        super().train(mode)
        model = self._modules.get("model")
        if model is not None:
            model.eval()
        return self

    @torch.no_grad()
    def text_classifier(self, classnames: Sequence[str], templates: Sequence[str], batch_size: int = 256,
                        normalize: bool = True) -> Tensor:
        """(C, D) prompt-ensemble weights: per class, normalise each template's feature, average, normalise.
        normalize=False: the mean of the raw `encode_text` features (one template: exactly its raw feature, what
        Candle's released code feeds its prototypes)."""
        weights = []
        for name in classnames:
            name = name.replace("_", " ")
            prompts = [t.format(name) for t in templates]
            feats = torch.cat([self.encode_text(prompts[i : i + batch_size])
                               for i in range(0, len(prompts), batch_size)])
            if not normalize:
                weights.append(feats.mean(dim=0))
                continue
            feats = feats / feats.norm(dim=-1, keepdim=True)
            mean = feats.mean(dim=0)
            weights.append(mean / mean.norm())
        return torch.stack(weights)
