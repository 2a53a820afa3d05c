"""Checkpoints hold only what a method trained (safetensors) plus a JSON naming the backbone, its
preprocessing and the method config; the frozen CLIP is rebuilt from its own weights on load.

`checkpoint.json` also holds what the method was built from (`task`: the TaskInfo — class names, templates,
counts, class partition), the model name and the backbone's fingerprint, so `predict` rebuilds the method
from the run folder alone (the dataset may have moved); text classifiers are recomputed from the same names,
templates and (fingerprint-checked) backbone. A damaged or foreign checkpoint file is refused with one line
naming the file and what is wrong, before any tensor reaches the method.

A separate *resume state* (`resume.pt`: trainable tensors, optimizer, scaler, epoch/step, RNG states, running
epoch totals, metrics history, best-so-far) lets `--resume auto` continue a killed run exactly. Every file is
written to a temp name and renamed, so a SIGKILL at any moment leaves the previous complete version."""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import random
import struct
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..config import config_to_dict, key_differences
from ..contract import FitContext, Method
from ..errors import TailclipError
from ..io import atomic_save_tensors, atomic_write, atomic_write_text, file_checksum
from ..runfiles import META, RESUME, WEIGHTS
from ..runtime import distributed

if TYPE_CHECKING:
    from ..config import RunConfig
    from ..data.base import TaskInfo

log = logging.getLogger(__name__)

RESUME_VERSION = 2  # 2: epoch totals carry Output.extras; best carries the chosen head


def save_checkpoint(method: Method, ctx: FitContext) -> Path:
    """Atomically write the method's trainable state and its description into the run folder (rank 0 only)."""
    path = ctx.run_dir / WEIGHTS
    state = method.checkpoint_state()
    if not distributed.is_main_process():
        return path
    atomic_save_tensors(path, state)
    checksum = file_checksum(path)
    info = ctx.task.info()
    meta = {
        "method": ctx.cfg.method,
        "method_config": config_to_dict(ctx.cfg.method_config()) if ctx.cfg.method_config() is not None else None,
        "model": ctx.cfg.model.name,
        "backbone": method.backbone.spec,
        "backbone_fingerprint": method.backbone.fingerprint,
        "preprocess": method.backbone.preprocess.to_dict(),
        "num_classes": method.num_classes,
        "classnames": ctx.task.classnames,
        "task": {"name": info.name, "classnames": list(info.classnames), "templates": list(info.templates),
                 "class_counts": [int(c) for c in info.class_counts], "split_names": list(info.split_names),
                 "shots": info.shots, "base_classes": info.base_classes, "new_classes": info.new_classes},
        "trainable_params": method.num_trainable(),
        "active_head": method.active_head,  # the head selection chose (methods with eval_heads), else null
        "balances_prior": method.balances_prior(),  # its loss removed the train label prior (GLA source_prior=auto)
        "tensors": {k: list(v.shape) for k, v in state.items()},
        "weights_checksum": checksum,  # blake2b of checkpoint.safetensors: scrambled bytes are refused on load
    }
    atomic_write_text(ctx.run_dir / META, json.dumps(meta, indent=2) + "\n")
    return path


def read_meta(run_dir: Path) -> dict[str, Any]:
    """checkpoint.json of a run folder ({} when absent: runs saved before it existed); a damaged one is
    refused naming the file."""
    path = Path(run_dir) / META
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TailclipError(f"checkpoint description {path} is damaged: not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise TailclipError(f"checkpoint description {path} is damaged: expected a JSON object")
    return meta


def task_info(meta: dict[str, Any], path: Path) -> TaskInfo | None:
    """The TaskInfo a checkpoint's method was built from, or None for checkpoints saved before it was stored."""
    from ..data.base import TaskInfo

    t = meta.get("task")
    if t is None:
        return None
    try:
        return TaskInfo(name=str(t["name"]), classnames=[str(c) for c in t["classnames"]],
                        templates=[str(x) for x in t["templates"]],
                        class_counts=np.asarray(t["class_counts"], dtype=np.int64),
                        split_names=tuple(t["split_names"]), shots=t.get("shots"),
                        base_classes=t.get("base_classes"), new_classes=t.get("new_classes"))
    except (KeyError, TypeError, ValueError) as exc:
        raise TailclipError(f"checkpoint description {path} is damaged: its 'task' entry is incomplete "
                            f"({type(exc).__name__}: {exc})") from None


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, or one line naming the file and what is wrong with it: truncated,
    not a safetensors file, or unreadable."""
    path = Path(path)
    what = f"checkpoint {path} is damaged"
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise TailclipError(f"{what}: truncated ({size} bytes, not even a safetensors header)")
        (n,) = struct.unpack("<Q", head)
        if n > 100_000_000:
            raise TailclipError(f"{what}: not a safetensors file (no valid header)")
        if 8 + n > size:
            raise TailclipError(f"{what}: truncated (the header alone needs {8 + n} bytes, the file has {size})")
        try:
            header = json.loads(fh.read(n))
            ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError,
                IndexError):
            raise TailclipError(f"{what}: not a safetensors file (its header is not valid)") from None
    need = 8 + n + max(ends, default=0)
    if need > size:
        raise TailclipError(f"{what}: truncated (its tensors need {need} bytes, the file has {size})")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise TailclipError(f"{what}: unreadable safetensors file ({exc})") from None


def _check_fits(method: Method, state: dict[str, torch.Tensor], path: Path) -> None:
    """Names and shapes of the file against what this method stores: one line instead of a size-mismatch trace."""
    want = {k: tuple(v.shape) for k, v in method.checkpoint_state().items()}
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    wrong = [f"{k} is {tuple(state[k].shape)} in the file, {want[k]} here" for k in sorted(set(want) & set(state))
             if tuple(state[k].shape) != want[k]]
    if missing or unexpected or wrong:
        parts = ([f"missing {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else "")] if missing else []) + \
                ([f"unexpected {', '.join(unexpected[:5])}" + (" ..." if len(unexpected) > 5 else "")]
                 if unexpected else []) + wrong[:3]
        raise TailclipError(f"checkpoint {path}: its tensors do not fit method {method.name!r} as configured "
                            f"({'; '.join(parts)})")


def load_checkpoint(method: Method, run_dir: Path) -> None:
    """Trainable tensors into `method`, and the head selection chose, so a reload predicts exactly as the run."""
    path = Path(run_dir) / WEIGHTS
    if not path.is_file():
        raise TailclipError(f"no checkpoint in {run_dir}: {path} is missing (was the run finished?)")
    meta = read_meta(run_dir)
    state = read_weights(path)
    _check_fits(method, state, path)
    want = meta.get("weights_checksum")
    if want and file_checksum(path) != want:  # bytes scrambled inside a file that still parses and fits
        raise TailclipError(f"checkpoint {path} is damaged: its bytes do not match the checksum in {META} (the file "
                            "changed after the run wrote it); train the run again")
    method.load_checkpoint_state(state)
    head = meta.get("active_head")
    if head is not None:
        method.use_head(head)


# ------------------------------------------------------------------------------------------------------
# resume state
# ------------------------------------------------------------------------------------------------------
def resume_key(cfg: RunConfig) -> dict[str, Any]:
    """Everything that changes the result of training, flattened to "section.key" entries: bookkeeping keys
    (TensorBoard, resume frequency, workers, device, eval options) are left out, and data.root is the resolved
    absolute folder, so `--root data` and the same folder's absolute path are one run."""
    d = config_to_dict(cfg)
    train = {k: v for k, v in d["train"].items() if k not in ("tensorboard", "resume_every_steps",
                                                               "resume_every_minutes")}
    data = {k: v for k, v in d["data"].items() if k != "num_workers"}
    if data.get("root"):
        data["root"] = str(Path(data["root"]).expanduser().resolve())
    key = {"method": d["method"], "model": d["model"]["name"]}
    key.update({f"{cfg.method}.{k}": v for k, v in (d.get(cfg.method.replace("-", "_")) or {}).items()})
    key.update({f"data.{k}": v for k, v in data.items()})
    key.update({f"train.{k}": v for k, v in train.items()})
    return key


def resume_fingerprint(cfg: RunConfig) -> str:
    """Hash of `resume_key`; a resume state only continues the same run."""
    return hashlib.sha256(json.dumps(resume_key(cfg), sort_keys=True, default=str).encode()).hexdigest()[:16]


def resume_differences(theirs: RunConfig, mine: RunConfig) -> list[str]:
    """"key: theirs -> mine" for every entry of `resume_key` in which two configurations differ."""
    return key_differences(resume_key(theirs), resume_key(mine))


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
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, KeyError, AttributeError, TypeError,
            IndexError, UnicodeDecodeError, zipfile.BadZipFile) as exc:  # a truncated or scrambled torch.save file
        raise TailclipError(f"{path}: the resume state is damaged ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else 'unreadable'}); delete it to start the "
                            "run again, or --overwrite") from None
    if not isinstance(state, dict):
        raise TailclipError(f"{path}: the resume state is damaged (not a dict)")
    if state.get("version") != RESUME_VERSION:
        raise TailclipError(f"{path}: resume state version {state.get('version')} is not {RESUME_VERSION}")
    if state.get("fingerprint") != fingerprint:
        raise TailclipError(
            f"{path} belongs to a run with a different configuration (method, model, data or train options "
            "changed); resume only continues the same run, or start a new run folder"
        )
    return state
