"""Sage (Peng, Zhang, Cheung): LIFT's frozen image tower and cosine head, plus
1. the SG-Adapter in every block (`tuners/sg_adapter.py`, equations 7-9): AdaptFormer's branch guided by the mean
   of the trainable classifier's weights;
2. the classifier initialised from the 60-template ensemble of Appendix F (`sage60`), mapped to the pre-projection
   space through visual_proj^T (`heads.text_init_weights`, as LIFT);
3. the compensation factor inside the LA loss (`losses/compensation.py`, loss `cf`, equations 21-22);
4. FIT, the feature interchange (equations 23-24):
       z = W f,  z^v = W f_zs,  z^t = W^zs f,  z_hat = z + s1 z^v + s2 z^t
       loss = l(z) + lambda1 l(z^v) + lambda2 l(z^t) + lambda3 l(z_hat),   predict with z_hat
   f the tuned pre-projection feature, f_zs the frozen model's feature of the *same* (augmented) images in the same
   step (hooks paused, no grad: a second forward, also at evaluation), W^zs the frozen text classifier in the same
   (pre-projection) space as W, i.e. W's initialisation; every product is the cosine head's sigma * cos.

Each component is a switch, so the ablation tables (5-6) are one command (`tailclip table configs/sage/ablation.yaml`):
LIFT = `sage.adapter=adaptformer sage.init=lift sage.loss=la sage.fit=false`; + SG: `sage.adapter=sg`; + Init:
`sage.init=sage60`; + CF: `sage.loss=cf`; + FIT: `sage.fit=true` (the defaults are the full method). Appendix E's
SG-Adapter without W_proj: `sage.w_proj=false`. Images as LIFT: RandomResizedCrop + flip, bilinear, LIFT's test
resizing and five-crop TTE."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones.base import Backbone
from ..config import check_choice, check_range
from ..contract import Method, Output, register_method
from ..data.base import TaskInfo
from ..data.templates import get_templates
from ..data.transforms import INTERPOLATIONS, lift_test_transform, lift_train_transform
from ..errors import ConfigError
from ..heads import LIFT_TEMPLATES, build_head, text_init_weights
from ..losses import build_loss, loss_names, options_for
from ..losses.compensation import CF_READINGS
from ..tuners import AdaptFormerOptions, SGAdapterOptions, build_tuner

log = logging.getLogger(__name__)

INITS = {"lift": list(LIFT_TEMPLATES), "sage60": get_templates("sage60")}
ADAPTERS = {"sg": "sg_adapter", "adaptformer": "adaptformer"}

@dataclass
class SageConfig:
    # defaults: the full method with Table 8's CIFAR-100-LT beta = 100 settings
    adapter: str = "sg"  # sg (SG-Adapter) | adaptformer (LIFT's; the ablation's first row)
    bottleneck: int | None = None  # r; None: LIFT's rule 2^max(0, floor(log2(C / 2L)))
    alpha: float = 0.1  # SG-Adapter's ReLU / linear mix (Table 8)
    w_proj: bool = True  # False: the SG-Adapter without W_proj (Appendix E)
    init: str = "sage60"  # head init templates: sage60 (Appendix F) | lift ("a photo of a {}.")
    scale: float = 25.0  # cosine-classifier sigma (LIFT)
    loss: str = "cf"  # a registered loss: cf (LA + compensation factor) | la | ce | bs ...
    tau: float = 1.0  # LA temperature (la, bs, cf)
    mu: float = 0.5  # cf: Lambda_i = mu n_i^gamma S_N / (C n_min)
    gamma: float = 0.05
    # cf: product = eq. 22 as printed (LA with the prior raised to 1 + gamma: mu cancels) | additive = Lambda added
    # to the logits without the log (mu matters, as Fig. 8 suggests); docs/methods/sage.md
    cf_reading: str = "product"
    fit: bool = True  # the feature interchange (eq. 23-24)
    lambda1: float = 0.015  # weight of l(z^v)
    lambda2: float = 0.015  # weight of l(z^t)
    lambda3: float = 0.4  # weight of l(z_hat)
    # s1, s2 at init (the paper gives none). 1: z_hat starts as z + z^v + z^t, so FIT interchanges features on every
    # preset; at 0 their gradients carry lambda3's factor and FIT stays off where lambda3 = 1e-7 (iNat, Table 8)
    fit_init: float = 1.0
    crop_min_scale: float = 0.08  # RandomResizedCrop's lower scale bound (LIFT)
    flip: bool = True
    interpolation: str = "bilinear"  # as LIFT

    def __post_init__(self) -> None:
        check_choice("sage.adapter", self.adapter, tuple(ADAPTERS))
        check_choice("sage.init", self.init, tuple(INITS))
        check_choice("sage.loss", self.loss, loss_names())
        check_choice("sage.cf_reading", self.cf_reading, CF_READINGS)
        check_choice("sage.interpolation", self.interpolation, tuple(INTERPOLATIONS))
        check_range("sage.alpha", self.alpha, 0.0, 1.0)
        check_range("sage.crop_min_scale", self.crop_min_scale, 0.0, 1.0)
        for key in ("lambda1", "lambda2", "lambda3"):
            check_range(f"sage.{key}", getattr(self, key), 0.0)
        if self.bottleneck is not None and self.bottleneck < 1:
            raise ConfigError(f"sage.bottleneck={self.bottleneck} must be >= 1")
        if self.mu <= 0:
            raise ConfigError(f"sage.mu={self.mu} must be > 0")

    def loss_options(self) -> dict[str, Any]:
        """Options of the chosen loss: tau for every prior-adjusting loss, mu, gamma and the reading for cf."""
        return options_for(self.loss, tau=self.tau, mu=self.mu, gamma=self.gamma, reading=self.cf_reading)


@register_method("sage")
class Sage(Method):
    """SG-Adapter + 60-template head init + compensated LA loss + feature interchange (FIT), on LIFT's recipe."""

    Config = SageConfig

    def __init__(self, cfg: SageConfig, backbone: Backbone, info: TaskInfo) -> None:
        super().__init__(cfg, backbone, info)
        text = text_init_weights(backbone, info.classnames, INITS[cfg.init])  # (C, d): through proj^T, normalised
        self.head = build_head("cosine", backbone.pre_proj_width, info.num_classes, text, cfg.scale)
        if cfg.adapter == "sg":
            # the guidance is the head's weight parameter itself: w_bar = its row mean, gradients flow into W
            options: Any = SGAdapterOptions(cfg.bottleneck, cfg.alpha, cfg.w_proj, guidance=self.head.class_weights)
        else:
            options = AdaptFormerOptions(cfg.bottleneck)
        self.tuner = build_tuner(ADAPTERS[cfg.adapter], backbone, options, num_classes=info.num_classes)
        self.loss_fn = build_loss(cfg.loss, info.class_counts, **cfg.loss_options())
        # FIT: the frozen text classifier W^zs (W's init, same space), learnable s1, s2
        self.register_buffer("zs_weight", text.clone(), persistent=False)
        self.s1 = nn.Parameter(torch.full((), float(cfg.fit_init)), requires_grad=cfg.fit)
        self.s2 = nn.Parameter(torch.full((), float(cfg.fit_init)), requires_grad=cfg.fit)
        log.info("Sage: %s adapter (r=%d), %s init, %s loss, FIT %s; %d trainable parameters", cfg.adapter,
                 self.tuner.bottleneck, cfg.init, cfg.loss, "on" if cfg.fit else "off", self.num_trainable())

    def features(self, images: Tensor) -> Tensor:
        """f: the pre-projection feature (after ln_post) with the adapter active."""
        return self.backbone.encode_image(images).pre_proj

    def zero_shot_features(self, images: Tensor) -> Tensor:
        """f_zs: the frozen model's pre-projection feature of the same images (adapter bypassed, no grad)."""
        with self.backbone.hooks.paused(), torch.no_grad():
            return self.backbone.encode_image(images).pre_proj

    def zs_logits(self, features: Tensor) -> Tensor:
        """z^t = sigma * cos(f, w^zs) with the frozen text classifier."""
        f = F.normalize(features.float(), dim=-1)
        return self.head.scale * f @ F.normalize(self.zs_weight.float(), dim=-1).t()

    def forward(self, images: Tensor, labels: Tensor | None = None) -> Output:
        f = self.features(images)
        z = self.head(f)
        if not self.cfg.fit:
            return Output(z, self.loss_fn(z, labels) if labels is not None else None)
        z_v = self.head(self.zero_shot_features(images))
        z_t = self.zs_logits(f)
        z_hat = z + self.s1 * z_v + self.s2 * z_t
        if labels is None:
            return Output(z_hat)
        terms = {"loss_z": self.loss_fn(z, labels), "loss_zv": self.loss_fn(z_v, labels),
                 "loss_zt": self.loss_fn(z_t, labels), "loss_zhat": self.loss_fn(z_hat, labels)}
        cfg = self.cfg
        loss = (terms["loss_z"] + cfg.lambda1 * terms["loss_zv"] + cfg.lambda2 * terms["loss_zt"]
                + cfg.lambda3 * terms["loss_zhat"])
        extras = {**{k: v.detach() for k, v in terms.items()}, "s1": self.s1.detach(), "s2": self.s2.detach()}
        return Output(z_hat, loss, extras)

    def train_transform(self, epoch: int) -> Callable[[Any], Tensor]:
        """LIFT's RandomResizedCrop + flip."""
        cfg = self.cfg
        return lift_train_transform(self.backbone.preprocess, cfg.crop_min_scale, cfg.interpolation, cfg.flip)

    def eval_transform(self, tte: str) -> Callable[[Any], Tensor]:
        """LIFT's test transforms (`data.transforms.lift_test_transform`)."""
        return lift_test_transform(self.backbone.preprocess, self.backbone.patch_size, tte, self.cfg.interpolation)

    def extra_results(self) -> dict[str, Any]:
        opts = self.tuner.options
        head = sum(p.numel() for p in self.head.parameters())
        fit = 2 if self.cfg.fit else 0
        out: dict[str, Any] = {
            "adapter": self.cfg.adapter, "bottleneck": self.tuner.bottleneck,
            "tuner_params": self.num_trainable() - head - fit, "head_params": head, "fit_params": fit,
            "tuner_params_per_block": self.tuner.params_per_block(),
        }
        if self.cfg.adapter == "sg":
            out.update(alpha=opts.alpha, w_proj=opts.w_proj)
        if self.cfg.fit:
            out.update(s1=float(self.s1.detach()), s2=float(self.s2.detach()))
        return out
