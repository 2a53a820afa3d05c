"""GLA — Generalized Logit Adjustment (Zhu et al., NeurIPS 2023), and WiSE-FT as its comparison baseline.

`gla` (mode `debiased_zeroshot`): calibrate the zero-shot logits with the temperature T_zs that makes mean
max-softmax confidence equal accuracy, estimate the pretraining label prior q (min_q CE(z/T_zs - log q, y), our
own simplex solver in `tailclip.posthoc.prior`) on the same labelled data, and predict with z/T_zs - log q.

`gla` (mode `ensemble`): the same plus any fine-tuned run (linear probe, LIFT, Sage, LDC …) given as a run
folder: its saved `logits_{split}.safetensors` are used (or, when a split was not evaluated, its checkpoint is
loaded and run), T_ft is calibrated too, and the prediction is z_ft/T_ft + z_zs/T_zs - log q - log p_s
(+ log p_t). p_s is the label distribution the fine-tuned model was trained on; `source_prior: auto` takes it
as uniform when that run's model balances the prior (`Method.balances_prior`, saved in its checkpoint.json), else
as the train class frequencies. `finetuned_run` may hold {shots}, {seed} and {dataset}, filled from the data config,
so one preset serves a whole few-shot grid; the run folder is read through `tailclip.engine.runs.RunDir`.

Which data fits what follows the released few-shot code (BeierZhu/GLA, GLA.FS.public/trainers/gla.py,
`build_model` and `test`; `CLIP.pp_estimate` in trainers/util.py): T_zs and q are fitted together on one set
of labelled images, the K-shot train + val images when K < 20 and val alone otherwise (the zero-shot model
never saw any of them); T_ft on val only (the fine-tuned model saw train). `results.json` records the splits
under gla.fitted_on.

`wise_ft`: weight interpolation between a fine-tuned run and its zero-shot starting point (see
`tailclip.posthoc.wise_ft` for when that is meaningful).

Equations, the released protocol, the named options and every deliberate difference: docs/methods/gla.md.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..backbones.base import Backbone
from ..config import FeatureOptions, check_choice, check_range
from ..contract import FitContext, Method, Output, Predictions, register_method
from ..data.base import TaskInfo
from ..engine.checkpoint import read_meta
from ..engine.evaluate import predict_split
from ..engine.runs import RunDir, run_from_template
from ..errors import ConfigError, TailclipError
from ..posthoc import (
    align,
    confidence_temperature,
    debias_zeroshot,
    estimate_prior,
    gla_ensemble,
    interpolate_states,
    prior_nll,
    save_prior,
)
from .clip_kit import TextClassifierMethod
from .loading import build_method, load_trained

log = logging.getLogger(__name__)

FIT_DATA = ("val", "train", "train+val")
PRIOR_ON_TRAIN_BELOW_K = 20  # released code: q (and T_zs) on K-shot train + val when K < 20, else on val


@dataclass
class GLAConfig(FeatureOptions):
    mode: str = "debiased_zeroshot"  # debiased_zeroshot | ensemble
    finetuned_run: str | None = None  # run folder of the fine-tuned model (ensemble); may use {shots} {seed} {dataset}
    prior_data: str = "auto"  # T_zs and q: auto (train+val if K-shot with K < 20, else val) | val | train | train+val
    calibration_split: str = "val"  # T_ft of the fine-tuned model (it saw train): val | train | train+val
    source_prior: str = "auto"  # auto (by the fine-tuned run's loss) | train | uniform: p_s of the fine-tuned model
    target_prior: str = "uniform"  # uniform | train (test labels distributed like train)
    logit_scale: float | None = None  # zero-shot logit scale (None: the model's own)
    prior_max_iter: int = 100  # Newton iterations (a few dozen at most converge to a 1e-10 gradient)
    prior_reg: float = 0.0  # pull towards uniform (0: the plain GLA objective)

    def __post_init__(self) -> None:
        check_choice("gla.mode", self.mode, ("debiased_zeroshot", "ensemble"))
        check_choice("gla.prior_data", self.prior_data, ("auto", *FIT_DATA))
        check_choice("gla.calibration_split", self.calibration_split, FIT_DATA)
        check_choice("gla.source_prior", self.source_prior, ("auto", "train", "uniform"))
        check_choice("gla.target_prior", self.target_prior, ("uniform", "train"))
        check_range("gla.prior_reg", self.prior_reg, 0.0)
        if self.mode == "ensemble" and not self.finetuned_run:
            raise ConfigError("gla.mode=ensemble needs gla.finetuned_run=<run folder of a fine-tuned model>")


def _accuracy(logits: Tensor, labels: Tensor) -> float:
    return 100.0 * float(logits.argmax(-1).eq(labels).float().mean())


def task_shots(info: TaskInfo) -> int | None:
    """K of a K-shot task: the drawn K, else the count of a train split with equally many images per class."""
    if info.shots is not None:
        return int(info.shots)
    counts = set(info.class_counts.tolist())
    if "train" in info.split_names and len(counts) == 1:
        return counts.pop()
    return None


def source_prior_of(run: RunDir) -> str:
    """`train` or `uniform`: whether the run's model balanced the label prior (`balances_prior` in its
    checkpoint.json, saved from `Method.balances_prior`)."""
    balanced = read_meta(run.path).get("balances_prior")
    if not isinstance(balanced, bool):
        raise ConfigError(
            f"gla.source_prior=auto reads whether the fine-tuned run balanced the label prior from its checkpoint.json "
            f"(`balances_prior`), which {run.path} lacks (no checkpoint, or saved by an older tailclip); set "
            "gla.source_prior=train (trained with plain CE) or gla.source_prior=uniform (a balancing loss)"
        )
    return "uniform" if balanced else "train"


@register_method("gla")
class GLA(TextClassifierMethod):
    """Generalized logit adjustment: debiased zero-shot CLIP, or its ensemble with a fine-tuned run."""

    Config = GLAConfig
    inputs = "features"

    def __init__(self, cfg: GLAConfig, backbone: Backbone, info: TaskInfo) -> None:
        super().__init__(cfg, backbone, info)
        self.init_text_classifier(backbone, info, cfg.logit_scale)
        self.register_buffer("log_prior", torch.full((info.num_classes,), -float(np.log(info.num_classes))))
        self.register_buffer("temperatures", torch.ones(2))  # (T_zs, T_ft)
        self.register_buffer("log_source_prior", torch.zeros(info.num_classes))
        self.register_buffer("log_target_prior", torch.zeros(info.num_classes))
        self._run: RunDir | None = None
        self._ft_method: Method | None = None
        self._info: dict[str, Any] = {}

    # ------------------------------------------------------------------ zero-shot side
    def forward(self, images: Tensor, labels: Tensor | None = None) -> Output:
        """Debiased zero-shot on images (the ensemble needs the fine-tuned run's logits: use `predict`)."""
        if self.cfg.mode == "ensemble":
            raise TailclipError("gla ensemble predicts from a fine-tuned run's saved logits, not from images")
        z = self.zeroshot_logits(self.backbone.encode_image(images).proj)
        logits = z / self.temperatures[0] - self.log_prior + self.log_target_prior
        return Output(logits, F.cross_entropy(logits, labels) if labels is not None else None)

    def _zs(self, ctx: FitContext, split: str) -> tuple[Tensor, Tensor, Tensor, list[str]]:
        fs = self.cached_features(ctx, split)
        return self.zeroshot_logits(fs.proj.to(self.text_weights.device)).cpu(), fs.labels, fs.indices, fs.skipped

    # ------------------------------------------------------------------ fine-tuned side
    def _finetuned(self, ctx: FitContext) -> RunDir:
        if self._run is None:
            assert self.cfg.finetuned_run
            self._run = run_from_template(self.cfg.finetuned_run, ctx.cfg.data, ctx.task.name, "gla.finetuned_run")
        return self._run

    def _ft_raw(self, ctx: FitContext, split: str) -> tuple[Tensor, Tensor, Tensor]:
        run = self._finetuned(ctx)
        saved = run.load_logits(split)
        if saved is not None:
            return saved.logits, saved.labels, saved.indices
        if run.checkpoint_path() is None:
            raise TailclipError(
                f"fine-tuned run {run.path} has no logits_{split}.safetensors and no checkpoint: evaluate it on "
                f"{split} (eval.splits=[val,test]) or give a run with a checkpoint"
            )
        if self._ft_method is None:
            log.info("running the fine-tuned checkpoint of %s on %s", run.path, split)
            trained = load_trained(run.path)
            assert trained.task is not None
            self._ft_method = trained.method
            self._ft_ctx = FitContext(trained.cfg, trained.task, ctx.run_dir, ctx.device)
        preds = predict_split(self._ft_method, self._ft_ctx, split)
        return preds.logits, preds.labels, preds.indices

    def _pair(self, ctx: FitContext, split: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(zs logits, ft logits, labels, indices) aligned on the images both have."""
        zs, y, idx, _ = self._zs(ctx, split)
        ft, y_ft, idx_ft = self._ft_raw(ctx, split)
        if ft.shape[1] != zs.shape[1]:
            raise TailclipError(f"fine-tuned run has {ft.shape[1]} classes, zero-shot has {zs.shape[1]}")
        pa, pb = align(idx, idx_ft)
        if not torch.equal(y[pa], y_ft[pb]):
            raise TailclipError(f"fine-tuned run's {split} labels differ from this dataset's: not the same split")
        return zs[pa], ft[pb], y[pa], idx[pa]

    # ------------------------------------------------------------------ fitting
    def _fit_splits(self, ctx: FitContext, choice: str, key: str) -> list[str]:
        """The labelled splits a named choice (`train+val`, ...) stands for; each must exist."""
        if choice == "auto":  # the released code's rule (trainers/gla.py, build_model)
            k = task_shots(self.info)
            choice = "train+val" if k is not None and k < PRIOR_ON_TRAIN_BELOW_K else "val"
        splits = choice.split("+")
        missing = [s for s in splits if s not in ctx.task.splits]
        if missing:
            raise TailclipError(
                f"gla.{key}={choice}: {ctx.task.name} has no {', '.join(map(repr, missing))} split "
                f"(it has {', '.join(ctx.task.splits)}); GLA fits on labelled, class-balanced data"
            )
        return splits

    @torch.no_grad()
    def prepare(self, ctx: FitContext) -> None:
        """Fits T_zs and q (and, for the ensemble, T_ft and p_s); nothing trains by gradient."""
        cfg = self.cfg
        prior_splits = self._fit_splits(ctx, cfg.prior_data, "prior_data")
        parts = [self._zs(ctx, s)[:2] for s in prior_splits]
        z_prior, y_prior = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        t_zs = confidence_temperature(z_prior, y_prior)
        with torch.enable_grad():
            q = estimate_prior(z_prior, y_prior, t_zs, max_iter=cfg.prior_max_iter, reg=cfg.prior_reg)
        self.log_prior.copy_(q.clamp_min(1e-12).log().float())
        self.temperatures[0] = t_zs
        if cfg.target_prior == "train":
            counts = torch.as_tensor(ctx.task.class_counts, dtype=torch.float64).clamp_min(1)
            self.log_target_prior.copy_((counts / counts.sum()).log().float())
        fitted_on = {"temperature_zs": "+".join(prior_splits), "prior": "+".join(prior_splits)}
        info: dict[str, Any] = {
            "mode": cfg.mode,
            "temperature_zs": t_zs,
            "fitted_on": fitted_on,
            "prior_samples": int(y_prior.numel()),
            "prior_nll_uniform": prior_nll(z_prior, y_prior, t_zs, None),
            "prior_nll_estimated": prior_nll(z_prior, y_prior, t_zs, q),
            "target_prior": cfg.target_prior,
        }
        if "val" in ctx.task.splits:
            zs_val, y_val, _, _ = self._zs(ctx, "val")
            info.update(val_top1_zeroshot=_accuracy(zs_val, y_val),
                        val_top1_debiased=_accuracy(zs_val / t_zs - self.log_prior, y_val))
        if cfg.mode == "ensemble":
            self._fit_ensemble(ctx, info)
        self._info = info
        path = save_prior(ctx.run_dir, q, ctx.task.classnames,
                          {"temperature_zs": t_zs, "prior_data": fitted_on["prior"],
                           "model": getattr(self.backbone, "name", None), "dataset": ctx.task.name})
        log.info("GLA: T_zs=%.3f and q fitted on %s (%d samples), saved %s", t_zs, fitted_on["prior"],
                 info["prior_samples"], path.name)

    def _fit_ensemble(self, ctx: FitContext, info: dict[str, Any]) -> None:
        """T_ft on the calibration split(s), p_s of the fine-tuned run; adds what it chose to `info`."""
        cfg = self.cfg
        run = self._finetuned(ctx)
        ft_cfg = run.check_same_task(ctx.task, ctx.cfg.data)
        source = cfg.source_prior if cfg.source_prior != "auto" else source_prior_of(run)
        cal_splits = self._fit_splits(ctx, cfg.calibration_split, "calibration_split")
        pairs = [self._pair(ctx, s) for s in cal_splits]
        zs_c, ft_c, y_c = (torch.cat([p[i] for p in pairs]) for i in range(3))
        t_ft = confidence_temperature(ft_c, y_c)
        self.temperatures[1] = t_ft
        if source == "train":
            counts = torch.as_tensor(ctx.task.class_counts, dtype=torch.float64).clamp_min(1)
            self.log_source_prior.copy_((counts / counts.sum()).log().float())
        cal = "+".join(cal_splits)
        info["fitted_on"]["temperature_ft"] = cal
        info.update({
            "finetuned_run": str(run.path),
            "finetuned_method": ft_cfg.method,
            "temperature_ft": t_ft,
            "source_prior": source,
            f"{cal}_top1_finetuned": _accuracy(ft_c, y_c),
            f"{cal}_top1_ensemble": _accuracy(self._combine(zs_c, ft_c), y_c),
        })

    def _combine(self, zs: Tensor, ft: Tensor | None = None) -> Tensor:
        q = self.log_prior.exp().cpu()
        target = self.log_target_prior.exp().cpu() if self.cfg.target_prior != "uniform" else None
        t_zs, t_ft = float(self.temperatures[0]), float(self.temperatures[1])
        if ft is None:
            return debias_zeroshot(zs, t_zs, q, target)
        source = self.log_source_prior.exp().cpu() if bool(self.log_source_prior.abs().sum() > 0) else None
        return gla_ensemble(ft, zs, t_ft, t_zs, q, source, target)

    @torch.no_grad()
    def own_predictions(self, ctx: FitContext, split: str) -> Predictions:
        if self.cfg.mode == "ensemble":
            zs, ft, y, idx = self._pair(ctx, split)
            return Predictions(self._combine(zs, ft), y, idx)
        zs, y, idx, skipped = self._zs(ctx, split)
        return Predictions(self._combine(zs), y, idx, list(skipped))

    def extra_results(self) -> dict[str, Any]:
        return {**self._info, "prior": self.log_prior.exp().tolist()}


@dataclass
class WiSEFTConfig:
    finetuned_run: str | None = None  # run folder with a checkpoint
    alpha: float = 0.5  # 0: the method's zero-shot starting point, 1: the fine-tuned weights

    def __post_init__(self) -> None:
        check_range("wise_ft.alpha", self.alpha, 0.0, 1.0)


@register_method("wise_ft")
class WiSEFT(Method):
    """WiSE-FT: (1-alpha)*initial + alpha*fine-tuned weights of a trained run (GLA's comparison baseline)."""

    Config = WiSEFTConfig

    def __init__(self, cfg: WiSEFTConfig, backbone: Backbone, info: TaskInfo) -> None:
        super().__init__(cfg, backbone, info)
        if not cfg.finetuned_run:
            raise ConfigError("wise_ft.finetuned_run=<run folder of a fine-tuned model> is required")
        run = RunDir.existing(cfg.finetuned_run, "wise_ft.finetuned_run")
        weights = run.load_checkpoint_tensors()
        ft_cfg = run.load_config()
        inner = build_method(ft_cfg, backbone, info)
        start = inner.checkpoint_state()
        inner.load_checkpoint_state(interpolate_states(start, weights, cfg.alpha))
        inner.requires_grad_(False)
        self.inner = inner
        self.inner_method = ft_cfg.method
        log.info("WiSE-FT of %s (%s) at alpha=%.2f", run.path, ft_cfg.method, cfg.alpha)

    def forward(self, images: Tensor, labels: Tensor | None = None) -> Output:
        return self.inner(images, labels)

    def own_predictions(self, ctx: FitContext, split: str) -> Predictions | None:
        """A features method's interpolated model predicts from its cache, as that method does."""
        return predict_split(self.inner, ctx, split) if self.inner.inputs == "features" else None

    def balances_prior(self) -> bool:
        return self.inner.balances_prior()

    def extra_results(self) -> dict[str, Any]:
        return {"alpha": self.cfg.alpha, "finetuned_run": self.cfg.finetuned_run, "finetuned_method": self.inner_method}
