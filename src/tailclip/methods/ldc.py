"""LDC: Logits DeConfusion with CLIP for few-shot learning (Li et al., CVPR 2025; reference code LiShuo1001/LDC).

MAF (multi-level adapter fusion): the frozen tower's outputs at four levels (ViT: after blocks 6/8/10/12 of 12,
i.e. 0-based L-7, L-5, L-3, L-1; RN: layer1..layer4) each go through their own adapter (ViT: Linear d->d without
bias, LayerNorm, ReLU, mean over every token, CLS included; RN: 1x1 conv to layer4's width without bias, BN, ReLU,
average-pooled to layer4's grid: the reference's AvgPool 8/4/2/- at 224 px), are fused (fixed weights
0.1/0.2/0.3/0.4; or learnable: concat -> Linear-BN-ReLU-Linear) and projected by the frozen projection into z_e
(ViT: `visual_proj` applied to the fused vector, without ln_post, as the reference; RN: the frozen attention pool on
the fused maps, or on each level before the learnable fusion). s_MAF = MLP(z_e) (ViT: D -> 2048 -> C; RN:
D -> D -> C, as the reference builds them).
ICD (inter-class deconfusion): s_ICD = s_zs + A3(A1(s_zs) + A2(z_e)), each A Linear-BN-ReLU-Linear without bias
(A1: C->D->D, A2: D->D->D, A3: D->D->C); s_zs = 100 cos(f, t) zero-shot logits of the same crop with the task's
templates (prompt ensemble).
ALF (adaptive logits fusion): alpha = sigmoid(MLP(z_e)) per sample (D -> D -> 1); s_ALF = alpha s_MAF +
(1 - alpha) s_ICD, the prediction.
Loss: CE(s_MAF) + CE(s_ICD) + CE(s_ALF) + lam (L1(s_MAF, s_zs) + L1(s_ICD, s_zs)), L1 the mean over batch and
classes (the reference's F.l1_loss), lam = 1.

Ablations (`ldc.variant`): maf (MAF alone: CE + L1 of s_MAF), icd (ICD alone on z_e), no_alf (alpha fixed at 0.5:
the mean of s_MAF and s_ICD). Only the parts a variant uses are built, so parameter counts are the variant's.

Training data: the tower is frozen, so its taps of a crop never change. `ldc.inputs=features` trains from the feature
cache: K augmented views (RandomResizedCrop scale 0.8-1 bicubic + flip, the released transform) extracted once, a
seeded random view per sample and epoch. `images` runs the frozen tower on a fresh crop every step, as the released
code. `auto` (default) takes the cache when the K views' taps fit `ldc.cache_gb` and says why otherwise: ViT-B/16
taps are 4 x 197 x 768 values per image and view, RN50's 1.5 M, so only small few-shot sets fit.

Selection and what is reported (docs/methods/ldc.md):
- default (`ldc.report=alf`): predict with s_ALF, the epoch chosen on the few-shot val (`ldc.select_heads=true`:
  also among MAF/ICD/ALF);
- `ldc.report=beta_search`, the released `acc` (the paper's means): train every epoch, keep the last, then predict
  with beta * s_MAF + (1 - beta) * s_ICD, beta the first best of i/50 (i = 0..50) on `ldc.beta_on` (auto: the
  dataset's whole val split, `val_full`; on datasets without one, ImageNet, the TEST split, as released, recorded
  as a test-set choice);
- `train.select_on=paper`: the last epoch's best head on the TEST split.

Deliberate deviations from the released code: the adapters train in fp32 (the released model converts them to
fp16 along with CLIP: train.precision=fp16_weights reproduces that; train.precision=amp for mixed precision);
few-shot draws and seeds follow tailclip's protocol (seeds 1/2/3) instead of the released single seed 2024."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones.base import Backbone
from ..config import InputsOption, check_choice, check_range
from ..contract import FeatureSpec, FitContext, FitResult, Inputs, Output, register_method
from ..data.base import TaskInfo
from ..data.fewshot import FULL_VAL
from ..engine.evaluate import predict_split
from ..errors import ConfigError
from ..features import AugSpec
from .clip_kit import TextClassifierMethod

log = logging.getLogger(__name__)

PAPER = ("released LDC evaluation: train every epoch, then report the best of the MAF / ICD / ALF heads on the "
         "TEST split")
VARIANTS = ("full", "maf", "icd", "no_alf")
REPORTS = ("alf", "beta_search")
BETA_ON = ("auto", "val", "val_full", "test")
BETA_GRID = tuple(i / 50 for i in range(51))  # the released search_hp grid
TRAINED_HEADS = {"full": ("maf", "icd", "alf"), "no_alf": ("maf", "icd", "alf"), "maf": ("maf",), "icd": ("icd",)}
VIT_MAF_HIDDEN = 2048  # the reference's MAF classifier width for ViT towers


@dataclass
class LDCConfig(InputsOption):
    inputs: str = "auto"  # features (cached taps) | images (live frozen forward) | auto (features when they fit)
    cache_gb: float = 8.0  # auto: the largest cache of augmented-view taps to build
    views: int = 10  # K cached augmented views of the train split (features mode)
    per: str = "sample"  # which view a sample reads in an epoch: "sample" (seeded random) or "epoch" (e mod K)
    tap_dtype: str | None = None  # storage dtype of cached taps (float16 halves them; None: float32, exact)
    crop_scale: list[float] = field(default_factory=lambda: [0.8, 1.0])
    interpolation: str = "bicubic"
    fusion: str = "weighted"  # weighted (fixed fusion_weights) | learnable (concat -> MLP)
    fusion_weights: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4])
    tap_blocks: list[int] | None = None  # 0-based ViT blocks; None: L-7, L-5, L-3, L-1 (blocks 6/8/10/12 of 12)
    variant: str = "full"  # full | maf | icd | no_alf (ablations)
    lam: float = 1.0  # weight of the L1 terms
    select_heads: bool = False  # also select among MAF/ICD/ALF on val
    report: str = "alf"  # alf: s_ALF | beta_search: the released beta * s_MAF + (1 - beta) * s_ICD (module doc)
    beta_on: str = "auto"  # beta_search's split: auto (val_full, else test: released) | val | val_full | test
    logit_scale: float | None = None  # None: the model's own (100 for OpenAI CLIP)

    def __post_init__(self) -> None:
        check_choice("ldc.inputs", self.inputs, ("auto", "features", "images"))
        check_choice("ldc.per", self.per, ("sample", "epoch"))
        check_choice("ldc.fusion", self.fusion, ("weighted", "learnable"))
        check_choice("ldc.variant", self.variant, VARIANTS)
        check_choice("ldc.report", self.report, REPORTS)
        check_choice("ldc.beta_on", self.beta_on, BETA_ON)
        if self.report == "beta_search" and self.variant not in ("full", "no_alf"):
            raise ConfigError(f"ldc.report=beta_search mixes s_MAF and s_ICD; ldc.variant={self.variant} lacks one")
        check_choice("ldc.interpolation", self.interpolation, ("bicubic", "bilinear"))
        check_range("ldc.views", self.views, 1)
        check_range("ldc.lam", self.lam, 0.0)
        check_range("ldc.cache_gb", self.cache_gb, 0.0)
        if len(self.fusion_weights) != 4:
            raise ConfigError(f"ldc.fusion_weights needs 4 values (one per level), got {self.fusion_weights}")
        if self.tap_blocks is not None and len(self.tap_blocks) != 4:
            raise ConfigError(f"ldc.tap_blocks needs 4 block indices, got {self.tap_blocks}")
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ConfigError(f"ldc.crop_scale needs [min, max] with 0 < min <= max <= 1, got {self.crop_scale}")


def mlp2(din: int, hidden: int, dout: int) -> nn.Sequential:
    """Linear-BN-ReLU-Linear without biases: ICD's A1-A3, the MAF classifier, ALF's alpha and the learnable fusion."""
    return nn.Sequential(nn.Linear(din, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Linear(hidden, dout, bias=False))


class TokenAdapter(nn.Module):
    """ViT level adapter: Linear d->d (no bias), LayerNorm, ReLU, then the mean over every token (CLS included)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d, bias=False)
        self.ln = nn.LayerNorm(d)

    def forward(self, tokens: Tensor) -> Tensor:
        return F.relu(self.ln(self.fc(tokens))).mean(dim=1)


class MapAdapter(nn.Module):
    """RN level adapter: 1x1 conv to layer4's width (no bias), BN, ReLU, average-pooled to layer4's grid."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        return F.adaptive_avg_pool2d(F.relu(self.bn(self.conv(x))), grid)


class LDCHead(nn.Module):
    """Every trainable part of LDC for a variant, built from dimensions only (parameter counts need no tower).

    arch "vit": level_dims = (d,) * 4; "resnet": layer1..4 channels, the last = layer4's width."""

    def __init__(self, arch: str, level_dims: tuple[int, ...], embed_dim: int, num_classes: int,
                 fusion: str = "weighted", variant: str = "full") -> None:
        super().__init__()
        self.arch = arch
        d, big_d, c = level_dims[-1], embed_dim, num_classes
        if arch == "vit":
            self.levels = nn.ModuleList(TokenAdapter(d) for _ in level_dims)
            fuse = (4 * d, d, d)  # fused before the projection
        else:
            self.levels = nn.ModuleList(MapAdapter(ci, d) for ci in level_dims)
            fuse = (4 * big_d, d, big_d)  # each level attention-pooled, then fused
        self.fuse = mlp2(*fuse) if fusion == "learnable" else None
        uses = TRAINED_HEADS[variant]
        self.maf = mlp2(big_d, VIT_MAF_HIDDEN if arch == "vit" else big_d, c) if "maf" in uses else None
        self.icd = nn.ModuleDict({"a1": mlp2(c, big_d, big_d), "a2": mlp2(big_d, big_d, big_d),
                                  "a3": mlp2(big_d, big_d, c)}) if "icd" in uses else None
        self.alpha = mlp2(big_d, big_d, 1) if variant == "full" else None  # sigmoid in forward


def level_numel(backbone: Backbone) -> tuple[str, list[int]]:
    """(arch, values per image of each level's tap) at the backbone's input size."""
    size = backbone.preprocess.image_size
    if backbone.arch == "vit":
        assert backbone.patch_size is not None
        return "vit", [((size // backbone.patch_size) ** 2 + 1) * backbone.width] * 4
    if backbone.arch == "resnet":
        w = backbone.width // 32  # layer1..4: 4w, 8w, 16w, 32w channels at strides 4, 8, 16, 32
        return "resnet", [4 * w * (size // 4) ** 2, 8 * w * (size // 8) ** 2, 16 * w * (size // 16) ** 2,
                          32 * w * (size // 32) ** 2]
    raise ConfigError(f"method ldc needs a ViT or ResNet tower with taps; {backbone.arch!r} has none")


@register_method("ldc")
class LDC(TextClassifierMethod):
    """LDC (few-shot): multi-level adapter fusion, inter-class deconfusion of zero-shot logits, adaptive logits
    fusion; trains from cached taps of augmented views when they fit (`ldc.inputs`)."""

    Config = LDCConfig
    inputs = "features"
    select_among = ("epochs",)
    paper_protocol = PAPER
    # the released recipe: AdamW lr 1e-4, wd 1e-4, eps 1e-4, batch 64, 50 epochs, cosine over iterations to 0
    train_defaults: ClassVar[dict[str, Any]] = {
        "optimizer": "adamw", "lr": 1e-4, "weight_decay": 1e-4, "eps": 1e-4, "batch_size": 64,
        "epochs": 50, "scheduler": "cosine", "sched_unit": "step", "warmup_epochs": 0, "min_lr": 0.0}

    def __init__(self, cfg: LDCConfig, backbone: Backbone, info: TaskInfo) -> None:
        super().__init__(cfg, backbone, info)
        arch, numel = level_numel(backbone)
        if cfg.inputs == "auto":
            per_value = 2 if cfg.tap_dtype in ("float16", "bfloat16") else 4
            gb = float(info.class_counts.sum()) * cfg.views * sum(numel) * per_value / 2**30
            self.inputs = "features" if gb <= cfg.cache_gb else "images"
            if self.inputs == "images":
                log.info("ldc: the taps of %d augmented views of %d train images need %.1f GB (> ldc.cache_gb=%g); "
                         "training on a live frozen forward instead (ldc.inputs=features forces the cache)",
                         cfg.views, int(info.class_counts.sum()), gb, cfg.cache_gb)
        self.init_text_classifier(backbone, info, cfg.logit_scale)
        self.taps = self.tap_names_for(backbone, cfg.tap_blocks)
        if arch == "vit":
            dims = (backbone.width,) * 4
        else:
            w = backbone.width // 32
            dims = (4 * w, 8 * w, 16 * w, 32 * w)
        self.head = LDCHead(arch, dims, backbone.embed_dim, info.num_classes, cfg.fusion, cfg.variant)
        self.register_buffer("fusion_weights", torch.tensor(cfg.fusion_weights, dtype=torch.float32))
        # beta of the released report (ldc.report=beta_search), set after training; -1: not searched yet
        self.register_buffer("report_beta", torch.tensor(-1.0))
        self._beta_record: dict[str, Any] = {}
        if cfg.select_heads and len(self.eval_heads()) > 1:
            self.select_among = ("epochs", "heads")

    @staticmethod
    def tap_names_for(backbone: Backbone, tap_blocks: list[int] | None = None) -> list[str]:
        """The four level taps. ViT: blocks L-7, L-5, L-3, L-1 (0-based; the reference's 6/8/10/12 of 12), or the
        last four blocks of towers with fewer than 7; RN: layer1..layer4."""
        if backbone.arch == "resnet":
            return ["layer1", "layer2", "layer3", "layer4"]
        n = backbone.num_blocks
        blocks = tap_blocks or ([n - 7, n - 5, n - 3, n - 1] if n >= 7 else [max(0, n - 4 + k) for k in range(4)])
        bad = [b for b in blocks if not 0 <= b < n]
        if bad:
            raise ConfigError(f"ldc.tap_blocks {bad} outside the tower's blocks 0..{n - 1}")
        return [f"blocks.{b}" for b in blocks]

    # ------------------------------------------------------------------ contract hooks
    def feature_spec(self) -> FeatureSpec:
        cfg = self.cfg
        augment = AugSpec(scale=(float(cfg.crop_scale[0]), float(cfg.crop_scale[1])),
                          interpolation=cfg.interpolation, flip=True)
        return FeatureSpec(tensors=(*self.taps, "proj"), views=cfg.views, per=cfg.per, dtype=cfg.tap_dtype,
                           augment=augment)

    def eval_heads(self) -> tuple[str, ...]:
        return TRAINED_HEADS[self.cfg.variant] if len(TRAINED_HEADS[self.cfg.variant]) > 1 else ()

    def prepare(self, ctx: FitContext) -> None:
        """Checks the recipe and fixes what selection may choose among (the released report keeps the last epoch)."""
        if ctx.cfg.train.batch_size < 2:
            raise ConfigError(f"train.batch_size={ctx.cfg.train.batch_size}: LDC's BatchNorm layers need >= 2")
        if self.cfg.report == "beta_search":
            if ctx.cfg.train.select_on in ("val", "paper"):
                raise ConfigError(f"ldc.report=beta_search keeps the last epoch as the released code; "
                                  f"train.select_on={ctx.cfg.train.select_on} would select another (use none)")
            self.select_among = ()  # the last epoch
        elif ctx.cfg.train.select_on == "paper":
            self.select_among = ("heads",)  # the released code: the last epoch, its best head on test

    def finish(self, ctx: FitContext, result: FitResult) -> FitResult:
        if self.cfg.report == "beta_search":
            self.search_report_beta(ctx)
        return result

    def search_report_beta(self, ctx: FitContext) -> None:
        """The released report: beta of beta * s_MAF + (1 - beta) * s_ICD searched on `ldc.beta_on`."""
        split = self.cfg.beta_on
        if split == "auto":
            split = FULL_VAL if FULL_VAL in ctx.task.splits else "test"
        on_test = split.startswith("test")
        task = ctx.task.unguarded() if on_test else ctx.task
        if split not in task.splits:
            raise ConfigError(f"ldc.beta_on={split}: {task.name} has no {split} split; it has {', '.join(task.splits)}")
        preds = predict_split(self, dataclasses.replace(ctx, task=task), split)
        beta, acc = search_beta(preds.heads["maf"], preds.heads["icd"], preds.labels)
        self.report_beta.fill_(beta)
        self._beta_record = {"beta": beta, "beta_split": split, "beta_split_top1": acc, "beta_on_test": on_test}
        log.info("ldc: beta %.2f (top1 %.2f on %s%s)", beta, acc, split, ", the TEST split as released" * on_test)

    # ------------------------------------------------------------------ the model
    def fused_feature(self, feats: dict[str, Tensor]) -> Tensor:
        """z_e: the levels through their adapters, fused, through the frozen projection."""
        h = self.head
        levels = [feats[t].float() for t in self.taps]
        if h.arch == "vit":
            outs = [a(x) for a, x in zip(h.levels, levels, strict=True)]
            if h.fuse is not None:
                fused = h.fuse(torch.cat(outs, dim=1))
            else:
                fused = sum(w * o for w, o in zip(self.fusion_weights, outs, strict=True))
            proj = self.backbone.visual_proj
            assert proj is not None
            return fused @ proj.float()
        grid = tuple(levels[-1].shape[-2:])
        outs = [a(x, grid) for a, x in zip(h.levels, levels, strict=True)]
        pool = self.backbone.attnpool
        assert pool is not None
        if h.fuse is not None:
            return h.fuse(torch.cat([pool(o) for o in outs], dim=1))
        return pool(sum(w * o for w, o in zip(self.fusion_weights, outs, strict=True)))

    def all_logits(self, feats: dict[str, Tensor]) -> dict[str, Tensor]:
        """The zero-shot logits and every logit set (and alpha) the variant has, for a batch."""
        h = self.head
        zs = self.zeroshot_logits(feats["proj"])
        z = self.fused_feature(feats).float()
        out = {"zs": zs}
        if h.maf is not None:
            out["maf"] = h.maf(z)
        if h.icd is not None:
            out["icd"] = zs + h.icd["a3"](h.icd["a1"](zs) + h.icd["a2"](z))
        if "maf" in out and "icd" in out:
            alpha = torch.sigmoid(h.alpha(z)) if h.alpha is not None else torch.full_like(zs[:, :1], 0.5)
            out["alpha"] = alpha
            out["alf"] = alpha * out["maf"] + (1 - alpha) * out["icd"]
        return out

    def protocol(self) -> dict[str, Any]:
        if self.cfg.report != "beta_search":
            return {}
        return {"report": f"beta_search(on {self._beta_record.get('beta_split', self.cfg.beta_on)})"}

    def extra_results(self) -> dict[str, Any]:
        return {"report": self.cfg.report, **self._beta_record} if self.cfg.report != "alf" else {}

    def forward(self, inputs: Inputs, labels: Tensor | None = None) -> Output:
        out = self.all_logits(self.encode(inputs))
        trained = TRAINED_HEADS[self.cfg.variant]
        if self.report_beta >= 0:
            beta = float(self.report_beta)
            out["beta_mix"] = beta * out["maf"] + (1 - beta) * out["icd"]
            logits = out["beta_mix"]
        else:
            logits = out[self.active_head or trained[-1]]
        heads = {k: out[k] for k in self.eval_heads()}
        if labels is None:
            return Output(logits, heads=heads)
        terms = ldc_loss_terms(out, labels, trained)
        loss = sum(v for k, v in terms.items() if k.startswith("ce_")) + self.cfg.lam * sum(
            v for k, v in terms.items() if k.startswith("l1_"))
        extras = {f"loss_{k}": v.detach() for k, v in terms.items()}
        if "alpha" in out:
            extras["alpha_mean"] = out["alpha"].detach().mean()
        return Output(logits, loss, extras, heads)


def search_beta(maf: Tensor, icd: Tensor, labels: Tensor) -> tuple[float, float]:
    """(beta, top-1 %) of beta * maf + (1 - beta) * icd over BETA_GRID: the first beta with the highest accuracy
    (the released search keeps a beta only when it is strictly better), raw logits, no softmax."""
    best_beta, best_correct = 0.0, 0
    for beta in BETA_GRID:
        correct = int(((beta * maf + (1 - beta) * icd).argmax(1) == labels).sum())
        if correct > best_correct:
            best_beta, best_correct = beta, correct
    return best_beta, 100.0 * best_correct / max(len(labels), 1)


def ldc_loss_terms(out: dict[str, Tensor], labels: Tensor, trained: tuple[str, ...]) -> dict[str, Tensor]:
    """CE of each trained logit set, and the L1 (mean over batch and classes) of s_MAF and s_ICD to s_zs."""
    terms = {f"ce_{k}": F.cross_entropy(out[k], labels) for k in trained}
    terms.update({f"l1_{k}": F.l1_loss(out[k], out["zs"]) for k in trained if k != "alf"})
    return terms
