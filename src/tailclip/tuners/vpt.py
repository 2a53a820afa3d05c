"""Visual prompt tuning (Jia et al. 2022) as LIFT's released code runs it: learnable tokens appended after the
patch tokens. Shallow: prompts enter before block 0 and then flow through the tower. Deep: before every block
the previous prompt tokens are cut off and that block's own prompts appended.

The tower reads the class token, and attention treats the token set as a set, so where the prompts sit does
not change it; we append them (as LIFT) and cut them off again at the last block's output, so taps and the
tower's output keep their usual shape. VPT is not the identity at init: the prompts are attended to."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..backbones.base import Backbone
from ..errors import ConfigError
from .base import Tuner, check_positive, register_tuner


@dataclass(frozen=True)
class VPTOptions:
    length: int = 10  # prompt tokens (per block for vpt_deep); LIFT's default

    def __post_init__(self) -> None:
        check_positive("vpt.length", self.length)


class VPT(Tuner):
    Options = VPTOptions
    deep: bool = True

    def __init__(self, dim: int, num_blocks: int, patch_size: int, options: VPTOptions) -> None:
        super().__init__(options, range(num_blocks) if self.deep else [0])
        self.dim, self.num_blocks, self.length = dim, num_blocks, options.length
        self.prompts = nn.Parameter(torch.empty(len(self.blocks), self.length, dim))
        # VPT's init (LIFT's peft_modules.VPT): uniform with the Xavier bound of the patch embedding (3 p p -> d)
        bound = math.sqrt(6.0 / float(3 * patch_size * patch_size + dim))
        nn.init.uniform_(self.prompts, -bound, bound)

    @classmethod
    def build(cls, backbone: Backbone, options: VPTOptions, num_classes: int | None) -> VPT:
        if not backbone.patch_size:
            raise ConfigError(f"tuner {cls.name!r} needs a ViT tower with a patch size; {backbone.name!r} has none")
        return cls(backbone.width, backbone.num_blocks, backbone.patch_size, options)

    def params_per_block(self) -> int:
        return self.length * self.dim

    def _append(self, i: int, cut: bool) -> Callable[[Tensor], Tensor]:
        def hook(x: Tensor) -> Tensor:
            tokens = x[:, : x.shape[1] - self.length] if cut else x
            p = self.prompts[i].to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
            return torch.cat([tokens, p], dim=1)

        return hook

    def _cut(self, x: Tensor) -> Tensor:
        return x[:, : x.shape[1] - self.length]

    def _attach(self, backbone: Backbone) -> list[Callable[[], None]]:
        hooks = backbone.hooks
        removers = [hooks.add("blocks.0.pre", self._append(0, cut=False))]
        removers += [hooks.add(f"blocks.{b}.pre", self._append(i, cut=True)) for i, b in enumerate(self.blocks) if b]
        removers.append(hooks.add(f"blocks.{self.num_blocks - 1}.out", self._cut))
        return removers


@register_tuner("vpt_deep")
class VPTDeep(VPT):
    """VPT-deep: `length` learnable prompt tokens per block (L * length * d parameters)."""

    deep = True


@register_tuner("vpt_shallow")
class VPTShallow(VPT):
    """VPT-shallow: `length` learnable prompt tokens before the first block (length * d parameters)."""

    deep = False
