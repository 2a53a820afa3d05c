"""GLA — Generalized Logit Adjustment (Zhu et al., NeurIPS 2023), and WiSE-FT as its comparison baseline.

`gla` (mode `debiased_zeroshot`): calibrate the zero-shot logits with the temperature T_zs that makes mean
max-softmax confidence equal accuracy on the validation split, estimate the pretraining label prior q on
labelled balanced data (min_q CE(z/T_zs - log q, y), our own simplex solver in `tailclip.posthoc.prior`) and
predict with z/T_zs - log q.

`gla` (mode `ensemble`): the same plus any fine-tuned run (linear probe, LIFT, Sage, LDC …) given as a run
folder: its saved `logits_{split}.safetensors` are used (or, when a split was not evaluated, its checkpoint is
loaded and run), T_ft is calibrated on validation too, and the prediction is
z_ft/T_ft + z_zs/T_zs - log q - log p_s (+ log p_t). p_s is the label distribution the fine-tuned model was
trained on; `source_prior: auto` takes it as uniform when that run's loss already balanced its logits (LA,
balanced softmax), else as the train class frequencies. `finetuned_run` may hold {shots}, {seed} and
{dataset}, filled from the data config, so one preset serves a whole few-shot grid.

`wise_ft`: weight interpolation between a fine-tuned run and its zero-shot starting point (see
`tailclip.posthoc.wise_ft` for when that is meaningful).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor

from ..backbones.base import Backbone
from ..config import check_choice, check_range
from ..data.base import Task
from ..errors import ConfigError, TailclipError
from ..features import method_features
from ..posthoc import (
    align,
    confidence_temperature,
    debias_zeroshot,
    estimate_prior,
    gla_ensemble,
    interpolate_states,
    load_run_logits,
    prior_nll,
    save_prior,
)
from .base import FitContext, Method, Output, Predictions, register_method
from .zeroshot import zeroshot_weights

log = logging.getLogger(__name__)

BALANCING_LOSSES = {"la", "bs", "logit_adjusted", "balanced_softmax", "cla", "compensated", "compensated_la"}


@dataclass
class GLAConfig:
    mode: str = "debiased_zeroshot"  # debiased_zeroshot | ensemble
    finetuned_run: str | None = None  # run folder of the fine-tuned model (ensemble); may use {shots} {seed} {dataset}
    calibration_split: str = "val"  # labelled, class-balanced split the temperatures are calibrated on
    prior_data: str = "auto"  # auto (train+val when train is balanced, e.g. K-shot; else val) | val | train | train+val
    source_prior: str = "auto"  # auto | train | uniform: p_s of the fine-tuned model
    target_prior: str = "uniform"  # uniform | train (test labels distributed like train)
    logit_scale: float | None = None  # zero-shot logit scale (None: the model's own)
    prior_max_iter: int = 500
    prior_reg: float = 0.0  # pull towards uniform (0: the plain GLA objective)
    plot: bool = True  # prior.png next to prior.json (needs matplotlib)
    feature_cache: str | None = None

    def __post_init__(self) -> None:
        check_choice("gla.mode", self.mode, ("debiased_zeroshot", "ensemble"))
        check_choice("gla.prior_data", self.prior_data, ("auto", "val", "train", "train+val"))
        check_choice("gla.source_prior", self.source_prior, ("auto", "train", "uniform"))
        check_choice("gla.target_prior", self.target_prior, ("uniform", "train"))
        check_range("gla.prior_reg", self.prior_reg, 0.0)
        if self.mode == "ensemble" and not self.finetuned_run:
            raise ConfigError("gla.mode=ensemble needs gla.finetuned_run=<run folder of a fine-tuned model>")


def _accuracy(logits: Tensor, labels: Tensor) -> float:
    return 100.0 * float(logits.argmax(-1).eq(labels).float().mean())


@register_method("gla")
class GLA(Method):
    """Generalized logit adjustment: debiased zero-shot CLIP, or its ensemble with a fine-tuned run."""

    Config = GLAConfig
    inputs = "features"

    def __init__(self, cfg: GLAConfig, backbone: Backbone, task: Task) -> None:
        super().__init__(cfg, backbone, task)
        self.scale = cfg.logit_scale if cfg.logit_scale is not None else float(backbone.logit_scale)
        self.register_buffer("text_weights", zeroshot_weights(backbone, task).float())
        self.register_buffer("log_prior", torch.full((task.num_classes,), -float(np.log(task.num_classes))))
        self.register_buffer("temperatures", torch.ones(2))  # (T_zs, T_ft)
        self.register_buffer("log_source_prior", torch.zeros(task.num_classes))
        self.register_buffer("log_target_prior", torch.zeros(task.num_classes))
        self._run: Path | None = None
        self._ft_method: Method | None = None
        self._info: dict[str, Any] = {}

    # ------------------------------------------------------------------ zero-shot side
    def zeroshot_logits(self, proj: Tensor) -> Tensor:
        return self.scale * F.normalize(proj.float(), dim=-1) @ self.text_weights.t()

    def forward(self, images: Tensor, labels: Tensor | None = None) -> Output:
        """Debiased zero-shot on images (the ensemble needs the fine-tuned run's logits: use `predict`)."""
        if self.cfg.mode == "ensemble":
            raise TailclipError("gla ensemble predicts from a fine-tuned run's saved logits, not from images")
        z = self.zeroshot_logits(self.backbone.encode_image(images).proj)
        logits = z / self.temperatures[0] - self.log_prior + self.log_target_prior
        return Output(logits, F.cross_entropy(logits, labels) if labels is not None else None)

    def _zs(self, ctx: FitContext, split: str) -> tuple[Tensor, Tensor, Tensor, list[str]]:
        fs = method_features(self, ctx, split)
        return self.zeroshot_logits(fs.proj.to(self.text_weights.device)).cpu(), fs.labels, fs.indices, fs.skipped

    # ------------------------------------------------------------------ fine-tuned side
    def _resolve_run(self, ctx: FitContext) -> Path:
        assert self.cfg.finetuned_run
        text = self.cfg.finetuned_run.format(shots=ctx.cfg.data.shots, seed=ctx.cfg.data.seed, dataset=ctx.task.name)
        run = Path(text)
        if not (run / "config.yaml").is_file():
            raise TailclipError(f"gla.finetuned_run={run} is not a run folder (no config.yaml)")
        return run

    def _check_run(self, ctx: FitContext, run: Path) -> dict[str, Any]:
        ft_cfg = yaml.safe_load((run / "config.yaml").read_text()) or {}
        results = run / "results.json"
        if results.is_file():
            names = json.loads(results.read_text()).get("classnames")
            if names is not None and list(names) != list(ctx.task.classnames):
                raise TailclipError(f"fine-tuned run {run} was trained on other classes than {ctx.task.name}")
        ft_data = ft_cfg.get("data", {})
        for key in ("name", "shots", "seed", "imbalance_ratio"):
            if key in ft_data and ft_data[key] != getattr(ctx.cfg.data, key):
                log.warning("fine-tuned run has data.%s=%r, this run %r", key, ft_data[key], getattr(ctx.cfg.data, key))
        return ft_cfg

    def _ft_raw(self, ctx: FitContext, split: str) -> tuple[Tensor, Tensor, Tensor]:
        assert self._run is not None
        saved = load_run_logits(self._run, split)
        if saved is not None:
            return saved
        if not (self._run / "checkpoint.safetensors").is_file():
            raise TailclipError(
                f"fine-tuned run {self._run} has no logits_{split}.safetensors and no checkpoint: evaluate it on "
                f"{split} (eval.splits=[val,test]) or give a run with a checkpoint"
            )
        if self._ft_method is None:
            from ..api import load_trained

            log.info("running the fine-tuned checkpoint of %s on %s", self._run, split)
            ft_cfg, ft_task, method, _ = load_trained(self._run)
            self._ft_method, self._ft_ctx = method, FitContext(ft_cfg, ft_task, ctx.run_dir, ctx.device)
        preds = self._ft_method.predict(self._ft_ctx, split)
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
    def _prior_splits(self, ctx: FitContext) -> list[str]:
        choice = self.cfg.prior_data
        if choice == "auto":
            balanced = "train" in ctx.task.splits and len(set(ctx.task.class_counts.tolist())) == 1
            choice = "train+val" if balanced else self.cfg.calibration_split
        return [s for s in choice.split("+") if s in ctx.task.splits] or [self.cfg.calibration_split]

    @torch.no_grad()
    def fit(self, ctx: FitContext) -> None:
        cfg = self.cfg
        cal = cfg.calibration_split
        if cal not in ctx.task.splits:
            raise TailclipError(f"GLA calibrates on labelled balanced data: {ctx.task.name} has no {cal!r} split")
        zs_val, y_val, _, _ = self._zs(ctx, cal)
        t_zs = confidence_temperature(zs_val, y_val)
        splits = self._prior_splits(ctx)
        parts = [self._zs(ctx, s)[:2] for s in splits]
        z_prior, y_prior = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        with torch.enable_grad():
            q = estimate_prior(z_prior, y_prior, t_zs, max_iter=cfg.prior_max_iter, reg=cfg.prior_reg)
        self.log_prior.copy_(q.clamp_min(1e-12).log().float())
        self.temperatures[0] = t_zs
        if cfg.target_prior == "train":
            counts = torch.as_tensor(ctx.task.class_counts, dtype=torch.float64).clamp_min(1)
            self.log_target_prior.copy_((counts / counts.sum()).log().float())
        info: dict[str, Any] = {
            "mode": cfg.mode,
            "temperature_zs": t_zs,
            "prior_data": "+".join(splits),
            "prior_samples": int(y_prior.numel()),
            "prior_nll_uniform": prior_nll(z_prior, y_prior, t_zs, None),
            "prior_nll_estimated": prior_nll(z_prior, y_prior, t_zs, q),
            "target_prior": cfg.target_prior,
            f"{cal}_top1_zeroshot": _accuracy(zs_val, y_val),
            f"{cal}_top1_debiased": _accuracy(zs_val / t_zs - self.log_prior, y_val),
        }
        if cfg.mode == "ensemble":
            self._run = self._resolve_run(ctx)
            ft_cfg = self._check_run(ctx, self._run)
            zs_v, ft_v, y_v, _ = self._pair(ctx, cal)
            t_ft = confidence_temperature(ft_v, y_v)
            self.temperatures[1] = t_ft
            source = cfg.source_prior
            if source == "auto":
                method_cfg = ft_cfg.get(str(ft_cfg.get("method", "")).replace("-", "_"), {}) or {}
                source = "uniform" if str(method_cfg.get("loss", "")).lower() in BALANCING_LOSSES else "train"
            if source == "train":
                counts = torch.as_tensor(ctx.task.class_counts, dtype=torch.float64).clamp_min(1)
                self.log_source_prior.copy_((counts / counts.sum()).log().float())
            info.update({
                "finetuned_run": str(self._run),
                "finetuned_method": ft_cfg.get("method"),
                "temperature_ft": t_ft,
                "source_prior": source,
                f"{cal}_top1_finetuned": _accuracy(ft_v, y_v),
                f"{cal}_top1_ensemble": _accuracy(self._combine(zs_v, ft_v), y_v),
            })
        self._info = info
        paths = save_prior(ctx.run_dir, q, ctx.task.classnames,
                           {"temperature_zs": t_zs, "prior_data": info["prior_data"],
                            "model": getattr(self.backbone, "name", None), "dataset": ctx.task.name},
                           plot=cfg.plot)
        log.info("GLA: T_zs=%.3f, prior estimated on %s (%d samples), saved %s", t_zs, info["prior_data"],
                 info["prior_samples"], ", ".join(p.name for p in paths))

    def _combine(self, zs: Tensor, ft: Tensor | None = None) -> Tensor:
        q = self.log_prior.exp().cpu()
        target = self.log_target_prior.exp().cpu() if self.cfg.target_prior != "uniform" else None
        t_zs, t_ft = float(self.temperatures[0]), float(self.temperatures[1])
        if ft is None:
            return debias_zeroshot(zs, t_zs, q, target)
        source = self.log_source_prior.exp().cpu() if bool(self.log_source_prior.abs().sum() > 0) else None
        return gla_ensemble(ft, zs, t_ft, t_zs, q, source, target)

    @torch.no_grad()
    def predict(self, ctx: FitContext, split: str) -> Predictions:
        if self.cfg.mode == "ensemble":
            if self._run is None:
                self._run = self._resolve_run(ctx)
            zs, ft, y, idx = self._pair(ctx, split)
            return Predictions(self._combine(zs, ft), y, idx)
        zs, y, idx, skipped = self._zs(ctx, split)
        return Predictions(self._combine(zs), y, idx, list(skipped))

    def extra_results(self) -> dict[str, Any]:
        return {"gla": {**self._info, "prior": self.log_prior.exp().tolist()}}


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

    def __init__(self, cfg: WiSEFTConfig, backbone: Backbone, task: Task) -> None:
        super().__init__(cfg, backbone, task)
        from safetensors.torch import load_file

        from ..config import load_config
        from . import get_method

        if not cfg.finetuned_run:
            raise ConfigError("wise_ft.finetuned_run=<run folder of a fine-tuned model> is required")
        run = Path(cfg.finetuned_run)
        weights = run / "checkpoint.safetensors"
        if not weights.is_file():
            raise TailclipError(f"wise_ft needs a trained run with a checkpoint; {weights} is missing")
        ft_cfg = load_config(run / "config.yaml")
        inner = get_method(ft_cfg.method)(ft_cfg.method_config(), backbone, task)
        start = inner.checkpoint_state()
        inner.load_checkpoint_state(interpolate_states(start, load_file(str(weights)), cfg.alpha))
        inner.requires_grad_(False)
        self.inner = inner
        self.inner_method = ft_cfg.method
        log.info("WiSE-FT of %s (%s) at alpha=%.2f", run, ft_cfg.method, cfg.alpha)

    def forward(self, images: Tensor, labels: Tensor | None = None) -> Output:
        return self.inner(images, labels)

    def fit(self, ctx: FitContext) -> None:
        """Nothing trains: the weights are fixed by the interpolation."""

    def predict(self, ctx: FitContext, split: str) -> Predictions:
        return self.inner.predict(ctx, split) if self.inner.inputs == "features" else super().predict(ctx, split)

    def extra_results(self) -> dict[str, Any]:
        return {"wise_ft": {"alpha": self.cfg.alpha, "finetuned_run": self.cfg.finetuned_run,
                            "finetuned_method": self.inner_method}}
