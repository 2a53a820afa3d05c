"""Building a method for a run config, and the one way to rebuild a trained run's method from its folder. Lives
with the methods (not the orchestrator) because ensembles such as GLA rebuild another run's model while fitting."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..backbones import create_backbone
from ..backbones.base import Backbone
from ..config import RunConfig, load_config
from ..contract import METHODS, Method
from ..data.base import Task, TaskInfo
from ..data.registry import build_task
from ..engine.checkpoint import load_checkpoint, read_meta, task_info
from ..errors import TailclipError
from ..runfiles import CONFIG, META
from ..runtime import resolve_device


def build_method(cfg: RunConfig, backbone: Backbone, info: TaskInfo) -> Method:
    """The configured method on `backbone` for a task described by `info` (untrained)."""
    return METHODS.get(cfg.method)(cfg.method_config(), backbone, info)


def build_backbone(cfg: RunConfig, device: torch.device) -> Backbone:
    """The run's backbone (callers seed first, as a run does: random-weight test models are then the same)."""
    return create_backbone(cfg.model.name, cache_dir=cfg.model.cache_dir, device=device,
                           memory_format=cfg.model.memory_format)


def build(cfg: RunConfig, device: torch.device) -> tuple[Task, Method]:
    """The task first (data errors are cheaper to find than loading weights), then the backbone and the method."""
    torch.manual_seed(cfg.train.seed)
    task = build_task(cfg.data)
    return task, build_method(cfg, build_backbone(cfg, device), task.info()).to(device)


@dataclass
class TrainedRun:
    """A trained run rebuilt from its folder: its config, the task (None when rebuilt without the dataset), the
    method with its trained state, the device, and the class names."""

    cfg: RunConfig
    task: Task | None
    method: Method
    device: torch.device
    classnames: list[str]


def load_trained(run_dir: Path, overrides: list[str] | None = None, need_task: bool = True) -> TrainedRun:
    """Rebuild a trained run's method from its config.yaml and checkpoint (trainable parameters only). With
    `need_task=False` the method is built from the TaskInfo stored in checkpoint.json, so the dataset may have
    moved or be gone (`tailclip predict`); runs saved before the TaskInfo was stored are rebuilt through their
    dataset. The backbone must still load the weights the run was trained on (fingerprint)."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).is_file():
        raise TailclipError(f"{run_dir} is not a run folder (no {CONFIG})")
    cfg = load_config(run_dir / CONFIG, list(overrides or []))
    device = resolve_device(cfg.device)
    meta = read_meta(run_dir)
    info = None if need_task else task_info(meta, run_dir / META)
    if info is None:
        task, method = build(cfg, device)
        info = task.info()
    else:
        torch.manual_seed(cfg.train.seed)
        task, method = None, build_method(cfg, build_backbone(cfg, device), info).to(device)
    want = meta.get("backbone_fingerprint")
    if want and method.backbone.fingerprint != want:
        raise TailclipError(f"{run_dir / META}: the run was trained on backbone {cfg.model.name} with fingerprint "
                            f"{want}, but {cfg.model.name} now loads weights with fingerprint "
                            f"{method.backbone.fingerprint}")
    if not method.stateless:  # (zero-shot CLIP is rebuilt whole from its config)
        load_checkpoint(method, run_dir)
    return TrainedRun(cfg, task, method, device, list(info.classnames))
