"""Building a method for a run config, and rebuilding a trained run's method from its folder. Lives with the
methods (not the orchestrator) because ensembles such as GLA rebuild another run's model while fitting."""

from __future__ import annotations

from pathlib import Path

import torch

from ..backbones import create_backbone
from ..config import RunConfig, load_config
from ..data.base import Task
from ..data.registry import build_task
from ..engine.checkpoint import load_checkpoint
from ..engine.evaluate import resolve_device
from ..errors import TailclipError
from .base import METHODS, Method


def build(cfg: RunConfig, device: torch.device) -> tuple[Task, Method]:
    """The task first (data errors are cheaper to find than loading weights), then the backbone and the method."""
    torch.manual_seed(cfg.train.seed)
    task = build_task(cfg.data)
    backbone = create_backbone(cfg.model.name, cache_dir=cfg.model.cache_dir, device=device,
                               memory_format=cfg.model.memory_format)
    method = METHODS.get(cfg.method)(cfg.method_config(), backbone, task.info()).to(device)
    return task, method


def load_trained(run_dir: Path, overrides: list[str] | None = None) -> tuple[RunConfig, Task, Method, torch.device]:
    """Rebuild a trained run's method from its config.yaml and checkpoint (trainable parameters only)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise TailclipError(f"{run_dir} is not a run folder (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml", list(overrides or []))
    device = resolve_device(cfg.device)
    task, method = build(cfg, device)
    if not method.stateless:  # (zero-shot CLIP is rebuilt whole from its config)
        load_checkpoint(method, run_dir)
    return cfg, task, method, device
