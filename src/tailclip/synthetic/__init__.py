"""The built-in SYNTHETIC world: procedural shape images with captions, a tiny CLIP pretrained on them with a
skewed label prior (shipped in `weights/`), and long-tailed / few-shot / base-to-new tasks.

It lets every method run offline within minutes and is what the tests and the demo use; it never stands in
for the real benchmarks. Regenerate the weights with `python -m tailclip.synthetic.pretrain --out DIR --seed 0`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..errors import WeightsNotFoundError
from .generator import CLASSNAMES, SyntheticImages, render_images
from .zeroshot import evaluate_zero_shot

log = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).parent / "weights"
MODELS = ("tiny-clip",)

__all__ = ["CLASSNAMES", "MODELS", "SyntheticImages", "evaluate_zero_shot", "model_files", "model_meta",
           "render_images"]


def model_files(name: str = "tiny-clip") -> tuple[Path, Path]:
    """(open_clip model-config JSON, safetensors weights) of a shipped synthetic model, e.g. "tiny-clip"."""
    if name not in MODELS:
        from ..errors import UnknownNameError

        raise UnknownNameError(f"unknown synthetic model {name!r}; known: {', '.join(MODELS)}")
    cfg, weights = WEIGHTS_DIR / f"{name}.json", WEIGHTS_DIR / f"{name}.safetensors"
    for path in (cfg, weights):
        if not path.is_file():
            raise WeightsNotFoundError(
                f"synthetic model file missing: {path}; regenerate it with "
                f"`python -m tailclip.synthetic.pretrain --out {WEIGHTS_DIR} --seed 0`"
            )
    return cfg, weights


def model_meta(name: str = "tiny-clip") -> dict[str, Any]:
    """The pretraining record: prior per class, class order, seed, steps, loss, recorded zero-shot metrics."""
    path = WEIGHTS_DIR / f"{name}.meta.json"
    if not path.is_file():
        raise WeightsNotFoundError(f"synthetic model meta missing: {path}")
    return json.loads(path.read_text())
