"""LIFT (Shi et al., ICML 2024): AdaptFormer in every block of the frozen image tower + a text-initialised
cosine classifier on the pre-projection feature + the logit-adjusted loss. Every other row of LIFT's tuner
table (full, classifier, BitFit, LN, VPT, LoRA, Adapter) is the same method with `lift.tuner=<name>`.

LIFT+ options are explicit switches (see `configs/lift/lift_plus_*.yaml`), never mixed in silently:
`crop=square_schedule` (square crops whose minimum scale grows linearly from `crop_min_scale` to 1 over the
epochs), `flip=false`, `interpolation=bicubic`; the 5 epochs at lr 0.02 are train options in the preset.
The square-crop schedule is our reading of LIFT+'s minimalist augmentation, offered as a named option."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor
from torchvision import transforms as T

from ..backbones.base import Backbone
from ..config import check_choice, check_range
from ..data.base import Task
from ..errors import ConfigError
from ..heads import LIFT_TEMPLATES, build_head, text_init_weights
from ..losses import build_loss
from ..tuners import TUNERS, auto_bottleneck, build_tuner
from .base import Method, Output, register_method

log = logging.getLogger(__name__)

TUNER_NAMES = ("adaptformer", "adapter", "lora", "vpt_deep", "vpt_shallow", "full", "bitfit", "ln", "classifier")


@dataclass
class LIFTConfig:
    tuner: str = "adaptformer"  # one of TUNER_NAMES (LIFT's table rows)
    bottleneck: int | None = None  # r for adaptformer/adapter/lora; None: 2^max(0, floor(log2(C / 2L)))
    vpt_length: int = 10  # prompt tokens (per block for vpt_deep)
    lora_alpha: float | None = None  # LoRA scaling alpha / r (None: alpha = r)
    head: str = "cosine"  # cosine | linear
    head_init: str = "text"  # text: "a photo of a {}." features mapped through proj^T; random
    head_templates: list[str] = field(default_factory=lambda: list(LIFT_TEMPLATES))
    scale: float = 25.0  # cosine-classifier sigma
    loss: str = "la"  # la (logit-adjusted) | ce | bs (balanced softmax)
    tau: float = 1.0  # LA temperature
    # train-time augmentation (LIFT: RandomResizedCrop(scale 0.08-1) + flip, the backbone's interpolation)
    crop: str = "rrc"  # rrc | square_schedule (LIFT+)
    crop_min_scale: float = 0.08  # rrc: lower scale bound; square_schedule: starting lower bound
    flip: bool = True
    interpolation: str | None = None  # None: the backbone's (bicubic for OpenAI CLIP)

    def __post_init__(self) -> None:
        check_choice("lift.tuner", self.tuner, TUNER_NAMES)
        check_choice("lift.head", self.head, ("cosine", "linear"))
        check_choice("lift.head_init", self.head_init, ("text", "random"))
        check_choice("lift.loss", self.loss, ("la", "ce", "bs"))
        check_choice("lift.crop", self.crop, ("rrc", "square_schedule"))
        check_range("lift.crop_min_scale", self.crop_min_scale, 0.0, 1.0)
        if self.bottleneck is not None and self.bottleneck < 1:
            raise ConfigError(f"lift.bottleneck={self.bottleneck} must be >= 1")
        if self.vpt_length < 1:
            raise ConfigError(f"lift.vpt_length={self.vpt_length} must be >= 1")


@register_method("lift")
class LIFT(Method):
    """AdaptFormer + text-initialised cosine classifier + logit-adjusted loss (other tuners via lift.tuner)."""

    Config = LIFTConfig

    def __init__(self, cfg: LIFTConfig, backbone: Backbone, task: Task) -> None:
        super().__init__(cfg, backbone, task)
        self.tuner_name = cfg.tuner
        self.bottleneck = cfg.bottleneck
        if cfg.tuner in ("adaptformer", "adapter", "lora") and cfg.bottleneck is None:
            self.bottleneck = auto_bottleneck(task.num_classes, backbone.num_blocks)
        assert cfg.tuner in TUNERS
        self.tuner = build_tuner(
            cfg.tuner, backbone, bottleneck=self.bottleneck, num_classes=task.num_classes,
            vpt_length=cfg.vpt_length, lora_alpha=cfg.lora_alpha,
        )
        init = text_init_weights(backbone, task.classnames, cfg.head_templates) if cfg.head_init == "text" else None
        self.head = build_head(cfg.head, backbone.width if backbone.visual_proj is not None else backbone.embed_dim,
                               task.num_classes, init, cfg.scale)
        counts = task.class_counts
        self.loss_fn = build_loss(cfg.loss, counts, **({"tau": cfg.tau} if cfg.loss != "ce" else {}))
        self.num_epochs_hint: int | None = None
        log.info("LIFT: tuner %s%s, %s head (%s init), %s loss; %d trainable parameters", cfg.tuner,
                 f" (r={self.bottleneck})" if self.bottleneck else "", cfg.head, cfg.head_init, cfg.loss,
                 self.num_trainable())

    def features(self, images: Tensor) -> Tensor:
        """The d-dim feature before CLIP's projection (after ln_post), with the tuner active."""
        return self.backbone.encode_image(images).pre_proj

    def forward(self, images: Tensor, labels: Tensor | None = None) -> Output:
        logits = self.head(self.features(images))
        return Output(logits, self.loss_fn(logits, labels) if labels is not None else None)

    def train_transform(self, epoch: int) -> T.Compose:
        """RandomResizedCrop + flip (LIFT), or LIFT+'s square crops with a growing minimum scale."""
        from ..data.transforms import _to_tensor, interpolation_mode, train_transform

        pre = self.backbone.preprocess
        if self.cfg.crop == "rrc":
            return train_transform(pre, scale=(self.cfg.crop_min_scale, 1.0), interpolation=self.cfg.interpolation,
                                   flip=self.cfg.flip)
        epochs = max(self.num_epochs_hint or 1, 1)
        frac = epoch / max(epochs - 1, 1)
        low = self.cfg.crop_min_scale + (1.0 - self.cfg.crop_min_scale) * frac
        interp = interpolation_mode(self.cfg.interpolation or pre.interpolation)
        steps: list[Any] = [T.RandomResizedCrop(pre.image_size, scale=(low, 1.0), ratio=(1.0, 1.0),
                                                interpolation=interp)]
        if self.cfg.flip:
            steps.append(T.RandomHorizontalFlip())
        return T.Compose(steps + _to_tensor(pre))

    def fit(self, ctx: Any) -> None:
        from ..engine.trainer import train

        self.num_epochs_hint = ctx.cfg.train.epochs
        self.train_summary = train(self, ctx)

    def extra_results(self) -> dict[str, Any]:
        out: dict[str, Any] = {"tuner": self.tuner_name, "bottleneck": self.bottleneck,
                               "tuner_params": sum(p.numel() for p in self.tuner.parameters()),
                               "head_params": sum(p.numel() for p in self.head.parameters())}
        if getattr(self, "train_summary", None) is not None:
            out["training"] = self.train_summary.to_dict()
        return out
