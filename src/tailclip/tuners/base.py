"""The tuner contract: a module that lives inside a frozen backbone through its hook points.

A tuner (1) owns its new parameters as an ordinary nn.Module (hold it as an attribute of the method so it
trains, moves to the device and lands in checkpoints), or unfreezes chosen backbone parameters (full
fine-tuning, BitFit, LN tuning), (2) `attach(backbone)` registers callables at `backbone.hooks` and
(3) `detach()` removes them and re-freezes what it unfroze. It never edits open_clip code."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

from torch import nn

from ..backbones.base import Backbone
from ..errors import ConfigError
from ..registry import Registry

log = logging.getLogger(__name__)


def auto_bottleneck(num_classes: int, num_blocks: int) -> int:
    """LIFT's rule r = 2^max(0, floor(log2(C / 2L))), in integer arithmetic (no float rounding at powers of 2)."""
    if num_classes < 1 or num_blocks < 1:
        raise ValueError("num_classes and num_blocks must be >= 1")
    k = 0
    while (2 ** (k + 1)) * 2 * num_blocks <= num_classes:
        k += 1
    return 2**k


def vision_named_parameters(backbone: Backbone) -> Iterator[tuple[str, nn.Parameter]]:
    """Parameters of the image tower only (the text tower never trains in image-level methods)."""
    if hasattr(backbone, "vision_named_parameters"):
        yield from backbone.vision_named_parameters()
        return
    visual = getattr(backbone, "visual", None) or getattr(getattr(backbone, "model", None), "visual", None)
    if isinstance(visual, nn.Module):
        yield from visual.named_parameters()
        return
    found = False
    for name, p in backbone.named_parameters():
        if name.startswith("visual.") or ".visual." in name:
            found = True
            yield name, p
    if not found:
        raise RuntimeError(f"cannot find the image tower of backbone {getattr(backbone, 'name', backbone)!r}")


class Tuner(nn.Module, ABC):
    """Base class. Subclasses implement `_attach(backbone)` returning hook removers (and may unfreeze params)."""

    name: ClassVar[str] = ""
    needs_hooks: ClassVar[bool] = True

    def __init__(self) -> None:
        super().__init__()
        self._removers: list[Callable[[], None]] = []
        self._unfrozen: list[nn.Parameter] = []

    def attach(self, backbone: Backbone) -> Tuner:
        if self._removers or self._unfrozen:
            raise RuntimeError(f"{type(self).__name__} is already attached; detach() it first")
        if self.needs_hooks and getattr(backbone, "hooks", None) is None:
            raise ConfigError(f"tuner {self.name!r} needs a ViT backbone with hook points; {backbone.name!r} has none")
        self._removers = list(self._attach(backbone))
        return self

    @abstractmethod
    def _attach(self, backbone: Backbone) -> list[Callable[[], None]]:
        """Register hooks / unfreeze parameters; return the functions that undo it."""

    def unfreeze(self, params: Iterator[nn.Parameter]) -> int:
        """Mark backbone parameters trainable and remember them, so detach() can freeze them again."""
        n = 0
        for p in params:
            if not p.requires_grad:
                p.requires_grad_(True)
                self._unfrozen.append(p)
                n += p.numel()
        return n

    def detach(self) -> None:
        for remove in self._removers:
            remove()
        self._removers = []
        for p in self._unfrozen:
            p.requires_grad_(False)
        self._unfrozen = []

    @property
    def attached(self) -> bool:
        return bool(self._removers or self._unfrozen)

    def num_own_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


TUNERS: Registry[type[Tuner]] = Registry("tuner")


def register_tuner(name: str) -> Callable[[type[Tuner]], type[Tuner]]:
    def deco(cls: type[Tuner]) -> type[Tuner]:
        cls.name = name
        return TUNERS.register(name)(cls)

    return deco


def build_tuner(name: str, backbone: Backbone, **options: Any) -> Tuner:
    """Construct the named tuner sized for `backbone` and attach it. Options are the tuner's keyword arguments."""
    cls = TUNERS.get(name)
    tuner = cls.for_backbone(backbone, **options) if hasattr(cls, "for_backbone") else cls(**options)
    return tuner.attach(backbone)


def _unused(**options: Any) -> None:
    bad = {k: v for k, v in options.items() if v is not None}
    if bad:
        log.debug("options %s do not apply to this tuner", bad)


