"""Sage's Semantic-Guided Adapter (Peng, Zhang, Cheung; equations 7-9, Table 9, Appendix E), in every block.

With h = f~ the residual stream after attention and w_bar the mean of the *trainable* classifier's rows:

    f_v  = LN(h)                              (B, N, d)
    f_t  = LN(w_bar) broadcast over tokens    (d,)   the same LN (Table 9 counts one LN per block)
    f_vt = (f_t W_proj) * f_v                 W_proj d x d with bias; without W_proj (Appendix E): f_t * f_v
    g    = [f_v W_down^v || f_vt W_down^vt + s_vt * f_t W_down^t]       (2r wide; each down d -> r with bias)
    out  = alpha * (ReLU(g) W_up) + (1 - alpha) * (g W_up)               (W_up 2r -> d with bias, zero-initialised)
    block output = MLP(LN_2(h)) + s * out + h                           (s learnable, s_vt learnable)

Parameters per block: LN 2d + W_proj d^2 + d + downs 3(dr + r) + W_up 2rd + d + s_vt, s 2
= (5r + d + 4) d + 3r + 2, Table 9's formula; without W_proj (d^2 + d fewer): (5r + 3) d + 3r + 2.

Space of w_bar: the classifier Sage (and LIFT) trains is a cosine head on the d-wide pre-projection feature. Its
rows were initialised from CLIP's D-wide text features mapped back through visual_proj^T (`heads.text_init_weights`,
as LIFT's head init), so they already live in the visual stream's width d: w_bar is the plain mean of the head's
raw weight rows (the parameter itself, so gradients flow into the classifier through the guidance), with no
further mapping. The D -> d step happens once, at the head's initialisation.

The guidance is read every forward from `SGAdapterOptions.guidance`, a callable the method hands over that returns
the current (C, d) classifier weight. The tuner keeps the callable as `self.guidance`; the options it records in
results drop it (a function is not a result)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from ..backbones.base import Backbone
from ..config import check_range
from ..errors import ConfigError
from .base import Tuner, check_positive, register_tuner, resolve_bottleneck

Guidance = Callable[[], Tensor]


def _kaiming(linear: nn.Linear) -> None:
    """LIFT's adapter init (kaiming_normal_(a=sqrt(5)), zero bias) for every SG down-projection and W_proj: the
    paper initialises the adapter "randomly" without naming a distribution, so we use the init of the AdaptFormer
    it replaces."""
    nn.init.kaiming_normal_(linear.weight, a=math.sqrt(5))
    nn.init.zeros_(linear.bias)


class SGBranch(nn.Module):
    """One block's SG-Adapter branch: (h (B, N, d), w_bar (d,)) -> s * out (B, N, d)  (equations 7-8)."""

    def __init__(self, dim: int, bottleneck: int, alpha: float, w_proj: bool = True, scale: float = 1.0,
                 text_scale: float = 1.0) -> None:
        super().__init__()
        self.alpha = float(alpha)  # a fixed hyper-parameter (Table 8), not learned
        self.ln = nn.LayerNorm(dim)  # shared by f_v and f_t
        self.proj = nn.Linear(dim, dim) if w_proj else None
        self.down_v = nn.Linear(dim, bottleneck)
        self.down_vt = nn.Linear(dim, bottleneck)
        self.down_t = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(2 * bottleneck, dim)
        for lin in (self.proj, self.down_v, self.down_vt, self.down_t):
            if lin is not None:
                _kaiming(lin)
        nn.init.zeros_(self.up.weight)  # zero up-projection: the branch outputs 0, the block is the frozen one
        nn.init.zeros_(self.up.bias)
        self.s_vt = nn.Parameter(torch.full((), float(text_scale)))
        self.s = nn.Parameter(torch.full((), float(scale)))

    @staticmethod
    def num_parameters(dim: int, bottleneck: int, w_proj: bool = True) -> int:
        """(5r + d + 4) d + 3r + 2 (Table 9); without W_proj d^2 + d fewer."""
        full = (5 * bottleneck + dim + 4) * dim + 3 * bottleneck + 2
        return full if w_proj else full - dim * dim - dim

    def forward(self, h: Tensor, w_bar: Tensor) -> Tensor:
        dtype = h.dtype
        wdt = self.down_v.weight.dtype
        f_v = self.ln(h.to(wdt))
        # f_t is the same vector for every token (repeat(w_bar, b, 1) in eq. 7): computed once, broadcast below
        f_t = self.ln(w_bar.to(wdt))
        guide = self.proj(f_t) if self.proj is not None else f_t
        f_vt = guide * f_v
        g = torch.cat([self.down_v(f_v), self.down_vt(f_vt) + self.s_vt * self.down_t(f_t)], dim=-1)
        # alpha (ReLU(g) W_up + b) + (1 - alpha)(g W_up + b) == (alpha ReLU(g) + (1 - alpha) g) W_up + b
        out = self.up(self.alpha * torch.relu(g) + (1.0 - self.alpha) * g)
        return (self.s * out).to(dtype)


@dataclass(frozen=True)
class SGAdapterOptions:
    bottleneck: int | None = None  # r; None: LIFT's rule 2^max(0, floor(log2(C / 2L)))
    alpha: float = 0.1  # mix of the ReLU and linear paths (Table 8: 0.1 CIFAR, 0.8 ImageNet-LT/Places-LT, 1.0 iNat)
    w_proj: bool = True  # False: Appendix E's SG-Adapter without W_proj
    scale: float = 1.0  # s at init (as AdaptFormer)
    text_scale: float = 1.0  # s_vt at init (not given in the paper; 1 weighs f_t's path like f_vt's)
    # returns the current (C, d) trainable classifier weight; handed over by the method (sage, lift)
    guidance: Guidance | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        check_positive("sg_adapter.bottleneck", self.bottleneck)
        check_range("sg_adapter.alpha", self.alpha, 0.0, 1.0)


@register_tuner("sg_adapter")
class SGAdapter(Tuner):
    """Sage's SG-Adapter in every block, parallel to the MLP: out = h + MLP(LN2(h)) + s * SG(h, w_bar).

    Registered at `blocks.{i}.mlp` as (h, m) -> m + s * SG(h, w_bar); w_bar = guidance().mean(0), read each forward."""

    Options = SGAdapterOptions

    def __init__(self, dim: int, num_blocks: int, options: SGAdapterOptions, guidance: Guidance) -> None:
        if options.bottleneck is None:
            raise ValueError("SGAdapter needs a resolved bottleneck; use build_tuner or SGAdapter.build")
        super().__init__(replace(options, guidance=None), range(num_blocks))
        self.dim, self.bottleneck = dim, options.bottleneck
        self.guidance = guidance
        self.branches = nn.ModuleList(
            SGBranch(dim, self.bottleneck, options.alpha, options.w_proj, options.scale, options.text_scale)
            for _ in self.blocks
        )

    @classmethod
    def build(cls, backbone: Backbone, options: SGAdapterOptions, num_classes: int | None) -> SGAdapter:
        if options.guidance is None:
            raise ConfigError("tuner 'sg_adapter' needs the classifier's weights as guidance "
                              "(SGAdapterOptions.guidance); use it through method sage or lift, which hand them over")
        width = options.guidance().shape[-1]
        if width != backbone.width:
            raise ConfigError(f"tuner 'sg_adapter': the classifier is {width}-wide but the visual stream is "
                              f"{backbone.width}-wide; the head must act on the pre-projection feature")
        r = resolve_bottleneck(options.bottleneck, num_classes, backbone.num_blocks, cls.name)
        return cls(backbone.width, backbone.num_blocks, replace(options, bottleneck=r), options.guidance)

    def params_per_block(self) -> int:
        return SGBranch.num_parameters(self.dim, self.bottleneck, self.options.w_proj)

    def _attach(self, backbone: Backbone) -> list[Callable[[], None]]:
        removers = []
        for branch, i in zip(self.branches, self.blocks):
            def hook(h: Tensor, m: Tensor, b: SGBranch = branch) -> Tensor:
                return m + b(h, self.guidance().mean(dim=0))

            removers.append(backbone.hooks.add(f"blocks.{i}.mlp", hook))
        return removers
