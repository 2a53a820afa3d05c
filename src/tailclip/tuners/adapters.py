"""Bottleneck adapters as LIFT's released code places them: AdaptFormer parallel to the MLP (LIFT's tuner) and
the plain Adapter on the MLP branch output before the residual add."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from ..backbones.base import Backbone
from .base import Tuner, check_positive, register_tuner, resolve_bottleneck


class Bottleneck(nn.Module):
    """LN_a -> W_down (d->r) -> ReLU -> W_up (r->d) [-> * s].

    Init as LIFT's `peft_modules.py`: W_down `kaiming_normal_(a=sqrt(5))` (fan_in mode, so std = 1/sqrt(3d)),
    biases zero, W_up all zero, so the branch outputs exactly 0 and the tuned model *is* the frozen one at step 0.
    Parameters: LN 2d + down dr + r + up rd + d = (2r+3)d + r, plus 1 for a learnable scale s."""

    def __init__(self, dim: int, bottleneck: int, scale: float | None = None, learnable_scale: bool = True) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.kaiming_normal_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.scale: Tensor | None
        if scale is None:
            self.scale = None
        elif learnable_scale:
            self.scale = nn.Parameter(torch.full((), float(scale)))
        else:
            self.register_buffer("scale", torch.full((), float(scale)), persistent=False)

    @staticmethod
    def num_parameters(dim: int, bottleneck: int, learnable_scale: bool) -> int:
        return (2 * bottleneck + 3) * dim + bottleneck + int(learnable_scale)

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        y = self.up(torch.relu(self.down(self.ln(x.to(self.down.weight.dtype)))))
        return (y if self.scale is None else self.scale * y).to(dtype)


@dataclass(frozen=True)
class AdaptFormerOptions:
    bottleneck: int | None = None  # r; None: LIFT's rule 2^max(0, floor(log2(C / 2L)))
    scale: float = 1.0  # s at init
    learnable_scale: bool = True  # LIFT's adaptformer_scale="learnable"; False keeps s fixed

    def __post_init__(self) -> None:
        check_positive("adaptformer.bottleneck", self.bottleneck)


@register_tuner("adaptformer")
class AdaptFormer(Tuner):
    """AdaptFormer in every block, parallel to the MLP: out = h + MLP(LN2(h)) + s * W_up ReLU(W_down LN_a(h)).

    Registered at `blocks.{i}.mlp` as (h, m) -> m + s*A(h), h = residual stream after attention."""

    Options = AdaptFormerOptions

    def __init__(self, dim: int, num_blocks: int, options: AdaptFormerOptions) -> None:
        if options.bottleneck is None:
            raise ValueError("AdaptFormer needs a resolved bottleneck; use build_tuner or AdaptFormer.build")
        super().__init__(options, range(num_blocks))
        self.dim, self.bottleneck = dim, options.bottleneck
        self.adapters = nn.ModuleList(
            Bottleneck(dim, self.bottleneck, options.scale, options.learnable_scale) for _ in self.blocks
        )

    @classmethod
    def build(cls, backbone: Backbone, options: AdaptFormerOptions, num_classes: int | None) -> AdaptFormer:
        r = resolve_bottleneck(options.bottleneck, num_classes, backbone.num_blocks, cls.name)
        return cls(backbone.width, backbone.num_blocks, replace(options, bottleneck=r))

    def params_per_block(self) -> int:
        """(2r+3)d + r + 1 with the learnable scale (docs/methods/lift.md)."""
        return Bottleneck.num_parameters(self.dim, self.bottleneck, self.options.learnable_scale)

    def _attach(self, backbone: Backbone) -> list[Callable[[], None]]:
        removers = []
        for adapter, i in zip(self.adapters, self.blocks):
            def hook(h: Tensor, m: Tensor, a: Bottleneck = adapter) -> Tensor:
                return m + a(h)

            removers.append(backbone.hooks.add(f"blocks.{i}.mlp", hook))
        return removers


@dataclass(frozen=True)
class AdapterOptions:
    bottleneck: int | None = None  # r; None: LIFT's rule

    def __post_init__(self) -> None:
        check_positive("adapter.bottleneck", self.bottleneck)


@register_tuner("adapter")
class Adapter(Tuner):
    """LIFT's "Adapter" row: a bottleneck on the MLP branch output before the residual add, in series:
    x = h + (m + A(m)), m = MLP(LN2(h)) (LIFT's `x = x + adapter(x)` on the MLP output). No scale, same init as
    AdaptFormer: (2r+3)d + r parameters per block. Registered at `blocks.{i}.mlp` as (h, m) -> m + A(m)."""

    Options = AdapterOptions

    def __init__(self, dim: int, num_blocks: int, options: AdapterOptions) -> None:
        if options.bottleneck is None:
            raise ValueError("Adapter needs a resolved bottleneck; use build_tuner or Adapter.build")
        super().__init__(options, range(num_blocks))
        self.dim, self.bottleneck = dim, options.bottleneck
        self.adapters = nn.ModuleList(Bottleneck(dim, self.bottleneck) for _ in self.blocks)

    @classmethod
    def build(cls, backbone: Backbone, options: AdapterOptions, num_classes: int | None) -> Adapter:
        r = resolve_bottleneck(options.bottleneck, num_classes, backbone.num_blocks, cls.name)
        return cls(backbone.width, backbone.num_blocks, replace(options, bottleneck=r))

    def params_per_block(self) -> int:
        return Bottleneck.num_parameters(self.dim, self.bottleneck, learnable_scale=False)

    def _attach(self, backbone: Backbone) -> list[Callable[[], None]]:
        removers = []
        for adapter, i in zip(self.adapters, self.blocks):
            def hook(h: Tensor, m: Tensor, a: Bottleneck = adapter) -> Tensor:
                return m + a(m)

            removers.append(backbone.hooks.add(f"blocks.{i}.mlp", hook))
        return removers
