"""Fingerprints that identify a backbone's weights + architecture; they key the feature cache, so two runs share
cached features exactly when their encoders compute the same function."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path | str) -> str:
    """sha256 of a weights file. Files in a Hugging Face cache are blobs named by their sha256 (LFS), so those
    cost nothing; others are hashed once per (path, size, mtime) in this process."""
    real = os.path.realpath(path)
    blob = os.path.basename(real)
    if len(blob) == 64 and all(c in "0123456789abcdef" for c in blob) and os.sep + "blobs" + os.sep in real:
        return blob
    st = os.stat(real)
    key = (real, st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(real, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 23), b""):
                h.update(chunk)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def params_sha256(module: nn.Module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes, bytes): identifies random-weight models."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def combined_fingerprint(weights_id: str, model_cfg: Any, impl: str) -> str:
    """Weights alone do not fix the features (e.g. QuickGELU vs GELU with the same file): hash both."""
    payload = json.dumps({"weights": weights_id, "model_cfg": model_cfg, "impl": impl}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


__all__ = ["combined_fingerprint", "file_sha256", "params_sha256"]
