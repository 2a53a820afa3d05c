"""Candle (Shi et al., KDD 2024): prototypes and cross-modal attention on frozen CLIP features.

CLIP is a black box giving D-dim image features x and text features t_c (the task's prompt ensemble) for every
class, base and new. Learnable: identity-initialised projections W_I (images, prototypes) and W_T (texts), the
virtual prototypes v_j of the new classes (init: their text feature, or the mean base prototype + N(0, 0.05)
noise as the released option), and one cross-modal attention layer: Z = LN(tokens), Z + g * MHA(Z, Z, Z) with 8
heads, gate g (learnable, init 0.1) and attention dropout 0.1 (the released layer). Base prototypes p_c = mean
frozen (eval-view) train feature of each base class, fixed.

Logits (s = CLIP's logit scale, 100): l0 = s cos(x W_I, t W_T) before fusion, l_vt = s cos(x~, t~),
l_vv = s beta cos(x~, p~) after it; prediction l_vt + l_vv. Loss: CLA(l0) + CLA(l_vt) + CLA(l_vv), CLA the
compensating LA loss (prior (n_c + 1) / sum (n_k + 1)); every prototype (base and virtual) is a training sample
of its own class in every step.

Token sets. Default (per-sample, non-transductive): an image x_i is fused with [x_i; P; T] alone, so its
prediction never depends on the other images of a batch. The layer's queries P, T see one image key each; their
outputs are computed once over the shared keys [P; T] and corrected per image in closed form (the softmax weight
on the image key is sigmoid(score - logsumexp(shared scores)); exact, without B copies of a (2C)^2 attention).
Prototypes as training samples use the image-free set [P; T]. With attention dropout in training, the shared
part's dropout mask is shared by the images of a step. `transductive=true` is the released code: one token set
[X_batch; P; T] per batch, in training and at test (test predictions then depend on the test batch: reported in
results.json), in eval batches of candle.transductive_batch images (100: the released DATALOADER.TEST.BATCH_SIZE),
so its numbers match the released ones whatever eval.batch_size is. Masks (released options): in_visual blocks
visual-visual pairs (images, prototypes) except a token with itself; in_text blocks every text-text pair, a text
token with itself included (the released loop meant to unblock the diagonal indexes prototype rows); between
blocks visual-text pairs both ways.

Text features are the raw (un-normalised) `encode_text` outputs as in the released code (`candle.text_features=raw`;
with several templates, their mean): they initialise the virtual prototypes and are the text tokens; image
features and base prototypes are raw too; only the logits normalise. The released protocol, its named options and
every deliberate difference: docs/methods/candle.md.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones.base import Backbone
from ..config import EvalConfig, InputsOption, check_choice, check_range
from ..contract import FeatureSpec, FitContext, Inputs, Method, Output, register_method
from ..data.base import TaskInfo
from ..errors import DataError
from ..features import AugSpec
from ..losses import build_loss
from .clip_kit import logit_scale

log = logging.getLogger(__name__)

MASKS = ("none", "in_visual", "in_text", "between")
IMAGE, PROTO, TEXT = 0, 1, 2  # token kinds


@dataclass
class CandleConfig(InputsOption):
    mask: str = "none"  # none | in_visual | in_text | between (the released ablation masks)
    virtual_init: str = "text"  # text | visual (mean base prototype + N(0, virtual_noise) noise)
    virtual_noise: float = 0.05
    beta: float = 0.5  # scale of l_vv relative to s (released TRAINER.SCALE default)
    gate: float = 0.1  # initial residual gate g
    heads: int = 8
    attn_dropout: float = 0.1  # the released nn.MultiheadAttention(dropout=0.1)
    transductive: bool = False  # the released cross-batch attention (test predictions depend on the batch)
    augment_views: int = 10  # K augmented train views cached once (0: train on the eval view)
    transductive_batch: int = 100  # transductive: test images attending jointly (the released test batch)
    text_features: str = "raw"  # raw: encode_text outputs as released | normalized: the unit prompt ensemble
    logit_scale: float | None = None  # None: the backbone's (100 for OpenAI CLIP)

    def __post_init__(self) -> None:
        check_choice("candle.mask", self.mask, MASKS)
        check_choice("candle.text_features", self.text_features, ("raw", "normalized"))
        check_range("candle.transductive_batch", self.transductive_batch, 1)
        check_choice("candle.inputs", self.inputs, ("features", "images"))
        check_choice("candle.virtual_init", self.virtual_init, ("text", "visual"))
        check_range("candle.attn_dropout", self.attn_dropout, 0.0, 1.0)
        check_range("candle.augment_views", self.augment_views, 0, 1000)
        check_range("candle.heads", self.heads, 1, 1024)


def attention_mask(kinds: Tensor, mask: str) -> Tensor | None:
    """Boolean (N, N) mask over tokens of the given kinds (True = query may NOT attend to key); None for none."""
    if mask == "none":
        return None
    visual = kinds != TEXT
    q, k = visual[:, None], visual[None, :]
    if mask == "in_text":  # the released mask blocks text-text pairs, the diagonal included
        return ~q & ~k
    blocked = q & k if mask == "in_visual" else q ^ k  # between: never on the diagonal
    return blocked & ~torch.eye(len(kinds), dtype=torch.bool, device=kinds.device)


class CrossModalFusion(nn.Module):
    """LN, then Z + g * MHA(Z, Z, Z). `forward` fuses one token set; `per_sample` fuses [x_i; S] for every image
    x_i with the shared tokens S, exactly, from one attention over S."""

    def __init__(self, dim: int, heads: int, gate: float, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise DataError(f"candle.heads={heads} must divide the feature width {dim}")
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.gate = nn.Parameter(torch.tensor([float(gate)]))

    def forward(self, tokens: Tensor, mask: Tensor | None) -> Tensor:
        z = self.norm(tokens)
        out, _ = self.attn(z[None], z[None], z[None], need_weights=False, attn_mask=mask)
        return z + self.gate * out[0]

    def _qkv(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-head queries, keys, values (..., H, N, dh) of tokens z (..., N, D)."""
        h = self.attn.num_heads
        q, k, v = F.linear(z, self.attn.in_proj_weight, self.attn.in_proj_bias).chunk(3, dim=-1)
        split = lambda t: t.unflatten(-1, (h, -1)).transpose(-3, -2)
        return split(q), split(k), split(v)

    def _out(self, o: Tensor) -> Tensor:
        """Heads (..., H, N, dh) -> the output projection (..., N, D)."""
        return self.attn.out_proj(o.transpose(-3, -2).flatten(-2))

    def per_sample(self, images: Tensor, shared: Tensor, shared_kinds: Tensor, mask: str
                   ) -> tuple[Tensor, Tensor, Tensor]:
        """images (B, D), shared tokens S (N, D) -> (fused images (B, D), fused S per image (B, N, D), fused S
        alone (N, D): the image-free token set)."""
        p = self.attn.dropout if self.training else 0.0
        zx, zs = self.norm(images), self.norm(shared)
        qx, kx, vx = self._qkv(zx[:, None])  # (B, H, 1, dh)
        qs, ks, vs = self._qkv(zs)  # (H, N, dh)
        scale = 1.0 / math.sqrt(qs.shape[-1])
        kinds = torch.cat([shared_kinds.new_tensor([IMAGE]), shared_kinds])
        blocked = attention_mask(kinds, mask)
        # shared queries over shared keys: once
        ss = qs @ ks.transpose(-1, -2) * scale  # (H, N, N)
        if blocked is not None:
            ss = ss.masked_fill(blocked[1:, 1:], float("-inf"))
        lse = torch.logsumexp(ss, dim=-1)  # (H, N)
        o_shared = F.dropout(torch.softmax(ss, dim=-1), p, self.training) @ vs  # (H, N, dh)
        # shared queries over image i's key: the weight it takes from the shared keys, in closed form
        sx = (qs[None] @ kx.transpose(-1, -2)).squeeze(-1) * scale  # (B, H, N)
        if blocked is not None:
            sx = sx.masked_fill(blocked[1:, 0], float("-inf"))
        w = torch.sigmoid(sx - lse[None])  # softmax weight of the image key
        # out_proj(concat_h [w_h v_x,h + (1 - w_h) o_shared,h]) = sum_h w_h U_x,h + (1 - w_h) U_s,h + bias with
        # U = each head's slice of out_proj applied to its values: B*N*H*D work instead of B*N*D*D
        wo = self.attn.out_proj.weight.unflatten(1, (self.attn.num_heads, -1))  # (D, H, dh)
        ux = torch.einsum("bhd,ehd->bhe", vx[:, :, 0], wo)  # (B, H, D)
        us = torch.einsum("hnd,ehd->hne", o_shared, wo)  # (H, N, D)
        out_s = (torch.einsum("bhn,bhe->bne", F.dropout(w, p, self.training), ux)
                 + torch.einsum("bhn,hne->bne", 1.0 - w, us) + self.attn.out_proj.bias)
        # image queries over [x_i; S]
        sxx = (qx @ kx.transpose(-1, -2)) * scale  # (B, H, 1, 1)
        sxs = (qx @ ks.transpose(-1, -2)[None]) * scale  # (B, H, 1, N)
        if blocked is not None:
            sxs = sxs.masked_fill(blocked[0, 1:], float("-inf"))
        a = F.dropout(torch.softmax(torch.cat([sxx, sxs], dim=-1), dim=-1), p, self.training)
        o_x = a[..., :1] * vx + a[..., 1:] @ vs[None]  # (B, H, 1, dh)
        g = self.gate
        return zx + g * self._out(o_x)[:, 0], zs[None] + g * out_s, zs + g * self._out(o_shared)


@register_method("candle")
class Candle(Method):
    """Candle: identity-initialised projections, base and virtual prototypes, gated cross-modal attention, CLA loss;
    predicts l_vt + l_vv per sample (the released cross-batch attention only with candle.transductive=true)."""

    Config = CandleConfig
    inputs = "features"

    def __init__(self, cfg: CandleConfig, backbone: Backbone, info: TaskInfo) -> None:
        super().__init__(cfg, backbone, info)
        dim, c = backbone.embed_dim, info.num_classes
        self.scale = logit_scale(cfg.logit_scale, backbone)
        counts = torch.as_tensor(info.class_counts, dtype=torch.long)
        if info.base_classes is not None:
            base = torch.as_tensor(info.base_classes, dtype=torch.long)
        else:  # not a base-to-new task: every class with training images has a visual prototype
            base = torch.nonzero(counts > 0).flatten()
        new = torch.as_tensor([i for i in range(c) if i not in set(base.tolist())], dtype=torch.long)
        self.register_buffer("base_idx", base, persistent=False)
        self.register_buffer("new_idx", new, persistent=False)
        text = backbone.text_classifier(info.classnames, info.templates,
                                        normalize=cfg.text_features == "normalized").float()
        self.register_buffer("text_features", text)
        self.register_buffer("base_prototypes", torch.zeros(len(base), dim))  # filled by prepare from the train cache
        self.proj_image = nn.Parameter(torch.eye(dim))
        self.proj_text = nn.Parameter(torch.eye(dim))
        self.virtual_prototypes = nn.Parameter(text[new].clone())  # visual init is set in prepare, after prototypes
        self.fusion = CrossModalFusion(dim, cfg.heads, cfg.gate, cfg.attn_dropout)
        self.loss_fn = build_loss("cla", counts)
        self.register_buffer("kinds", torch.cat([torch.full((c,), PROTO), torch.full((c,), TEXT)]), persistent=False)
        self._info: dict[str, Any] = {}

    def feature_spec(self) -> FeatureSpec:
        """K augmented views of the train split (RandomResizedCrop 0.08-1 bicubic + flip, the released training
        transform), a random view per sample and epoch."""
        return FeatureSpec(tensors=("proj",), views=self.cfg.augment_views, per="sample",
                           augment=AugSpec(scale=(0.08, 1.0), interpolation="bicubic"))

    def prototypes(self) -> Tensor:
        """(C, D) visual prototypes in label order: fixed base means and learnable virtual ones."""
        out = torch.zeros(self.num_classes, self.proj_image.shape[0], device=self.proj_image.device)
        return out.index_copy(0, self.base_idx, self.base_prototypes).index_copy(0, self.new_idx,
                                                                                 self.virtual_prototypes)

    def logits(self, feats: Tensor, with_prototypes: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """(l0, l_vt, l_vv) for images (B, D); with_prototypes appends the C prototypes as samples (rows B..B+C)."""
        c, s = self.num_classes, self.scale
        x = feats.float() @ self.proj_image
        p = self.prototypes() @ self.proj_image
        t = self.text_features @ self.proj_text
        rows = torch.cat([x, p]) if with_prototypes else x
        l0 = s * F.normalize(rows, dim=-1) @ F.normalize(t, dim=-1).t()
        if self.cfg.transductive:
            kinds = torch.cat([self.kinds.new_full((len(x),), IMAGE), self.kinds])
            fused = F.normalize(self.fusion(torch.cat([x, p, t]), attention_mask(kinds, self.cfg.mask)), dim=-1)
            ft, fp = fused[-c:], fused[-2 * c:-c]
            r = fused[: len(fused) - (0 if with_prototypes else c) - c]
            return l0, s * r @ ft.t(), s * self.cfg.beta * r @ fp.t()
        fx, fs, f0 = self.fusion.per_sample(x, torch.cat([p, t]), self.kinds, self.cfg.mask)
        fx, fs, f0 = F.normalize(fx, dim=-1), F.normalize(fs, dim=-1), F.normalize(f0, dim=-1)
        l_vt = s * torch.einsum("bd,bcd->bc", fx, fs[:, c:])
        l_vv = s * self.cfg.beta * torch.einsum("bd,bcd->bc", fx, fs[:, :c])
        if with_prototypes:  # prototypes as samples of the image-free token set [P; T]
            l_vt = torch.cat([l_vt, s * f0[:c] @ f0[c:].t()])
            l_vv = torch.cat([l_vv, s * self.cfg.beta * f0[:c] @ f0[:c].t()])
        return l0, l_vt, l_vv

    def forward(self, inputs: Inputs, labels: Tensor | None = None) -> Output:
        feats = self.encode(inputs)["proj"]
        if labels is None:
            _, l_vt, l_vv = self.logits(feats)
            return Output(l_vt + l_vv)
        b = len(feats)
        l0, l_vt, l_vv = self.logits(feats, with_prototypes=True)
        y = torch.cat([labels, torch.arange(self.num_classes, device=labels.device)])
        parts = {"loss_l0": self.loss_fn(l0, y), "loss_vt": self.loss_fn(l_vt, y), "loss_vv": self.loss_fn(l_vv, y)}
        extras = {**{k: v.detach() for k, v in parts.items()}, "gate": self.fusion.gate.detach()[0]}
        return Output((l_vt + l_vv)[:b], parts["loss_l0"] + parts["loss_vt"] + parts["loss_vv"], extras)

    @torch.no_grad()
    def set_prototypes(self, feats: Tensor, labels: Tensor) -> None:
        """Base prototypes = mean frozen feature per base class; virtual init 'visual' = their mean + noise."""
        feats = feats.float()
        for i, c in enumerate(self.base_idx.tolist()):
            rows = feats[labels == c]
            if not len(rows):
                raise DataError(f"candle: base class {c} ({self.info.classnames[c]}) has no training image")
            self.base_prototypes[i] = rows.mean(0)
        if self.cfg.virtual_init == "visual" and len(self.new_idx):
            gen = torch.Generator().manual_seed(0)
            noise = torch.randn(self.virtual_prototypes.shape, generator=gen) * self.cfg.virtual_noise
            self.virtual_prototypes.copy_(self.base_prototypes.mean(0, keepdim=True).cpu() + noise)

    def prepare(self, ctx: FitContext) -> None:
        """The base prototypes (and a visual init of the virtual ones) from the train split, before training."""
        fs = self.cached_features(ctx, "train")  # eval view: the released prototypes use the test transform
        self.set_prototypes(fs.proj.to(self.base_prototypes.device), fs.labels.to(self.base_prototypes.device))
        self._info = {"base_classes": len(self.base_idx), "new_classes": len(self.new_idx),
                      "virtual_init": self.cfg.virtual_init, "mask": self.cfg.mask}

    def eval_config(self, evaluation: EvalConfig) -> EvalConfig:
        """Transductive mode predicts in batches of candle.transductive_batch images in split order (the released
        test loader), whatever eval.batch_size says; per-sample mode does not depend on the batch."""
        if self.cfg.transductive:
            return dataclasses.replace(evaluation, batch_size=self.cfg.transductive_batch)
        return evaluation

    def protocol(self) -> dict[str, Any]:
        return {"prediction": f"transductive(batch {self.cfg.transductive_batch})"} if self.cfg.transductive else {}

    def extra_results(self) -> dict[str, Any]:
        mode = (f"transductive: each eval batch of {self.cfg.transductive_batch} test images attends jointly "
                "(released code); predictions depend on the batch") if self.cfg.transductive else \
            "per-sample (non-transductive)"
        return {**self._info, "prediction": mode, "text_features": self.cfg.text_features,
                "gate": float(self.fusion.gate.detach())}
