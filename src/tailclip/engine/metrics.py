"""Metrics every results.json carries: top-1/top-5, many/medium/few, per-class accuracy, ECE and NLL."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..data.groups import GROUP_NAMES, many_medium_few


def expected_calibration_error(probs: Tensor, labels: Tensor, bins: int = 15) -> float:
    """ECE with equal-width confidence bins (Guo et al. 2017)."""
    conf, pred = probs.max(dim=1)
    correct = pred.eq(labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = torch.zeros(())
    for lo, hi in itertools.pairwise(edges):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            ece += in_bin.float().mean() * (conf[in_bin].mean() - correct[in_bin].mean()).abs()
    return float(ece)


def classification_metrics(logits: Tensor, labels: Tensor, group_counts: np.ndarray | None = None) -> dict[str, Any]:
    """Accuracies in percent. Group accuracies pool the test samples of the classes in each group."""
    logits = logits.float()
    if not torch.isfinite(logits).all():
        raise FloatingPointError("logits contain NaN or inf; refusing to report metrics computed from them")
    num_classes = logits.shape[1]
    labels = labels.long()
    preds = logits.argmax(dim=1)
    correct = preds.eq(labels)
    k = min(5, num_classes)
    top5 = logits.topk(k, dim=1).indices.eq(labels[:, None]).any(dim=1)
    per_class_n = torch.bincount(labels, minlength=num_classes)
    per_class_c = torch.bincount(labels[correct], minlength=num_classes)
    per_class = [
        (100.0 * float(c) / float(n)) if n > 0 else None for c, n in zip(per_class_c.tolist(), per_class_n.tolist())
    ]
    probs = logits.softmax(dim=1)
    nll = float(torch.nn.functional.cross_entropy(logits, labels))
    out: dict[str, Any] = {
        "num_samples": int(labels.numel()),
        "top1": 100.0 * float(correct.float().mean()),
        "top5": 100.0 * float(top5.float().mean()),
        "ece": 100.0 * expected_calibration_error(probs, labels),
        "nll": nll if math.isfinite(nll) else None,
        "per_class_top1": per_class,
        "test_counts": per_class_n.tolist(),
    }
    if group_counts is not None:
        groups = torch.as_tensor(many_medium_few(group_counts))
        sample_group = groups[labels]
        for gid, gname in enumerate(GROUP_NAMES):
            mask = sample_group == gid
            out[gname] = 100.0 * float(correct[mask].float().mean()) if mask.any() else None
        out["group_sizes"] = {g: int((groups == i).sum()) for i, g in enumerate(GROUP_NAMES)}
        out["train_counts"] = [int(c) for c in group_counts]
    return out
