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

Equations, the released protocol, the named options and every deliberate difference: docs/methods/tip_adapter.md.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones.base import Backbone
from ..config import FeatureOptions
from ..contract import FeatureSpec, FitContext, FitResult, Inputs, Output, SelectionRecord, register_method
from ..data.base import TaskInfo
from ..errors import ConfigError
from .clip_kit import TextClassifierMethod

log = logging.getLogger(__name__)

PAPER = ("released Tip-Adapter scripts: alpha/beta searched on the full val split (on the TEST split where the "
         "dataset has none, as main_imagenet.py)")
PAPER_F = ("released Tip-Adapter-F scripts: best epoch on the TEST split; alpha/beta searched on the full val split "
           "and the better of the two TEST accuracies kept (main.py), or searched on the TEST split where the dataset "
           "has no val split (main_imagenet.py)")


@dataclass
class TipAdapterConfig(FeatureOptions):
    augment_views: int = 10  # augmented views of the train split averaged into the keys (0: eval view only)
    init_alpha: float = 1.0  # residual ratio before the search (per-dataset values in configs/tip_adapter)
    init_beta: float = 1.0  # sharpness
    search_scale: list[float] = field(default_factory=lambda: [7.0, 3.0])  # [beta max, alpha max]
    search_step: list[int] = field(default_factory=lambda: [200, 20])  # [beta points, alpha points]
    logit_scale: float | None = None  # None: the model's own (100 for OpenAI CLIP)

    def __post_init__(self) -> None:
        if len(self.search_scale) != 2 or len(self.search_step) != 2:
            raise ConfigError("tip_adapter.search_scale and search_step need two values: [beta, alpha]")
        if self.search_scale[0] <= 0.1 or self.search_scale[1] <= 0 or min(self.search_step) < 1:
            raise ConfigError(f"tip_adapter.search_scale={self.search_scale} needs beta max > 0.1 (the grid starts "
                              f"at 0.1) and alpha max > 0; search_step={self.search_step} needs >= 1 points each")
        if self.augment_views < 0:
            raise ConfigError(f"tip_adapter.augment_views={self.augment_views} must be >= 0")


def tip_logits(feats: Tensor, text_weights: Tensor, keys: Tensor, values: Tensor, alpha: float, beta: float,
               scale: float = 100.0) -> Tensor:
    """scale * f W^T + alpha * exp(-beta * (1 - f Keys^T)) Values, with f already L2-normalised."""
    clip_logits = scale * feats @ text_weights.t()
    affinity = feats @ keys.t()
    return clip_logits + alpha * torch.exp(-beta * (1.0 - affinity)) @ values


REFRESH = 16  # betas between exact exponentials in the search's recurrence (float32 drift stays below ~1e-6)


def grid(search_scale: list[float], search_step: list[int]) -> tuple[list[float], list[float]]:
    """The released grid: beta_i = 0.1 + i (s_b - 0.1)/n_b for i < n_b, alpha_j likewise."""
    betas = [i * (search_scale[0] - 0.1) / search_step[0] + 0.1 for i in range(search_step[0])]
    alphas = [j * (search_scale[1] - 0.1) / search_step[1] + 0.1 for j in range(search_step[1])]
    return betas, alphas


def search_alpha_beta(feats: Tensor, labels: Tensor, text_weights: Tensor, keys: Tensor, values: Tensor,
                      scale: float, search_scale: list[float], search_step: list[int],
                      chunk_bytes: int = 256 * 2**20) -> tuple[float, float, float]:
    """The released grid search; returns (alpha, beta, val acc %), the first best pair in (beta, alpha) order
    winning, as in the released loop. `grid_correct` counts each pair's correct rows."""
    betas, alphas = grid(search_scale, search_step)
    correct = grid_correct(feats, labels, text_weights, keys, values, scale, betas, alphas, chunk_bytes)
    flat = int(correct.flatten().argmax())  # the first maximum in (beta, alpha) order
    i, j = divmod(flat, len(alphas))
    return alphas[j], betas[i], 100.0 * float(correct[i, j]) / feats.shape[0]


def padded_length(count: int) -> int:
    """The smallest of 0, 1, 2, 3, then m * 2^e (m in 4..7) that holds `count`: quarter-octave steps keep the
    padding under 25 % with few distinct lengths (about 4 per doubling of the largest class)."""
    if count <= 4:
        return count
    e = count.bit_length() - 3  # count in [4 * 2^e, 8 * 2^e)
    return -(-count // 2**e) * 2**e


class ClassBlocks:
    """One-hot cache values as a layout: the keys' columns gathered class by class, each class padded to a length
    of `padded_length` (at most 25 % more columns), classes of equal padded length side by side. A per-class sum over
    keys is then a reshape and a contiguous `sum` per length group (a few times faster than `index_add_`, and no
    (keys x classes) matmul). Padding columns point at a sentinel column that holds -inf affinity (weight 0)."""

    def __init__(self, key_labels: Tensor, num_classes: int) -> None:
        counts = torch.bincount(key_labels, minlength=num_classes)
        length = torch.tensor([padded_length(int(n)) for n in counts])
        by_class = torch.argsort(key_labels, stable=True)  # key positions, class by class
        start = torch.cumsum(counts, 0) - counts
        sentinel = key_labels.numel()
        self.groups: list[tuple[int, int]] = []  # (classes in the group, padded length)
        columns, order = [], []
        for n in torch.unique(length[counts > 0]).tolist():
            cls = torch.nonzero(length == n).flatten()
            slot = torch.arange(n)
            pos = start[cls, None] + slot[None]
            real = slot[None] < counts[cls, None]
            columns.append(torch.where(real, by_class[pos.clamp(max=sentinel - 1)], sentinel).flatten())
            order.append(cls)
            self.groups.append((len(cls), n))
        self.columns = torch.cat(columns)  # (K',) key index per padded column, `sentinel` for padding
        self.class_order = torch.cat(order)  # class of each group output column
        self.num_classes = num_classes

    def to(self, device: torch.device) -> ClassBlocks:
        """The layout's index tensors on `device` (moved once, not per beta)."""
        self.columns, self.class_order = self.columns.to(device), self.class_order.to(device)
        return self

    def gather(self, affinity: Tensor) -> Tensor:
        """(rows, K) affinities -> (rows, K') in block layout, padding at -inf."""
        pad = affinity.new_full((affinity.shape[0], 1), float("-inf"))
        return torch.cat([affinity, pad], dim=1)[:, self.columns]

    def class_sums(self, weights: Tensor) -> Tensor:
        """(rows, K') block-layout weights -> (rows, C) per-class sums."""
        rows, parts, at = weights.shape[0], [], 0
        for n_cls, n in self.groups:
            parts.append(weights[:, at : at + n_cls * n].view(rows, n_cls, n).sum(-1))
            at += n_cls * n
        out = weights.new_zeros(rows, self.num_classes)
        out[:, self.class_order] = torch.cat(parts, dim=1)
        return out


def grid_correct(feats: Tensor, labels: Tensor, text_weights: Tensor, keys: Tensor, values: Tensor, scale: float,
                 betas: list[float], alphas: list[float], chunk_bytes: int = 256 * 2**20) -> Tensor:
    """(betas, alphas) counts of val rows the Tip-Adapter logits classify correctly.

    The released loop computes exp(-beta (1 - A)) @ values for every pair: a (val x keys) exponential and a
    one-hot matmul per beta (28 GB at once at ImageNet-LT's 20,000 x 115,846, and slow even chunked). Here, per
    chunk of val rows (affinity of about `chunk_bytes`), with the same result up to float rounding (time and peak
    memory at that size: benchmarks/README.md):
    - exp(-beta (1 - a)) = e^-beta exp(beta a), and the betas are evenly spaced, so exp(beta_i a) is the previous
      one times exp(delta a): one multiply per pair and beta (an exact exponential every REFRESH betas);
    - the one-hot values make the cache term a per-class sum over keys (`ClassBlocks`);
    - a row's logits are clip + alpha' S (alpha' = alpha e^-beta), lines in alpha': the true class y wins exactly
      for alpha' in [max over c with S_y > S_c of (l_c - l_y)/(S_y - S_c), min over c with S_y < S_c of the
      same], so every alpha is scored from that interval instead of an argmax per alpha (a tie, an exact float
      equality of two logits, counts for y where argmax could pick a lower class index).
    Soft (non one-hot) values take the released formula per beta, chunked the same way."""
    if min(betas) <= 0:
        raise ValueError(f"Tip-Adapter's beta must be > 0, got {min(betas)}")
    device = feats.device
    correct = torch.zeros(len(betas), len(alphas), dtype=torch.long, device=device)
    alpha_t = torch.tensor(alphas, dtype=torch.float64, device=device)
    one_hot = bool(((values == 0) | (values == 1)).all() and values.sum(dim=1).eq(1).all())
    blocks = ClassBlocks(values.argmax(dim=1).cpu(), values.shape[1]).to(device) if one_hot else None
    width = blocks.columns.numel() if blocks is not None else keys.shape[0]
    rows = max(1, chunk_bytes // max(3 * 4 * width, 1))  # affinity, running exponential, step factor
    steps = torch.tensor(betas, dtype=torch.float64).diff()
    even = bool(len(betas) < 3 or torch.allclose(steps, steps[0], rtol=1e-9, atol=0.0))
    for lo in range(0, feats.shape[0], rows):
        f, y = feats[lo : lo + rows], labels[lo : lo + rows]
        clip_logits = scale * f @ text_weights.t()
        affinity = f @ keys.t()
        if blocks is None:
            for i, beta in enumerate(betas):
                cache = torch.exp(-beta * (1.0 - affinity)) @ values
                logits = clip_logits[None] + alpha_t.float()[:, None, None] * cache[None]
                correct[i] += logits.argmax(-1).eq(y[None]).sum(-1)
            continue
        affinity = blocks.gather(affinity)
        margin = clip_logits.gather(1, y[:, None]) - clip_logits  # l_y - l_c
        step = torch.exp((betas[1] - betas[0]) * affinity) if len(betas) > 1 and even else None
        weights = affinity  # replaced at i = 0
        for i, beta in enumerate(betas):
            if step is None or i % REFRESH == 0:
                weights = torch.exp(beta * affinity)
            else:
                weights.mul_(step)
            sums = blocks.class_sums(weights)
            correct[i] += _alpha_hits(margin, sums.gather(1, y[:, None]) - sums, alpha_t * math.exp(-beta))
    return correct


def _alpha_hits(margin: Tensor, gain: Tensor, alphas: Tensor) -> Tensor:
    """For rows with logits l_c + a S_c (margin = l_y - l_c, gain = S_y - S_c): how many rows y wins at each a."""
    ratio = -margin / gain  # where y's and c's lines cross (inf / nan where gain == 0: masked below)
    low = torch.where(gain > 0, ratio, float("-inf")).amax(dim=1)
    high = torch.where(gain < 0, ratio, float("inf")).amin(dim=1)
    never = ((gain == 0) & (margin < 0)).any(dim=1)  # a parallel line strictly above y's
    a = alphas.to(margin.dtype)[None]
    hits = (a >= low[:, None]) & (a <= high[:, None]) & ~never[:, None]
    return hits.sum(dim=0)


@register_method("tip_adapter")
class TipAdapter(TextClassifierMethod):
    """Training-free cache model on few-shot features (alpha/beta searched on val); keys stay frozen."""

    Config = TipAdapterConfig
    inputs = "features"
    select_among = ()  # nothing trains: only alpha/beta are chosen
    paper_protocol = PAPER
    finetune = False

    def __init__(self, cfg: TipAdapterConfig, backbone: Backbone, info: TaskInfo) -> None:
        super().__init__(cfg, backbone, info)
        self.init_text_classifier(backbone, info, cfg.logit_scale)
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
        views = self.cached_views(ctx)
        keys = F.normalize(views.stack("proj").float().mean(dim=0), dim=-1).to(self.keys.device)
        values = F.one_hot(views.labels, self.num_classes).float().to(self.values.device)
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
        fs = self.cached_features(sctx, split)
        f = F.normalize(fs.proj.float(), dim=-1).to(self.keys.device)
        alpha, beta, acc = search_alpha_beta(f, fs.labels.to(f.device), self.text_weights, self.keys.detach(),
                                             self.values, self.scale, self.cfg.search_scale, self.cfg.search_step)
        self.alpha_beta.copy_(torch.tensor([alpha, beta]))
        log.info("alpha=%.3f beta=%.3f (%s top-1 %.2f%%)", alpha, beta, label, acc)
        return {"on": label, "alpha": alpha, "beta": beta, f"{split}_top1": acc, "selected_on_test": split == "test"}

    def _search_record(self, record: dict[str, Any], paper: bool) -> SelectionRecord:
        on_test = bool(record.pop("selected_on_test", False))
        return SelectionRecord(record["on"], "alpha and beta", record, on_test, self.paper_protocol if paper else "")

    def _record_info(self) -> None:
        self._info.update({"alpha": self.alpha, "beta": self.beta, "num_keys": int(self.keys.shape[0]),
                           "augment_views": self.cfg.augment_views})

    def prepare(self, ctx: FitContext) -> None:
        self._build_cache(ctx)

    def finish(self, ctx: FitContext, result: FitResult) -> FitResult:
        """alpha and beta searched where train.select_on says."""
        selection = self._search_record(self._search(ctx), ctx.cfg.train.select_on == "paper")
        self._record_info()
        return FitResult(result.training, selection)

    def extra_results(self) -> dict[str, Any]:
        return dict(self._info)


@register_method("tip_adapter_f")
class TipAdapterF(TipAdapter):
    """Tip-Adapter-F: the cache keys are fine-tuned (AdamW, 20 epochs) by the engine's trainer; best epoch on val."""

    finetune = True
    select_among = ("epochs",)
    paper_protocol = PAPER_F
    # the released recipe: AdamW lr 1e-3, eps 1e-4, torch's default weight decay 0.01, batch 256, 20 epochs, cosine
    # over iterations, no warm-up
    train_defaults: ClassVar[dict[str, Any]] = {
        "optimizer": "adamw", "lr": 1e-3, "eps": 1e-4, "weight_decay": 0.01, "batch_size": 256,
        "epochs": 20, "scheduler": "cosine", "sched_unit": "step", "warmup_epochs": 0, "min_lr": 0.0}

    def prepare(self, ctx: FitContext) -> None:
        self._build_cache(ctx)
        self.alpha_beta.copy_(torch.tensor([self.cfg.init_alpha, self.cfg.init_beta]))  # training uses the initial pair

    def finish(self, ctx: FitContext, result: FitResult) -> FitResult:
        """After the epoch was chosen: alpha and beta searched, recorded after the epoch's choice."""
        assert result.training is not None and result.selection is not None
        paper = ctx.cfg.train.select_on == "paper"
        record = self._search(ctx)
        best_metric = result.training.best_metric
        if paper and record["on"] != "test" and best_metric is not None:
            # main.py reports max(best-epoch test acc at the initial alpha/beta, test acc at the searched pair)
            test = self.cached_features(dataclasses.replace(ctx, task=ctx.task.unguarded()), "test")
            with torch.no_grad():
                logits = self.logits_from_features(test.proj.to(self.keys.device))
            searched = 100.0 * float(logits.argmax(-1).cpu().eq(test.labels).float().mean())
            record["test_top1_searched"] = searched
            if best_metric > searched:
                self.alpha_beta.copy_(torch.tensor([self.cfg.init_alpha, self.cfg.init_beta]))
                record.update(alpha=self.cfg.init_alpha, beta=self.cfg.init_beta, kept_initial_on_test=True)
            record["selected_on_test"] = True
        selection = result.selection.followed_by("alpha_beta", self._search_record(record, paper))
        self._record_info()
        return FitResult(result.training, selection)
