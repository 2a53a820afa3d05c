"""LoRA on the query and value projections (Hu et al. 2022), added to the fused qkv output of each block."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..backbones.base import Backbone
from .base import Tuner, _unused, auto_bottleneck, register_tuner


class LoRAPair(nn.Module):
    """delta = (alpha / r) * B A x; A Kaiming-uniform, B zero, so the tuned model starts as the frozen one."""

    def __init__(self, dim: int, rank: int, alpha: float) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.empty(rank, dim))
        self.b = nn.Parameter(torch.zeros(dim, rank))
        nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))
        self.scaling = alpha / rank

    def forward(self, x: Tensor) -> Tensor:
        return self.scaling * (x @ self.a.t()) @ self.b.t()


@register_tuner("lora")
class LoRA(Tuner):
    """LoRA (q, v) in every block at `blocks.{i}.qkv`: qkv <- qkv + [dq, 0, dv]. 2 * 2rd parameters a block."""

    def __init__(self, dim: int, num_blocks: int, rank: int, alpha: float | None = None) -> None:
        super().__init__()
        self.dim, self.rank = dim, rank
        alpha = float(rank) if alpha is None else float(alpha)  # default scaling 1: alpha = r
        self.q = nn.ModuleList(LoRAPair(dim, rank, alpha) for _ in range(num_blocks))
        self.v = nn.ModuleList(LoRAPair(dim, rank, alpha) for _ in range(num_blocks))

    @classmethod
    def for_backbone(
        cls, backbone: Backbone, bottleneck: int | None = None, num_classes: int | None = None,
        lora_alpha: float | None = None, **options: Any,
    ) -> LoRA:
        _unused(**options)
        if bottleneck is None:
            if num_classes is None:
                raise ValueError("LoRA needs bottleneck=r or num_classes")
            bottleneck = auto_bottleneck(num_classes, backbone.num_blocks)
        return cls(backbone.width, backbone.num_blocks, bottleneck, lora_alpha)

    def _attach(self, backbone: Backbone) -> list[Callable[[], None]]:
        removers = []
        for i, (q, v) in enumerate(zip(self.q, self.v)):
            def hook(x_ln: Tensor, qkv: Tensor, q: LoRAPair = q, v: LoRAPair = v) -> Tensor:
                x = x_ln.to(q.a.dtype)
                dq, dv = q(x), v(x)
                return qkv + torch.cat([dq, torch.zeros_like(dq), dv], dim=-1).to(qkv.dtype)

            removers.append(backbone.hooks.add(f"blocks.{i}.qkv", hook))
        return removers
