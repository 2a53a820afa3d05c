"""The method contract. A method is an nn.Module holding the (frozen) backbone plus its own parts; `fit`
does whatever training it needs, `predict` gives logits for a split. The orchestrator (`tailclip.api`)
only ever calls these, so every registered method runs through the same CLI, run folder and tests.

A method is built from a `TaskInfo` (names, templates, counts, base/new classes: never images) and fitted
with a `FitContext` whose task cannot read its test splits (`Task.guarded`). Optional behaviour is declared
here as methods with no-op defaults that the engine always calls; nothing is discovered with `hasattr`."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..backbones.base import Backbone
from ..config import RunConfig, register_method_config
from ..data.base import Task, TaskInfo
from ..registry import Registry

log = logging.getLogger(__name__)


@dataclass
class Output:
    logits: Tensor
    loss: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class FitContext:
    """What `fit`/`predict` get besides the method itself. During `fit`, `task` is the guarded view whose test
    splits raise when read; `predict` gets the full task."""

    cfg: RunConfig
    task: Task
    run_dir: Path
    device: torch.device


@dataclass
class Predictions:
    logits: Tensor  # (N, C) float32 on CPU
    labels: Tensor  # (N,) int64
    indices: Tensor  # (N,) positions in the split (missing ones were skipped as bad images)
    skipped: list[str] = field(default_factory=list)


class Method(nn.Module, ABC):
    """Base class. Subclasses set `name` via @register_method, `Config` (a dataclass or None) and `inputs`."""

    name: ClassVar[str] = ""
    Config: ClassVar[type | None] = None
    inputs: ClassVar[str] = "images"  # "images": runs the backbone per batch; "features": trains from the cache

    def __init__(self, cfg: Any, backbone: Backbone, info: TaskInfo) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.info = info
        self.num_classes = info.num_classes
        backbone.requires_grad_(False)

    # --- what methods implement -------------------------------------------------------------------
    @abstractmethod
    def forward(self, images: Tensor, labels: Tensor | None = None) -> Output:
        """Logits for a batch of images (and the training loss when labels are given)."""

    def fit(self, ctx: FitContext) -> None:
        """Train. Default: gradient training with the engine when the method has trainable parameters."""
        if any(True for _ in self.trainable_parameters()):
            from ..engine.trainer import train

            train(self, ctx)

    def predict(self, ctx: FitContext, split: str) -> Predictions:
        """Logits for a whole split. Default: the engine's image loop (with the configured TTE)."""
        from ..engine.evaluate import predict_images

        return predict_images(self, ctx, split)

    # --- optional behaviour: the engine always calls these; the defaults do nothing special ----------
    def train_transform(self, epoch: int) -> Callable[[Any], Tensor] | None:
        """The image transform of training epoch `epoch`; None: RandomResizedCrop + flip from the backbone's
        preprocessing (LIFT+ overrides this for its crop schedule)."""
        return None

    def eval_transform(self, tte: str) -> Callable[[Any], Tensor] | None:
        """The evaluation transform for test-time ensembling mode `tte`; None: the backbone's preprocessing."""
        return None

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups: dicts with "params" and an optional "lr_scale" applied on top of the
        schedule. Default: one group of every trainable parameter."""
        return [{"params": [p for _, p in self.trainable_parameters()]}]

    def extra_results(self) -> dict[str, Any]:
        """Method-specific entries merged into results.json (chosen hyper-parameters, selection protocol...)."""
        return {}

    # --- shared helpers --------------------------------------------------------------------------
    def trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Parameters that train (the backbone is frozen unless a tuner unfroze part of it on purpose)."""
        return ((n, p) for n, p in self.named_parameters() if p.requires_grad)

    def num_trainable(self) -> int:
        return sum(p.numel() for _, p in self.trainable_parameters())

    def checkpoint_state(self) -> dict[str, Tensor]:
        """What a checkpoint stores: trainable parameters plus the method's own buffers; never frozen CLIP."""
        trainable = {n for n, _ in self.trainable_parameters()}
        return {
            k: v.detach().cpu().contiguous()
            for k, v in self.state_dict().items()
            if k in trainable or not k.startswith("backbone.")
        }

    def load_checkpoint_state(self, state: dict[str, Tensor]) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        expected = set(self.checkpoint_state())
        really_missing = sorted(expected & set(missing))
        if really_missing or unexpected:
            raise RuntimeError(f"checkpoint does not fit this method: missing {really_missing}, unexpected {unexpected}")


MethodClass = type[Method]
METHODS: Registry[MethodClass] = Registry("method")


def register_method(name: str) -> Callable[[MethodClass], MethodClass]:
    def deco(cls: MethodClass) -> MethodClass:
        cls.name = name
        register_method_config(name, cls.Config)
        return METHODS.register(name)(cls)

    return deco
