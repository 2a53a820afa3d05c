"""Frozen CLIP backbones behind one contract (`Backbone`): open_clip ViT/ResNet towers and Hugging Face
CLIPModel, with our own ViT forward and named hook points. Build one with `create_backbone(name)`."""

from .base import HOOK_KINDS, Backbone, HookPoints, ImageFeatures, Preprocess
from .factory import NAME_FORMS, create_backbone, list_models

__all__ = [
    "HOOK_KINDS",
    "NAME_FORMS",
    "Backbone",
    "HookPoints",
    "ImageFeatures",
    "Preprocess",
    "create_backbone",
    "list_models",
]
