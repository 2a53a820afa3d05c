"""What the CLIP-classifier methods share, in one place: the logit scale, the prompt-ensemble text classifier kept
as the buffer `text_weights`, and its cosine logits `scale · normalize(f) @ W^T`."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..backbones.base import Backbone
from ..contract import Method
from ..data.base import TaskInfo


def logit_scale(option: float | None, backbone: Backbone) -> float:
    """A method's `logit_scale` option, or the model's own when unset (100 for OpenAI CLIP)."""
    return float(option) if option is not None else float(backbone.logit_scale)


def class_text_weights(backbone: Backbone, info: TaskInfo) -> Tensor:
    """(C, D) float32 prompt-ensemble classifier of the task's class names and templates (rows L2-normalised)."""
    return backbone.text_classifier(info.classnames, info.templates).float()


def cosine_logits(feats: Tensor, weights: Tensor, scale: float) -> Tensor:
    """scale · cos(f, w_c): image features (B, D) against classifier rows (C, D) that are already unit length."""
    return scale * F.normalize(feats.float(), dim=-1) @ weights.t()


class TextClassifierMethod(Method):
    """Base of the methods that keep zero-shot CLIP's classifier (zero-shot, GLA, Tip-Adapter, LDC): `scale` and
    the `text_weights` buffer (saved with checkpoints under that name)."""

    scale: float
    text_weights: Tensor

    def init_text_classifier(self, backbone: Backbone, info: TaskInfo, scale_option: float | None) -> None:
        self.scale = logit_scale(scale_option, backbone)
        self.register_buffer("text_weights", class_text_weights(backbone, info))

    def zeroshot_logits(self, proj: Tensor) -> Tensor:
        """Zero-shot CLIP's logits of (projected) image features."""
        return cosine_logits(proj, self.text_weights, self.scale)
