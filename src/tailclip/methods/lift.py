"""LIFT (Shi et al., ICML 2024): AdaptFormer in every block of the frozen image tower + a text-initialised
cosine classifier on the pre-projection feature + the logit-adjusted loss. Every other row of LIFT's tuner
table (full, classifier, BitFit, LN, VPT, LoRA, Adapter) is the same method with `lift.tuner=<name>`: any
registered tuner (`tailclip.tuners.TUNERS`), each following LIFT's released code; `lift.tuner=sg_adapter` (Sage's
SG-Adapter) reads the head's live weights, which LIFT hands over. `lift.loss` is any registered loss (`cf`: Sage's).

Images as LIFT's trainer prepares them: bilinear interpolation (torchvision's default), RandomResizedCrop +
flip for training, Resize(S * 8 // 7) -> CenterCrop(S) for evaluation (256 -> 224) and, with five-crop TTE,
Resize(S + 3p/2) (248 for ViT-B/16, 245 for ViT-L/14); see `data/transforms.py`.

LIFT+ options are explicit switches (see `configs/lift/lift_plus_*.yaml`), never mixed in silently:
`crop=square_schedule` (square crops whose minimum scale grows linearly from `crop_min_scale` to 1 over the
epochs), `flip=false`, `interpolation=bicubic`; the 5 epochs at lr 0.02 are train options in the preset.
The square-crop schedule is our reading of LIFT+'s minimalist augmentation, offered as a named option.

Equations, the released protocol, the named options and every deliberate difference: docs/methods/lift.md."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from ..backbones.base import Backbone
from ..config import check_choice, check_range
from ..contract import Method, Output, register_method
from ..data.base import TaskInfo
from ..data.transforms import INTERPOLATIONS, lift_test_transform, lift_train_transform
from ..errors import ConfigError
from ..heads import HEADS, LIFT_TEMPLATES, build_head, text_init_weights
from ..losses import build_loss, loss_names, options_for
from ..tuners import TUNERS, build_tuner

log = logging.getLogger(__name__)


@dataclass
class LIFTConfig:
    tuner: str = "adaptformer"  # a registered tuner (LIFT's table rows): tailclip.tuners.TUNERS
    bottleneck: int | None = None  # r of adaptformer / adapter, LoRA's rank; None: 2^max(0, floor(log2(C / 2L)))
    vpt_length: int = 10  # prompt tokens (per block for vpt_deep)
    lora_alpha: float = 1.0  # LoRA scaling alpha / r (LIFT: 1/r)
    head: str = "cosine"  # a registered head: cosine | linear
    head_init: str = "text"  # text: "a photo of a {}." features mapped through proj^T; random
    head_templates: list[str] = field(default_factory=lambda: list(LIFT_TEMPLATES))
    scale: float = 25.0  # cosine-classifier sigma
    loss: str = "la"  # a registered loss: la (logit-adjusted) | ce | bs (balanced softmax) | cf (Sage's) ...
    tau: float = 1.0  # LA temperature
    # train-time augmentation (LIFT: RandomResizedCrop(scale 0.08-1) + flip)
    crop: str = "rrc"  # rrc | square_schedule (LIFT+)
    crop_min_scale: float = 0.08  # rrc: lower scale bound; square_schedule: starting lower bound
    flip: bool = True
    interpolation: str = "bilinear"  # train and eval resizing; LIFT: torchvision's default (bilinear)

    def __post_init__(self) -> None:
        check_choice("lift.tuner", self.tuner, tuple(TUNERS))
        check_choice("lift.head", self.head, tuple(HEADS))
        check_choice("lift.head_init", self.head_init, ("text", "random"))
        check_choice("lift.loss", self.loss, loss_names())
        check_choice("lift.crop", self.crop, ("rrc", "square_schedule"))
        check_choice("lift.interpolation", self.interpolation, tuple(INTERPOLATIONS))
        check_range("lift.crop_min_scale", self.crop_min_scale, 0.0, 1.0)
        if self.bottleneck is not None and self.bottleneck < 1:
            raise ConfigError(f"lift.bottleneck={self.bottleneck} must be >= 1")
        if self.vpt_length < 1:
            raise ConfigError(f"lift.vpt_length={self.vpt_length} must be >= 1")
        if self.lora_alpha <= 0:
            raise ConfigError(f"lift.lora_alpha={self.lora_alpha} must be > 0")

    def tuner_options(self, guidance: Callable[[], Tensor] | None = None) -> Any:
        """LIFT's flat options mapped onto the chosen tuner's typed options: LIFT's one `adapter_dim` is the
        bottleneck of every bottleneck tuner and LoRA's rank; `guidance` (the head's current weights) goes to a
        tuner that reads the classifier (sg_adapter). LoRA's `alpha` is only LoRA's: Sage's SG-Adapter keeps its
        own alpha default under LIFT."""
        cls = TUNERS.get(self.tuner).Options
        given = {"bottleneck": self.bottleneck, "rank": self.bottleneck, "length": self.vpt_length,
                 "guidance": guidance}
        if self.tuner == "lora":
            given["alpha"] = self.lora_alpha
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in given.items() if k in names})


@register_method("lift")
class LIFT(Method):
    """A tuner (AdaptFormer by default) + text-initialised cosine classifier + logit-adjusted loss."""

    Config = LIFTConfig

    def __init__(self, cfg: LIFTConfig, backbone: Backbone, info: TaskInfo) -> None:
        super().__init__(cfg, backbone, info)
        init = text_init_weights(backbone, info.classnames, cfg.head_templates) if cfg.head_init == "text" else None
        self.head = build_head(cfg.head, backbone.pre_proj_width, info.num_classes, init, cfg.scale)
        # the head exists first: a tuner reading the classifier (sg_adapter) gets its live weights
        self.tuner = build_tuner(cfg.tuner, backbone, cfg.tuner_options(self.head.class_weights),
                                 num_classes=info.num_classes)
        self.loss_fn = build_loss(cfg.loss, info.class_counts, **options_for(cfg.loss, tau=cfg.tau))
        self.num_epochs = 1  # set by on_epoch_start: LIFT+'s crop schedule spans the run's epochs
        log.info("LIFT: tuner %s %s, %s head (%s init), %s loss; %d trainable parameters", cfg.tuner,
                 dataclasses.asdict(self.tuner.options), cfg.head, cfg.head_init, cfg.loss, self.num_trainable())

    def features(self, images: Tensor) -> Tensor:
        """The d-dim feature before CLIP's projection (after ln_post), with the tuner active."""
        return self.backbone.encode_image(images).pre_proj

    def forward(self, images: Tensor, labels: Tensor | None = None) -> Output:
        logits = self.head(self.features(images))
        return Output(logits, self.loss_fn(logits, labels) if labels is not None else None)

    def train_transform(self, epoch: int) -> Callable[[Any], Tensor]:
        """RandomResizedCrop + flip (LIFT), or LIFT+'s square crops with a minimum scale growing to 1."""
        cfg = self.cfg
        progress = None if cfg.crop == "rrc" else epoch / max(max(self.num_epochs, 1) - 1, 1)
        return lift_train_transform(self.backbone.preprocess, cfg.crop_min_scale, cfg.interpolation, cfg.flip, progress)

    def eval_transform(self, tte: str) -> Callable[[Any], Tensor]:
        """LIFT's test transforms (`data.transforms.lift_test_transform`)."""
        return lift_test_transform(self.backbone.preprocess, self.backbone.patch_size, tte, self.cfg.interpolation)

    def on_epoch_start(self, epoch: int, num_epochs: int) -> None:
        self.num_epochs = num_epochs

    def extra_results(self) -> dict[str, Any]:
        out: dict[str, Any] = {"tuner": self.cfg.tuner, "tuner_options": dataclasses.asdict(self.tuner.options),
                               "tuner_params": self.num_trainable() - self.head_params(),
                               "head_params": self.head_params()}
        return out

    def head_params(self) -> int:
        return sum(p.numel() for p in self.head.parameters())
