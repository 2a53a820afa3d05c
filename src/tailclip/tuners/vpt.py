"""Visual prompt tuning (Jia et al. 2022): learnable tokens inserted after the class token.

Shallow: prompts enter before block 0 and then flow through the tower. Deep: every block's prompt tokens are
replaced by that block's own learnable prompts. Prompts are removed again at the last block's output, so the
tower's output (and the class token the head reads) keeps its usual shape."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..backbones.base import Backbone
from .base import Tuner, _unused, register_tuner


class VPT(Tuner):
    deep: bool = True

    def __init__(self, dim: int, num_blocks: int, length: int = 10, patch_size: int = 16) -> None:
        super().__init__()
        self.dim, self.num_blocks, self.length = dim, num_blocks, length
        layers = num_blocks if self.deep else 1
        self.prompts = nn.Parameter(torch.empty(layers, length, dim))
        # VPT's init: uniform with the Xavier bound of a patch-embedding-shaped layer (3 * p * p -> d).
        bound = math.sqrt(6.0 / float(3 * patch_size * patch_size + dim))
        nn.init.uniform_(self.prompts, -bound, bound)

    @classmethod
    def for_backbone(cls, backbone: Backbone, vpt_length: int = 10, **options: Any) -> VPT:
        _unused(**{k: v for k, v in options.items() if k not in ("bottleneck", "num_classes")})
        patch = int(getattr(backbone, "patch_size", 16) or 16)
        return cls(backbone.width, backbone.num_blocks, vpt_length, patch)

    def _insert(self, x: Tensor) -> Tensor:
        p = self.prompts[0].to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        return torch.cat([x[:, :1], p, x[:, 1:]], dim=1)

    def _replace(self, i: int) -> Callable[[Tensor], Tensor]:
        def hook(x: Tensor) -> Tensor:
            p = self.prompts[i].to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
            return torch.cat([x[:, :1], p, x[:, 1 + self.length :]], dim=1)

        return hook

    def _remove(self, x: Tensor) -> Tensor:
        return torch.cat([x[:, :1], x[:, 1 + self.length :]], dim=1)

    def _attach(self, backbone: Backbone) -> list[Callable[[], None]]:
        hooks = backbone.hooks
        removers = [hooks.add("blocks.0.pre", self._insert)]
        if self.deep:
            removers += [hooks.add(f"blocks.{i}.pre", self._replace(i)) for i in range(1, self.num_blocks)]
        removers.append(hooks.add(f"blocks.{self.num_blocks - 1}.out", self._remove))
        return removers


@register_tuner("vpt_deep")
class VPTDeep(VPT):
    """VPT-deep: `length` learnable prompt tokens per block (L * length * d parameters)."""

    deep = True


@register_tuner("vpt_shallow")
class VPTShallow(VPT):
    """VPT-shallow: `length` learnable prompt tokens before the first block (length * d parameters)."""

    deep = False
