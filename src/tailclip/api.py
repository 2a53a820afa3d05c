"""The orchestrator behind `tailclip train|eval|predict`: build backbone, task and method from a RunConfig, fit
(`engine.fit`), evaluate every requested split, and write the run folder."""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__, report
from .config import RunConfig, load_config  # noqa: F401  (load_config: re-exported for library users)
from .contract import METHODS, FitContext, FitResult, Method, Predictions
from .data.base import Task
from .engine.checkpoint import save_checkpoint
from .engine.evaluate import in_label_space, label_space, predict_split
from .engine.fit import fit
from .engine.metrics import classification_metrics
from .engine.runs import RunDir
from .engine.trainer import StepCallback
from .errors import ConfigError, DataError, TailclipError
from .io import atomic_save_tensors, write_json
from .methods.loading import build, load_trained
from .runfiles import EVALS, SHOT_INDICES, logits_file
from .runtime import distributed, resolve_device

log = logging.getLogger(__name__)


def group_counts(task: Task) -> np.ndarray | None:
    """Counts that define many/medium/few: the task's own grouping counts, else its train counts. K-shot tasks
    have none: with K < 20 every class would be "few", which says nothing (few-shot papers report top-1 only)."""
    if task.meta.get("shots") is not None:
        return None
    if task.group_counts is not None:
        return task.group_counts
    return task.class_counts if "train" in task.splits else None


def save_predictions(path: Path, preds: Predictions) -> None:
    """Logits are kept with each run so post-hoc methods (GLA ensembles) can reuse them without the model.
    Written by rank 0 only, through a temp file, so readers never see half a file."""
    if not distributed.is_main_process():
        return
    atomic_save_tensors(path, {"logits": preds.logits, "labels": preds.labels, "indices": preds.indices})


def harmonic_mean(a: float, b: float) -> float:
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def restrict_to_label_space(
    task: Task, split: str, preds: Predictions, counts: np.ndarray | None, base_scoring: str = "base"
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray | None]:
    """Base-to-new protocol: logits, labels and class counts of a split within its own label space
    (`engine.evaluate.in_label_space`); other splits pass through unchanged."""
    space = label_space(task, split, base_scoring)
    scored = in_label_space(task, split, preds, base_scoring)
    if space is None or counts is None:
        return scored.logits, scored.labels, counts
    return scored.logits, scored.labels, np.asarray(counts)[np.asarray(space)]


# tailclip's default of every engine-level protocol choice; a run's results.json lists the ones it changed
PROTOCOL_DEFAULTS: dict[str, Any] = {"select_on": "auto", "cosine_span": "after_warmup", "drop_last": False,
                                     "precision": "fp32", "base_scoring": "base"}


def protocol_record(method: Method, ctx: FitContext) -> dict[str, Any]:
    """Every protocol choice that moves a paper's number (selection, schedule details, precision, the scoring of
    base test images, the method's own named protocols) and `differs`: the "key=value" list of those that are not
    tailclip's defaults ("" when none), which `tailclip report` shows."""
    choices: dict[str, Any] = {}
    if method.num_trainable() > 0:
        train = method.train_config(ctx.cfg.train)
        choices.update(select_on=train.select_on, cosine_span=train.cosine_span, drop_last=train.drop_last,
                       precision=train.precision)
    if "test_base" in ctx.task.meta.get("label_spaces", {}):
        choices["base_scoring"] = ctx.cfg.eval.base_scoring
    # the test-time ensembling actually applied: feature methods read cached eval-view features and skip it
    choices["tte"] = ctx.cfg.eval.tte if method.inputs == "images" else "none"
    if choices["tte"] != ctx.cfg.eval.tte:
        choices["tte_requested"] = f"{ctx.cfg.eval.tte} (not applied: {method.name} predicts from cached features)"
    own = {f"{method.name}.{k}": v for k, v in method.protocol().items()}
    differs = [f"{k}={v}" for k, v in choices.items() if k in PROTOCOL_DEFAULTS and v != PROTOCOL_DEFAULTS[k]
               and not (k == "precision" and v in ("amp", "amp_bf16"))]
    differs += [f"{k}={v}" for k, v in own.items()]
    return {**choices, **own, "differs": ", ".join(differs)}


def evaluate(method: Method, ctx: FitContext, fitted: FitResult | None = None) -> dict[str, Any]:
    """Predict every configured split, save its logits, and collect metrics into one results dict; `fitted`: what
    fitting trained and chose (None when a trained run is evaluated again)."""
    counts = group_counts(ctx.task)
    results: dict[str, Any] = {
        "method": ctx.cfg.method,
        "dataset": ctx.task.name,
        "classnames": ctx.task.classnames,
        "model": method.backbone.spec,
        "preprocess": method.backbone.preprocess.to_dict(),
        "trainable_params": method.num_trainable(),
        "task_meta": {k: v for k, v in ctx.task.meta.items() if k != "shot_indices"},  # (in shot_indices.json)
        "tailclip_version": __version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "splits": {},
    }
    for split in ctx.cfg.eval.splits:
        if split not in ctx.task.splits:
            log.warning("dataset %s has no %s split; not evaluated", ctx.task.name, split)
            continue
        preds = predict_split(method, ctx, split)
        save_predictions(ctx.run_dir / logits_file(split), preds)
        logits, labels, split_counts = restrict_to_label_space(ctx.task, split, preds, counts,
                                                               ctx.cfg.eval.base_scoring)
        metrics = classification_metrics(logits, labels, split_counts)
        metrics["skipped_images"] = preds.skipped
        results["splits"][split] = metrics
    main_split = "test" if "test" in results["splits"] else next(iter(results["splits"]), None)
    if main_split is not None:  # the top-level top1 ... nll: of the test split, else of the first evaluated one
        results["main_split"] = main_split
        for key in ("top1", "many", "medium", "few", "ece", "nll"):
            results[key] = results["splits"][main_split].get(key)
    if {"test_base", "test_new"} <= set(results["splits"]):
        base, new = results["splits"]["test_base"]["top1"], results["splits"]["test_new"]["top1"]
        results.update(base=base, new=new, hm=harmonic_mean(base, new))
    additions = {**(fitted.to_results() if fitted is not None else {}), method.name: method.extra_results(),
                 "protocol": protocol_record(method, ctx)}
    clash = sorted(k for k, v in additions.items() if k in results and v)
    if clash:
        raise TailclipError(f"method {method.name!r}: results.json entries {clash} would overwrite the run's own; "
                            "register the method under another name")
    results.update({k: v for k, v in additions.items() if v or k == "protocol"})
    return results


def run(cfg: RunConfig, train: bool = True, overwrite: bool = False, callbacks: Sequence[StepCallback] = ()) -> Path:
    """Fit and evaluate; returns the run folder. `train=False` (tailclip eval) refuses methods with
    trainable parameters, whose untrained evaluation would be meaningless, but still runs post-hoc fitting.
    An existing run folder is reused only with `cfg.resume` (same run) or `overwrite` (see RunDir.for_config).
    `callbacks` run after every optimizer step with the global step count."""
    _check_paper_protocol(cfg)
    device = resolve_device(cfg.device)
    distributed.init_distributed(device)
    run_dir = RunDir.for_config(cfg, overwrite=overwrite)
    fresh = not overwrite and cfg.resume is None  # (for_config refuses a used folder without either)
    try:
        _run_in(run_dir, cfg, device, train, callbacks)
    except RefusedRun:
        if fresh and distributed.is_main_process():  # a refused command leaves nothing behind
            run_dir.remove("a refused run")
        raise
    return run_dir.path


class RefusedRun(TailclipError):
    """A run refused once its method is built (e.g. `tailclip eval` of a method that trains)."""


def _run_in(run_dir: RunDir, cfg: RunConfig, device: torch.device, train: bool,
            callbacks: Sequence[StepCallback]) -> None:
    with run_dir, _marked(run_dir):
        run_dir.write_config(cfg)
        log.info("run folder %s", run_dir.path)
        task, method = build(cfg, device)
        if not train and method.num_trainable() > 0:
            raise RefusedRun(
                f"method {cfg.method!r} has {method.num_trainable()} trainable parameters: train it with "
                "`tailclip train`, or evaluate a trained run with `tailclip eval --checkpoint RUN_DIR`"
            )
        log.info("method %s: %d trainable parameters", cfg.method, method.num_trainable())
        if "shot_indices" in task.meta and distributed.is_main_process():
            # the exact K-shot draw, so a run can be re-created with data.apply_shots(..., indices=...)
            write_json(run_dir.path / SHOT_INDICES, task.meta["shot_indices"])
        fitted = fit(method, FitContext(cfg, task.guarded(), run_dir.path, device), callbacks)
        ctx = FitContext(cfg, task, run_dir.path, device)
        if method.num_trainable() > 0:
            save_checkpoint(method, ctx)
        run_dir.write_results(evaluate(method, ctx, fitted))
        _plots(cfg, run_dir.path)
        distributed.barrier()  # under torchrun every rank returns only once rank 0 has written results.json


def _check_paper_protocol(cfg: RunConfig) -> None:
    """train.select_on=paper names a method's released test-set protocol: refused, before any folder or feature is
    written, for a method that declares none (it would otherwise be ignored or fail late)."""
    if cfg.train.select_on == "paper" and not METHODS.get(cfg.method).paper_protocol:
        with_one = sorted(name for name in METHODS if METHODS.get(name).paper_protocol)
        raise ConfigError(f"train.select_on=paper: method {cfg.method!r} declares no paper protocol (methods with "
                          f"one: {', '.join(with_one)}); use val or none")


@contextmanager
def _marked(run_dir: RunDir) -> Iterator[None]:
    """status.json: running while the body runs, then finished, or failed naming the error (re-raised)."""
    run_dir.mark("running")
    try:
        yield
    except BaseException as exc:
        run_dir.mark("failed", exc)
        log.info("run %s failed: %s", run_dir.path, exc)  # (the CLI prints the error itself)
        raise
    run_dir.mark("finished")


def _plots(cfg: RunConfig, path: Path) -> None:
    """Per-run plots (RUN_DIR/plots) on the main process; they never fail a finished run."""
    if cfg.eval.plots and distributed.is_main_process():
        report.write_run_plots(path)


def run_from_checkpoint(run_dir: Path, overrides: list[str] | None = None) -> Path:
    """`tailclip eval --checkpoint RUN_DIR`: evaluate a trained run again (e.g. with eval.tte=five_crop);
    results go to RUN_DIR/evals/<timestamp> unless output_dir/run_name are overridden."""
    run_dir = Path(run_dir)
    defaults = [f"output_dir={run_dir / EVALS}", f"run_name=eval-{time.strftime('%Y%m%d-%H%M%S')}"]
    trained = load_trained(run_dir, defaults + list(overrides or []))
    cfg, task = trained.cfg, trained.task
    assert task is not None
    out = RunDir.for_config(cfg)
    with out, _marked(out):
        out.write_config(cfg)
        out.write_results(evaluate(trained.method, FitContext(cfg, task, out.path, trained.device)))
        _plots(cfg, out.path)
    return out.path


@torch.no_grad()
def predict_files(run_dir: Path, paths: list[Path], topk: int = 5) -> list[dict[str, Any]]:
    """Top-k classes with probabilities for image files, using a trained run folder (its dataset is not
    needed). A file that cannot be read gives a row {"image", "error"}; the other files are still predicted."""
    from .data.base import FileImages
    from .data.transforms import eval_transform

    trained = load_trained(Path(run_dir), [f"output_dir={Path(run_dir) / 'predict'}"], need_task=False)
    classnames, method, device = trained.classnames, trained.method, trained.device
    transform = eval_transform(method.backbone.preprocess)
    images = FileImages("", [str(p) for p in paths])
    method.eval()
    rows: list[dict[str, Any]] = []
    for i, path in enumerate(paths):
        try:
            x = transform(images.load(i)).unsqueeze(0).to(device)
        except DataError as exc:
            log.error("%s", exc)
            rows.append({"image": str(path), "error": str(exc)})
            continue
        logits = method(x).logits.float()
        if not torch.isfinite(logits).all():
            raise FloatingPointError(f"{path}: the model of {run_dir} gives NaN or inf logits; no probabilities "
                                     "to print")
        probs = logits.softmax(dim=-1)[0]
        top = probs.topk(min(topk, probs.numel()))
        rows.append({
            "image": str(path),
            "predictions": [{"class": classnames[j], "index": int(j), "prob": float(p)}
                            for p, j in zip(top.values.tolist(), top.indices.tolist())],
        })
    return rows


def param_report(method: Method) -> str:
    """Trainable-parameter counts by top-level module, then the total (for `--print-params`)."""
    by_module: dict[str, int] = {}
    for name, p in method.trainable_parameters():
        key = ".".join(name.split(".")[:2]) if name.startswith("backbone.") else name.split(".")[0]
        by_module[key] = by_module.get(key, 0) + p.numel()
    total_backbone = sum(p.numel() for p in method.backbone.parameters())
    lines = [f"{k:<40} {v:>12,}" for k, v in sorted(by_module.items())]
    lines.append(f"{'trainable total':<40} {method.num_trainable():>12,}")
    lines.append(f"{'backbone (frozen unless listed)':<40} {total_backbone:>12,}")
    return "\n".join(lines)

