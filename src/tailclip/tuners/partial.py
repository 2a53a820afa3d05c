"""Tuners that train a chosen part of the frozen tower instead of adding modules: full fine-tuning, BitFit
(biases), LN tuning; and `classifier`, which trains nothing inside the backbone (head only).

As in LIFT's released code they select among the transformer blocks only (`backbone.block_named_parameters()`):
patch embedding, class/positional embeddings, ln_pre, ln_post and the projection stay frozen. ViT-B/16:
full 85,054,464, BitFit 101,376, LN 36,864 parameters. They need no hook points, so `hf:` towers (and ResNet
stages for full / BitFit) work too."""

from __future__ import annotations

import logging
from abc import abstractmethod
from collections.abc import Callable

from torch import nn

from ..backbones.base import Backbone
from ..errors import ConfigError
from .base import NoOptions, Tuner, register_tuner

log = logging.getLogger(__name__)


class _Unfreeze(Tuner):
    needs_hooks = False

    def __init__(self) -> None:
        super().__init__(NoOptions())
        self.num_unfrozen = 0

    @classmethod
    def build(cls, backbone: Backbone, options: NoOptions, num_classes: int | None) -> _Unfreeze:
        return cls()

    @abstractmethod
    def select(self, name: str, param: nn.Parameter, layernorm_ids: set[int]) -> bool:
        """Whether this block parameter trains (`layernorm_ids`: ids of the tower's LayerNorm parameters)."""

    def _attach(self, backbone: Backbone) -> list[Callable[[], None]]:
        ln_ids = {id(p) for m in backbone.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters(False)}
        chosen = [p for n, p in backbone.block_named_parameters() if self.select(n, p, ln_ids)]
        if not chosen:
            raise ConfigError(f"tuner {self.name!r} finds nothing to train in the blocks of {backbone.name!r}")
        self.num_unfrozen = self.unfreeze(chosen)
        log.info("%s: %d backbone parameters trainable", self.name, self.num_unfrozen)
        return []


@register_tuner("full")
class FullFineTune(_Unfreeze):
    """Every parameter of the transformer blocks trains (LIFT's "full fine-tuning" row)."""

    def select(self, name: str, param: nn.Parameter, layernorm_ids: set[int]) -> bool:
        return True


@register_tuner("bitfit")
class BitFit(_Unfreeze):
    """Only the bias terms of the transformer blocks train (Zaken et al. 2022; LIFT's row)."""

    def select(self, name: str, param: nn.Parameter, layernorm_ids: set[int]) -> bool:
        return name.endswith("bias")


@register_tuner("ln")
class LayerNormTuning(_Unfreeze):
    """Only the LayerNorm affine parameters of the transformer blocks train (LIFT's row)."""

    def select(self, name: str, param: nn.Parameter, layernorm_ids: set[int]) -> bool:
        return id(param) in layernorm_ids


@register_tuner("classifier")
class ClassifierOnly(Tuner):
    """Nothing in the backbone trains: the head alone (LIFT's "classifier fine-tuning" row)."""

    needs_hooks = False

    def __init__(self) -> None:
        super().__init__(NoOptions())

    @classmethod
    def build(cls, backbone: Backbone, options: NoOptions, num_classes: int | None) -> ClassifierOnly:
        return cls()

    def params_per_block(self) -> int:
        return 0

    def _attach(self, backbone: Backbone) -> list[Callable[[], None]]:
        return []
