"""LoRA (Hu et al. 2022) on the attention projections, as LIFT's released code runs it: q and v by default,
scaling 1/r, A (d x r) Kaiming-uniform and B zero. The deltas are added to the fused qkv output of each block."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from ..backbones.base import Backbone
from ..errors import ConfigError
from .base import Tuner, check_positive, register_tuner, resolve_bottleneck

LORA_TARGETS = ("q", "k", "v")


class LoRAPair(nn.Module):
    """delta = (alpha / r) * (x A) B, A (d, r) and B (r, d) as in LIFT. `kaiming_uniform_(a=sqrt(5))` on a (d, r)
    tensor has fan_in r, hence bound 1/sqrt(r); B = 0, so the tuned model starts as the frozen one."""

    def __init__(self, dim: int, rank: int, alpha: float) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.empty(dim, rank))
        self.b = nn.Parameter(torch.zeros(rank, dim))
        nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))
        self.scaling = alpha / rank

    def forward(self, x: Tensor) -> Tensor:
        return self.scaling * ((x @ self.a) @ self.b)


@dataclass(frozen=True)
class LoRAOptions:
    rank: int | None = None  # r; None: LIFT's bottleneck rule
    alpha: float = 1.0  # scaling alpha / r: 1/r as LIFT
    targets: tuple[str, ...] = ("q", "v")  # projections of the fused qkv that get a low-rank delta

    def __post_init__(self) -> None:
        check_positive("lora.rank", self.rank)
        check_positive("lora.alpha", self.alpha)
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        if bad or not self.targets or len(set(self.targets)) != len(self.targets):
            raise ConfigError(f"lora.targets={list(self.targets)!r}: choose distinct ones of {', '.join(LORA_TARGETS)}")


@register_tuner("lora")
class LoRA(Tuner):
    """LoRA in every block at `blocks.{i}.qkv`: qkv <- qkv + [dq, dk, dv] (zeros for untargeted projections),
    computed from the LN_1 output as LIFT does. 2rd parameters per target per block."""

    Options = LoRAOptions

    def __init__(self, dim: int, num_blocks: int, options: LoRAOptions) -> None:
        if options.rank is None:
            raise ValueError("LoRA needs a resolved rank; use build_tuner or LoRA.build")
        super().__init__(options, range(num_blocks))
        self.dim, self.rank = dim, options.rank
        self.lora = nn.ModuleList(
            nn.ModuleDict({t: LoRAPair(dim, self.rank, options.alpha) for t in options.targets}) for _ in self.blocks
        )

    @classmethod
    def build(cls, backbone: Backbone, options: LoRAOptions, num_classes: int | None) -> LoRA:
        r = resolve_bottleneck(options.rank, num_classes, backbone.num_blocks, cls.name)
        return cls(backbone.width, backbone.num_blocks, replace(options, rank=r))

    def params_per_block(self) -> int:
        return len(self.options.targets) * 2 * self.rank * self.dim

    def _attach(self, backbone: Backbone) -> list[Callable[[], None]]:
        removers = []
        for pairs, i in zip(self.lora, self.blocks):
            def hook(x_ln: Tensor, qkv: Tensor, pairs: nn.ModuleDict = pairs) -> Tensor:
                x = x_ln.to(next(iter(pairs.values())).a.dtype)
                deltas = [pairs[t](x) if t in pairs else None for t in LORA_TARGETS]
                zero = torch.zeros_like(next(d for d in deltas if d is not None))
                return qkv + torch.cat([zero if d is None else d for d in deltas], dim=-1).to(qkv.dtype)

            removers.append(backbone.hooks.add(f"blocks.{i}.qkv", hook))
        return removers
