"""Checkpoints hold only what a method trained (safetensors) plus a JSON naming the backbone, its
preprocessing and the method config; the frozen CLIP is rebuilt from its own weights on load."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors.torch import load_file, save_file

from ..config import config_to_dict
from ..errors import TailclipError
from .runs import atomic_write_text

if TYPE_CHECKING:
    from ..methods.base import FitContext, Method

WEIGHTS = "checkpoint.safetensors"
META = "checkpoint.json"


def save_checkpoint(method: Method, ctx: FitContext) -> Path:
    """Atomically write the method's trainable state and its description into the run folder."""
    path = ctx.run_dir / WEIGHTS
    fd, tmp = tempfile.mkstemp(dir=ctx.run_dir, prefix=f".{WEIGHTS}.")
    os.close(fd)
    try:
        save_file(method.checkpoint_state(), tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    meta = {
        "method": ctx.cfg.method,
        "method_config": config_to_dict(ctx.cfg.method_config()) if ctx.cfg.method_config() is not None else None,
        "backbone": method.backbone.spec,
        "preprocess": method.backbone.preprocess.to_dict(),
        "num_classes": method.num_classes,
        "classnames": ctx.task.classnames,
        "trainable_params": method.num_trainable(),
    }
    atomic_write_text(ctx.run_dir / META, json.dumps(meta, indent=2) + "\n")
    return path


def load_checkpoint(method: Method, run_dir: Path) -> None:
    path = Path(run_dir) / WEIGHTS
    if not path.is_file():
        raise TailclipError(f"no checkpoint in {run_dir}: {path} is missing (was the run finished?)")
    method.load_checkpoint_state(load_file(str(path)))
