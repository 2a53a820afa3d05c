"""Bottleneck adapters: AdaptFormer (parallel to the MLP, LIFT) and a plain sequential Adapter."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..backbones.base import Backbone
from .base import Tuner, _unused, auto_bottleneck, register_tuner


class Bottleneck(nn.Module):
    """LN_a -> W_down (d->r, Kaiming, zero bias) -> ReLU -> W_up (r->d, all zero) [-> * s].

    W_up starts at zero so the branch outputs exactly 0: the tuned model *is* the frozen model at step 0.
    Parameters: LN 2d + down dr + r + up rd + d (+ 1 for s) = (2r+3)d + r + 1 with the scale."""

    def __init__(self, dim: int, bottleneck: int, learnable_scale: bool = True, init_scale: float = 1.0) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        # AdaptFormer's official init for W_down: kaiming_uniform_ with a = sqrt(5) (as LoRA); bias zero.
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        if learnable_scale:
            self.scale = nn.Parameter(torch.full((), float(init_scale)))
        else:
            self.register_buffer("scale", torch.full((), float(init_scale)), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        y = self.up(torch.relu(self.down(self.ln(x.to(self.down.weight.dtype)))))
        return (self.scale * y).to(dtype)


@register_tuner("adaptformer")
class AdaptFormer(Tuner):
    """AdaptFormer in every block, parallel to the MLP: out = h + MLP(LN2(h)) + s * W_up ReLU(W_down LN_a(h)).

    Registered at `blocks.{i}.mlp` as (h, m) -> m + s*A(h), h = residual stream after attention."""

    def __init__(self, dim: int, num_blocks: int, bottleneck: int, blocks: list[int] | None = None) -> None:
        super().__init__()
        self.dim, self.bottleneck = dim, bottleneck
        self.blocks = list(range(num_blocks)) if blocks is None else list(blocks)
        self.adapters = nn.ModuleList(Bottleneck(dim, bottleneck) for _ in self.blocks)

    @classmethod
    def for_backbone(
        cls, backbone: Backbone, bottleneck: int | None = None, num_classes: int | None = None, **options: Any
    ) -> AdaptFormer:
        """r given, or LIFT's rule from the number of classes and blocks."""
        _unused(**options)
        if bottleneck is None:
            if num_classes is None:
                raise ValueError("AdaptFormer needs bottleneck=r or num_classes for LIFT's rule")
            bottleneck = auto_bottleneck(num_classes, backbone.num_blocks)
        return cls(backbone.width, backbone.num_blocks, bottleneck)

    @staticmethod
    def params_per_block(dim: int, bottleneck: int) -> int:
        return (2 * bottleneck + 3) * dim + bottleneck + 1

    def _attach(self, backbone: Backbone) -> list[Callable[[], None]]:
        removers = []
        for adapter, i in zip(self.adapters, self.blocks):
            def hook(h: Tensor, m: Tensor, a: Bottleneck = adapter) -> Tensor:
                return m + a(h)

            removers.append(backbone.hooks.add(f"blocks.{i}.mlp", hook))
        return removers


@register_tuner("adapter")
class SequentialAdapter(Tuner):
    """Plain (Houlsby-style) adapter after each block's MLP, in series: x <- x + W_up ReLU(W_down LN(x)) at the
    block output (LIFT's "Adapter" row). Same bottleneck and init as AdaptFormer, no scale: (2r+2)d + r."""

    def __init__(self, dim: int, num_blocks: int, bottleneck: int) -> None:
        super().__init__()
        self.dim, self.bottleneck = dim, bottleneck
        self.adapters = nn.ModuleList(Bottleneck(dim, bottleneck, learnable_scale=False) for _ in range(num_blocks))

    @classmethod
    def for_backbone(
        cls, backbone: Backbone, bottleneck: int | None = None, num_classes: int | None = None, **options: Any
    ) -> SequentialAdapter:
        _unused(**options)
        if bottleneck is None:
            if num_classes is None:
                raise ValueError("Adapter needs bottleneck=r or num_classes")
            bottleneck = auto_bottleneck(num_classes, backbone.num_blocks)
        return cls(backbone.width, backbone.num_blocks, bottleneck)

    def _attach(self, backbone: Backbone) -> list[Callable[[], None]]:
        removers = []
        for i, adapter in enumerate(self.adapters):
            def hook(x: Tensor, a: Bottleneck = adapter) -> Tensor:
                return x + a(x)

            removers.append(backbone.hooks.add(f"blocks.{i}.out", hook))
        return removers
