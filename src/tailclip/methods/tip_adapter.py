"""Tip-Adapter and Tip-Adapter-F (Zhang et al., ECCV 2022) on cached features.

Cache model: keys = L2-normalised mean of the few-shot train features over `augment_views` augmented views
(RandomResizedCrop scale 0.5-1 + flip, each view cached once), values = one-hot labels;
logits = 100 f W^T + alpha * exp(-beta (1 - f Keys^T)) Values, f the normalised test feature, W the text
classifier. alpha, beta are grid-searched (official grid: beta in 0.1..search_scale[0], alpha in
0.1..search_scale[1], search_step points each; the first best pair wins).

Tip-Adapter-F makes the keys trainable with the engine's trainer and its released recipe (AdamW lr 1e-3, eps
1e-4, batch 256, 20 epochs, cosine over iterations: `train_config`); epoch e trains on augmented view e mod
augment_views from the cache (the released code draws a fresh augmentation each epoch: with 10 cached views the
difference is which random crops are seen). Loss and gradients equal the released loop on identical inputs.

Selection follows `train.select_on` like every method:
- val (default where a val split exists): Tip-Adapter-F's best epoch, then alpha/beta, on the val split;
- none: the last epoch and the initial alpha/beta;
- paper: the released scripts (`main.py`, `main_imagenet.py`). Datasets with a val split (the CoOp datasets):
  alpha/beta searched on the *full* val split (the released datasets subsample only train), Tip-Adapter-F's best
  epoch on the TEST split at the initial alpha/beta, and the better of that test accuracy and the searched one
  kept (its `max(best_acc, acc)`). Datasets without a val split (ImageNet): alpha/beta searched on the TEST split
  too, for both methods. results.json's "selection" records every such choice with `selected_on_test`.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones.base import Backbone
from ..config import TrainConfig
from ..data.base import TaskInfo
from ..errors import ConfigError
from ..features import method_features
from .base import FeatureSpec, FitContext, Inputs, Method, Output, register_method
from .zeroshot import zeroshot_weights

log = logging.getLogger(__name__)

PAPER = ("released Tip-Adapter scripts: alpha/beta searched on the full val split (on the TEST split where the "
         "dataset has none, as main_imagenet.py)")
PAPER_F = ("released Tip-Adapter-F scripts: best epoch on the TEST split; alpha/beta searched on the full val split "
           "and the better of the two TEST accuracies kept (main.py), or searched on the TEST split where the dataset "
           "has no val split (main_imagenet.py)")


@dataclass
class TipAdapterConfig:
    augment_views: int = 10  # augmented views of the train split averaged into the keys (0: eval view only)
    init_alpha: float = 1.0  # residual ratio before the search (per-dataset values in configs/tip_adapter)
    init_beta: float = 1.0  # sharpness
    search_scale: list[float] = field(default_factory=lambda: [7.0, 3.0])  # [beta max, alpha max]
    search_step: list[int] = field(default_factory=lambda: [200, 20])  # [beta points, alpha points]
    logit_scale: float | None = None  # None: the model's own (100 for OpenAI CLIP)
    # Tip-Adapter-F's training recipe (its released values; the run's train section supplies seed, precision,
    # selection and resume settings)
    epochs: int = 20
    lr: float = 1e-3
    eps: float = 1e-4
    weight_decay: float = 0.01  # torch AdamW default, as in the released code
    batch_size: int = 256
    feature_cache: str | None = None

    def __post_init__(self) -> None:
        if len(self.search_scale) != 2 or len(self.search_step) != 2:
            raise ConfigError("tip_adapter.search_scale and search_step need two values: [beta, alpha]")
        if self.augment_views < 0 or self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("tip_adapter.augment_views >= 0, epochs >= 1 and batch_size >= 1 are required")


def tip_logits(feats: Tensor, text_weights: Tensor, keys: Tensor, values: Tensor, alpha: float, beta: float,
               scale: float = 100.0) -> Tensor:
    """scale * f W^T + alpha * exp(-beta * (1 - f Keys^T)) Values, with f already L2-normalised."""
    clip_logits = scale * feats @ text_weights.t()
    affinity = feats @ keys.t()
    return clip_logits + alpha * torch.exp(-beta * (1.0 - affinity)) @ values


def search_alpha_beta(feats: Tensor, labels: Tensor, text_weights: Tensor, keys: Tensor, values: Tensor,
                      scale: float, search_scale: list[float], search_step: list[int],
                      chunk_bytes: int = 512 * 2**20) -> tuple[float, float, float]:
    """The released grid: beta_i = 0.1 + i (s_b - 0.1)/n_b, alpha_j likewise; returns (alpha, beta, val acc %).
    The first best pair in (beta, alpha) order wins, as in the released loop.

    Memory stays bounded at any size: the val rows go through in chunks whose (rows x keys) affinity takes about
    `chunk_bytes`, each chunk's affinity computed once and reused for every beta, and one-hot values (Tip-Adapter's
    cache) are summed per class with `index_add_` instead of a (rows x keys) @ (keys x C) matmul. The released
    code holds the whole (val x keys) affinity and its exp at once (28 GB at ImageNet-LT's 20,000 x 115,846)."""
    betas = [i * (search_scale[0] - 0.1) / search_step[0] + 0.1 for i in range(search_step[0])]
    alphas = torch.tensor([i * (search_scale[1] - 0.1) / search_step[1] + 0.1 for i in range(search_step[1])],
                          device=feats.device)
    one_hot = bool(((values == 0) | (values == 1)).all() and values.sum(dim=1).eq(1).all())
    key_labels = values.argmax(dim=1) if one_hot else None
    correct = torch.zeros(len(betas), len(alphas), dtype=torch.long, device=feats.device)
    rows = max(1, chunk_bytes // max(4 * keys.shape[0], 1))
    for lo in range(0, feats.shape[0], rows):
        f, y = feats[lo:lo + rows], labels[lo:lo + rows]
        clip_logits = scale * f @ text_weights.t()
        affinity = f @ keys.t()
        for i, beta in enumerate(betas):
            weights = torch.exp(-beta * (1.0 - affinity))
            if key_labels is not None:
                cache = clip_logits.new_zeros(clip_logits.shape).index_add_(1, key_labels, weights)
            else:
                cache = weights @ values
            logits = clip_logits[None] + alphas[:, None, None] * cache[None]  # (A, rows, C)
            correct[i] += logits.argmax(-1).eq(y[None]).sum(-1)
    flat = int(correct.flatten().argmax())  # the first maximum in (beta, alpha) order
    i, j = divmod(flat, len(alphas))
    return float(alphas[j]), float(betas[i]), 100.0 * float(correct[i, j]) / feats.shape[0]


@register_method("tip_adapter")
class TipAdapter(Method):
    """Training-free cache model on few-shot features (alpha/beta searched on val); keys stay frozen."""

    Config = TipAdapterConfig
    inputs = "features"
    select_among = ()  # nothing trains: only alpha/beta are chosen
    paper_protocol = PAPER
    finetune = False

    def __init__(self, cfg: TipAdapterConfig, backbone: Backbone, info: TaskInfo) -> None:
        super().__init__(cfg, backbone, info)
        self.scale = cfg.logit_scale if cfg.logit_scale is not None else float(backbone.logit_scale)
        self.register_buffer("text_weights", zeroshot_weights(backbone, info).float())
        keys = torch.zeros(info.num_train, backbone.embed_dim)
        if self.finetune:
            self.keys = nn.Parameter(keys)
        else:
            self.register_buffer("keys", keys)
        self.register_buffer("values", torch.zeros(info.num_train, info.num_classes))
        self.register_buffer("alpha_beta", torch.tensor([cfg.init_alpha, cfg.init_beta]))
        self._info: dict[str, Any] = {}

    @property
    def alpha(self) -> float:
        return float(self.alpha_beta[0])

    @property
    def beta(self) -> float:
        return float(self.alpha_beta[1])

    def feature_spec(self) -> FeatureSpec:
        """Training (Tip-Adapter-F) reads projected features of view e mod K in epoch e."""
        return FeatureSpec(tensors=("proj",), views=self.cfg.augment_views, per="epoch")

    def logits_from_features(self, proj: Tensor, alpha: float | None = None, beta: float | None = None) -> Tensor:
        f = F.normalize(proj.float(), dim=-1)
        return tip_logits(f, self.text_weights, self.keys, self.values, self.alpha if alpha is None else alpha,
                          self.beta if beta is None else beta, self.scale)

    def forward(self, inputs: Inputs, labels: Tensor | None = None) -> Output:
        logits = self.logits_from_features(self.encode(inputs)["proj"])
        return Output(logits, F.cross_entropy(logits, labels) if labels is not None else None)

    # ------------------------------------------------------------------ building the cache model
    @torch.no_grad()
    def _build_cache(self, ctx: FitContext) -> None:
        """keys = normalised mean over the cached views of the raw train features; values = one-hot labels."""
        sets = [method_features(self, ctx, "train", view=v) for v in self.feature_spec().view_names()]
        for fs in sets[1:]:
            if not torch.equal(fs.indices, sets[0].indices):
                raise RuntimeError("augmented views of the train split cover different images")
        keys = F.normalize(torch.stack([fs.proj.float() for fs in sets]).mean(dim=0), dim=-1).to(self.keys.device)
        values = F.one_hot(sets[0].labels, self.num_classes).float().to(self.values.device)
        if self.keys.shape != keys.shape:  # some train images were skipped as unreadable
            log.warning("cache model has %d keys (train split has %d images)", keys.shape[0], self.keys.shape[0])
            self.keys = nn.Parameter(keys.clone()) if isinstance(self.keys, nn.Parameter) else keys.clone()
            self.values = values
        else:
            self.keys.copy_(keys)
            self.values.copy_(values)

    # ------------------------------------------------------------------ choosing alpha / beta
    def _search_source(self, ctx: FitContext) -> tuple[FitContext, str, str] | None:
        """(context to read with, split, label) alpha/beta are searched on, as train.select_on says; None: keep
        the initial values (select_on=none, or no val split)."""
        mode = ctx.cfg.train.select_on
        if mode == "paper":
            from ..data.registry import build_task

            full = build_task(dataclasses.replace(ctx.cfg.data, shots=None))
            if "val" in full.splits:
                return dataclasses.replace(ctx, task=full.guarded()), "val", "val (full split)"
            return dataclasses.replace(ctx, task=ctx.task.unguarded()), "test", "test"
        if mode == "none":
            return None
        if "val" not in ctx.task.splits:
            log.warning("dataset %s has no val split: keeping alpha=%g beta=%g", ctx.task.name, self.alpha, self.beta)
            return None
        return ctx, "val", "val"

    @torch.no_grad()
    def _search(self, ctx: FitContext) -> dict[str, Any]:
        """Search alpha/beta where `_search_source` says; returns the record of the choice."""
        source = self._search_source(ctx)
        if source is None:
            return {"on": "none", "alpha": self.alpha, "beta": self.beta}
        sctx, split, label = source
        fs = method_features(self, sctx, split)
        f = F.normalize(fs.proj.float(), dim=-1).to(self.keys.device)
        alpha, beta, acc = search_alpha_beta(f, fs.labels.to(f.device), self.text_weights, self.keys.detach(),
                                             self.values, self.scale, self.cfg.search_scale, self.cfg.search_step)
        self.alpha_beta.copy_(torch.tensor([alpha, beta]))
        log.info("alpha=%.3f beta=%.3f (%s top-1 %.2f%%)", alpha, beta, label, acc)
        return {"on": label, "alpha": alpha, "beta": beta, f"{split}_top1": acc, "selected_on_test": split == "test"}

    def _record_search(self, record: dict[str, Any], paper: str) -> None:
        on_test = bool(record.pop("selected_on_test", False))
        self.selection = {"on": record["on"], "among": "alpha and beta", "chosen": record, "selected_on_test": on_test}
        if paper:
            self.selection["protocol"] = paper

    def fit(self, ctx: FitContext) -> None:
        self._build_cache(ctx)
        record = self._search(ctx)
        self._record_search(record, self.paper_protocol if ctx.cfg.train.select_on == "paper" else "")
        self._info.update({"alpha": self.alpha, "beta": self.beta, "num_keys": int(self.keys.shape[0]),
                           "augment_views": self.cfg.augment_views})

    def extra_results(self) -> dict[str, Any]:
        return {self.name: dict(self._info)}


@register_method("tip_adapter_f")
class TipAdapterF(TipAdapter):
    """Tip-Adapter-F: the cache keys are fine-tuned (AdamW, 20 epochs) by the engine's trainer; best epoch on val."""

    finetune = True
    select_among = ("epochs",)
    paper_protocol = PAPER_F

    def train_config(self, train: TrainConfig) -> TrainConfig:
        """The released recipe from this method's config; seed, precision, selection, resume from `train`."""
        cfg = self.cfg
        return dataclasses.replace(
            train, optimizer="adamw", lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay, batch_size=cfg.batch_size,
            epochs=cfg.epochs, scheduler="cosine", sched_unit="step", warmup_epochs=0, min_lr=0.0, clip_grad_norm=None,
            val_every=1,
        )

    def fit(self, ctx: FitContext) -> None:
        from ..engine.trainer import train

        self._build_cache(ctx)
        self.alpha_beta.copy_(torch.tensor([self.cfg.init_alpha, self.cfg.init_beta]))  # training uses the initial pair
        summary = train(self, ctx)  # selects the epoch per train.select_on and records it in self.selection
        epochs = dict(self.selection or {})
        paper = ctx.cfg.train.select_on == "paper"
        record = self._search(ctx)
        if paper and record["on"] != "test" and summary.best_metric is not None:
            # main.py reports max(best-epoch test acc at the initial alpha/beta, test acc at the searched pair)
            test = method_features(self, dataclasses.replace(ctx, task=ctx.task.unguarded()), "test")
            with torch.no_grad():
                logits = self.logits_from_features(test.proj.to(self.keys.device))
            searched = 100.0 * float(logits.argmax(-1).cpu().eq(test.labels).float().mean())
            record["test_top1_searched"] = searched
            if summary.best_metric > searched:
                self.alpha_beta.copy_(torch.tensor([self.cfg.init_alpha, self.cfg.init_beta]))
                record.update(alpha=self.cfg.init_alpha, beta=self.cfg.init_beta, kept_initial_on_test=True)
            record["selected_on_test"] = True
        self._record_search(record, self.paper_protocol if paper else "")
        assert self.selection is not None
        self.selection = {**epochs, "alpha_beta": self.selection,
                          "selected_on_test": bool(epochs.get("selected_on_test")) or self.selection["selected_on_test"]}
        self._info.update({"alpha": self.alpha, "beta": self.beta, "num_keys": int(self.keys.shape[0]),
                           "augment_views": self.cfg.augment_views})
