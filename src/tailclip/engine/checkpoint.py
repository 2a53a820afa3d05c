"""Checkpoints hold only what a method trained (safetensors) plus a JSON naming the backbone, its
preprocessing and the method config; the frozen CLIP is rebuilt from its own weights on load.

A separate *resume state* (`resume.pt`: trainable tensors, optimizer, scaler, epoch/step, RNG states, running
epoch totals, metrics history, best-so-far) lets `--resume auto` continue a killed run exactly. Every file is
written to a temp name and renamed, so a SIGKILL at any moment leaves the previous complete version."""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file

from ..config import config_to_dict
from ..errors import TailclipError
from ..io import atomic_save_tensors, atomic_write, atomic_write_text
from . import distributed

if TYPE_CHECKING:
    from ..config import RunConfig
    from ..methods.base import FitContext, Method

log = logging.getLogger(__name__)

WEIGHTS = "checkpoint.safetensors"
META = "checkpoint.json"
RESUME = "resume.pt"
RESUME_VERSION = 2  # 2: epoch totals carry Output.extras; best carries the chosen head


def save_checkpoint(method: Method, ctx: FitContext) -> Path:
    """Atomically write the method's trainable state and its description into the run folder (rank 0 only)."""
    path = ctx.run_dir / WEIGHTS
    state = method.checkpoint_state()
    if not distributed.is_main_process():
        return path
    atomic_save_tensors(path, state)
    meta = {
        "method": ctx.cfg.method,
        "method_config": config_to_dict(ctx.cfg.method_config()) if ctx.cfg.method_config() is not None else None,
        "backbone": method.backbone.spec,
        "preprocess": method.backbone.preprocess.to_dict(),
        "num_classes": method.num_classes,
        "classnames": ctx.task.classnames,
        "trainable_params": method.num_trainable(),
        "active_head": method.active_head,  # the head selection chose (methods with eval_heads), else null
        "tensors": {k: list(v.shape) for k, v in state.items()},
    }
    atomic_write_text(ctx.run_dir / META, json.dumps(meta, indent=2) + "\n")
    return path


def load_checkpoint(method: Method, run_dir: Path) -> None:
    """Trainable tensors into `method`, and the head selection chose, so a reload predicts exactly as the run."""
    path = Path(run_dir) / WEIGHTS
    if not path.is_file():
        raise TailclipError(f"no checkpoint in {run_dir}: {path} is missing (was the run finished?)")
    method.load_checkpoint_state(load_file(str(path)))
    meta_path = Path(run_dir) / META
    head = json.loads(meta_path.read_text()).get("active_head") if meta_path.is_file() else None
    if head is not None:
        method.use_head(head)


# ------------------------------------------------------------------------------------------------------
# resume state
# ------------------------------------------------------------------------------------------------------
def resume_fingerprint(cfg: RunConfig) -> str:
    """Hash of everything that changes the result of training; a resume state only continues the same run.
    Bookkeeping keys (TensorBoard, resume frequency, workers, device, eval options) are left out."""
    d = config_to_dict(cfg)
    train = {k: v for k, v in d["train"].items() if k not in ("tensorboard", "resume_every_steps",
                                                               "resume_every_minutes")}
    data = {k: v for k, v in d["data"].items() if k != "num_workers"}
    key = {"method": d["method"], "method_config": d.get(cfg.method.replace("-", "_")), "model": d["model"]["name"],
           "data": data, "train": train}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may touch, as tensors/ints so the file loads with weights_only=True."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_resume_state(run_dir: Path, state: dict[str, Any]) -> Path:
    """Atomically write `resume.pt` (rank 0 only; every rank holds the same replicated state under DDP)."""
    path = Path(run_dir) / RESUME
    if distributed.is_main_process():
        atomic_write(path, lambda tmp: torch.save({"version": RESUME_VERSION, **state}, tmp))
    return path


def find_resume_state(resume: str | None, run_dir: Path) -> Path | None:
    """`auto`: this run folder's resume.pt if present (else a fresh start); a path: that run folder or file."""
    if resume is None:
        return None
    if resume == "auto":
        path = Path(run_dir) / RESUME
        if not path.is_file():
            log.info("resume=auto: no resume state in %s, starting from scratch", run_dir)
            return None
        return path
    path = Path(resume)
    path = path / RESUME if path.is_dir() else path
    if not path.is_file():
        raise TailclipError(f"resume={resume!r}: no resume state at {path}")
    return path


def load_resume_state(path: Path, fingerprint: str) -> dict[str, Any]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("version") != RESUME_VERSION:
        raise TailclipError(f"{path}: resume state version {state.get('version')} is not {RESUME_VERSION}")
    if state.get("fingerprint") != fingerprint:
        raise TailclipError(
            f"{path} belongs to a run with a different configuration (method, model, data or train options "
            "changed); resume only continues the same run, or start a new run folder"
        )
    return state
