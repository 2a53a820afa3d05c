"""Tuners that train a chosen part of the frozen image tower instead of adding modules: full fine-tuning,
BitFit (biases), LN tuning; and `classifier`, which trains nothing inside the backbone (head only)."""

from __future__ import annotations

import logging
from abc import abstractmethod
from collections.abc import Callable
from typing import Any

from torch import nn

from ..backbones.base import Backbone
from .base import Tuner, _unused, register_tuner, vision_named_parameters

log = logging.getLogger(__name__)


class _Unfreeze(Tuner):
    needs_hooks = False

    def __init__(self) -> None:
        super().__init__()
        self.num_unfrozen = 0

    @classmethod
    def for_backbone(cls, backbone: Backbone, **options: Any) -> _Unfreeze:
        _unused(**{k: v for k, v in options.items() if k not in ("bottleneck", "num_classes")})
        return cls()

    @abstractmethod
    def select(self, name: str, param: nn.Parameter, backbone: Backbone) -> bool:
        """Whether this backbone parameter trains."""

    def _attach(self, backbone: Backbone) -> list[Callable[[], None]]:
        chosen = [p for n, p in vision_named_parameters(backbone) if self.select(n, p, backbone)]
        self.num_unfrozen = self.unfreeze(iter(chosen))
        log.info("%s: %d backbone parameters trainable", self.name, self.num_unfrozen)
        return []


@register_tuner("full")
class FullFineTune(_Unfreeze):
    """Every parameter of the image tower trains (LIFT's "full fine-tuning" row; the text tower stays frozen)."""

    def select(self, name: str, param: nn.Parameter, backbone: Backbone) -> bool:
        return True


@register_tuner("bitfit")
class BitFit(_Unfreeze):
    """Only the bias terms of the image tower train (Zaken et al. 2022)."""

    def select(self, name: str, param: nn.Parameter, backbone: Backbone) -> bool:
        return name.endswith("bias")


def _layernorm_param_ids(backbone: Backbone) -> set[int]:
    return {id(p) for m in backbone.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters(recurse=False)}


@register_tuner("ln")
class LayerNormTuning(_Unfreeze):
    """Only the LayerNorm affine parameters of the image tower train."""

    def select(self, name: str, param: nn.Parameter, backbone: Backbone) -> bool:
        if not hasattr(self, "_ln_ids"):
            self._ln_ids = _layernorm_param_ids(backbone)
        return id(param) in self._ln_ids


@register_tuner("classifier")
class ClassifierOnly(_Unfreeze):
    """Nothing in the backbone trains: the head alone (LIFT's "classifier fine-tuning" row)."""

    def select(self, name: str, param: nn.Parameter, backbone: Backbone) -> bool:
        return False
