"""A self-contained zero-shot evaluator on plain open_clip calls (encode_image / encode_text).

It exists so the shipped weights can be measured and re-checked without the rest of tailclip (backbones,
engine), which is how the recorded metrics in `tiny-clip.meta.json` are produced and tested.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

# open_clip's default (OpenAI) normalisation: the shipped config keeps it, so any loader's preprocessing matches.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> normalised float (N, 3, H, W), exactly what ToTensor + Normalize would give."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def text_classifier(model: nn.Module, tokenizer, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """(C, D) prompt-ensemble class embeddings: mean of normalised template embeddings, re-normalised."""
    weights = []
    for name in classnames:
        tokens = tokenizer([t.format(name) for t in templates])
        emb = model.encode_text(tokens)
        emb = emb / emb.norm(dim=-1, keepdim=True)
        mean = emb.mean(0)
        weights.append(mean / mean.norm())
    return torch.stack(weights)


@torch.no_grad()
def zero_shot_logits(model: nn.Module, tokenizer, images: np.ndarray, classnames: Sequence[str],
                     templates: Sequence[str], batch_size: int = 500) -> torch.Tensor:
    """Cosine-similarity logits (N, C) of uint8 images against the prompt-ensemble classifier."""
    was_training = model.training
    model.eval()
    w = text_classifier(model, tokenizer, classnames, templates)
    out = []
    for lo in range(0, len(images), batch_size):
        f = model.encode_image(images_to_tensor(images[lo:lo + batch_size]))
        out.append((f / f.norm(dim=-1, keepdim=True)) @ w.T)
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, len(classnames))


def evaluate_zero_shot(model: nn.Module, tokenizer, images: np.ndarray, labels: np.ndarray,
                       classnames: Sequence[str], templates: Sequence[str],
                       batch_size: int = 500) -> dict[str, object]:
    """Top-1 accuracy overall and per class (classes without test images get NaN)."""
    labels = np.asarray(labels, np.int64)
    logits = zero_shot_logits(model, tokenizer, images, classnames, templates, batch_size)
    pred = logits.argmax(1).numpy()
    correct = pred == labels
    num_classes = len(classnames)
    totals = np.bincount(labels, minlength=num_classes)
    hits = np.bincount(labels, weights=correct, minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = hits / totals
    return {
        "top1": float(correct.mean()) if len(labels) else float("nan"),
        "correct": int(correct.sum()),
        "n": len(labels),
        "per_class": per_class,
        "pred_counts": np.bincount(pred, minlength=num_classes),
    }
