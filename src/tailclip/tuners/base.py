"""The tuner contract: a module that lives inside a frozen backbone through its hook points.

A tuner (1) owns its new parameters as an ordinary nn.Module (hold it as an attribute of the method so it
trains, moves to the device and lands in checkpoints), or unfreezes chosen parameters of the transformer blocks
(full fine-tuning, BitFit, LN tuning), (2) `attach(backbone)` registers callables at `backbone.hooks` and
(3) `detach()` removes them and re-freezes what it unfroze. It never edits open_clip code.

Each tuner declares a typed options dataclass (`Options`); `build_tuner(name, backbone, options)` is the one
way to make one. Options may carry callables a method hands over (e.g. a function returning the current
classifier weights, for an adapter that reads them every step)."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from ..backbones.base import Backbone
from ..errors import ConfigError
from ..registry import Registry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NoOptions:
    """Options of a tuner that has none (full, BitFit, LN, classifier)."""


def auto_bottleneck(num_classes: int, num_blocks: int) -> int:
    """LIFT's rule r = 2^max(0, floor(log2(C / 2L))), in integer arithmetic (no float rounding at powers of 2).

    Equal to LIFT's `2 ** max(0, int(math.log2(C / (2 L))))`: int() truncates towards zero, which only differs
    from floor below 0, where max(0, .) takes over."""
    if num_classes < 1 or num_blocks < 1:
        raise ValueError("num_classes and num_blocks must be >= 1")
    k = 0
    while (2 ** (k + 1)) * 2 * num_blocks <= num_classes:
        k += 1
    return 2**k


def resolve_bottleneck(given: int | None, num_classes: int | None, num_blocks: int, tuner: str) -> int:
    """The bottleneck every bottleneck tuner uses: `given`, else LIFT's rule from C and L."""
    if given is not None:
        return given
    if num_classes is None:
        raise ConfigError(f"tuner {tuner!r} needs a bottleneck or the number of classes for LIFT's rule")
    return auto_bottleneck(num_classes, num_blocks)


def check_positive(key: str, value: float | None) -> None:
    """Options validation: `value` (when given) must be > 0; the error names the option."""
    if value is not None and value <= 0:
        raise ConfigError(f"{key}={value!r} must be > 0")


class Tuner(nn.Module, ABC):
    """Base class. Subclasses set `Options`, implement `build` (sized for a backbone) and `_attach`.

    `blocks` lists the blocks holding the tuner's own modules; `params_per_block()` is the per-block parameter
    count of the tuner's formula, so `num_own_parameters() == len(blocks) * params_per_block()`."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    needs_hooks: ClassVar[bool] = True

    def __init__(self, options: Any, blocks: Iterable[int] = ()) -> None:
        super().__init__()
        self.options = options  # resolved (e.g. the bottleneck LIFT's rule chose), recorded in results
        self.blocks = list(blocks)
        self._removers: list[Callable[[], None]] = []
        self._unfrozen: list[nn.Parameter] = []
        self._attached = False

    @classmethod
    @abstractmethod
    def build(cls, backbone: Backbone, options: Any, num_classes: int | None) -> Tuner:
        """A tuner sized for `backbone` from its options (not attached yet)."""

    @abstractmethod
    def _attach(self, backbone: Backbone) -> list[Callable[[], None]]:
        """Register hooks / unfreeze parameters; return the functions that undo it."""

    def params_per_block(self) -> int | None:
        """Own parameters per tuned block by formula; None for tuners that train backbone parameters."""
        return None

    @classmethod
    def check_backbone(cls, backbone: Backbone) -> None:
        if cls.needs_hooks and not backbone.hooks.num_blocks:
            raise ConfigError(
                f"tuner {cls.name!r} needs a ViT tower with hook points; {backbone.name!r} has none "
                "(ResNet towers take the full, bitfit and classifier tuners)"
            )

    def attach(self, backbone: Backbone) -> Tuner:
        if self._attached:
            raise RuntimeError(f"{type(self).__name__} is already attached; detach() it first")
        self.check_backbone(backbone)
        self._removers = list(self._attach(backbone))
        self._attached = True
        return self

    def unfreeze(self, params: Iterable[nn.Parameter]) -> int:
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
        self._attached = False

    @property
    def attached(self) -> bool:
        return self._attached

    def num_own_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


TUNERS: Registry[type[Tuner]] = Registry("tuner")


def register_tuner(name: str) -> Callable[[type[Tuner]], type[Tuner]]:
    def deco(cls: type[Tuner]) -> type[Tuner]:
        cls.name = name
        return TUNERS.register(name)(cls)

    return deco


def build_tuner(name: str, backbone: Backbone, options: Any = None, *, num_classes: int | None = None) -> Tuner:
    """The named tuner sized for `backbone`, attached. `options`: an instance of the tuner's `Options` dataclass
    (None: its defaults); `num_classes` feeds LIFT's bottleneck rule where no bottleneck is given."""
    cls = TUNERS.get(name)
    options = cls.Options() if options is None else options
    if not isinstance(options, cls.Options):
        raise ConfigError(f"tuner {name!r} takes {cls.Options.__name__}, got {type(options).__name__}")
    cls.check_backbone(backbone)
    return cls.build(backbone, options, num_classes).attach(backbone)
