"""Tuners: parameter-efficient modules living inside a frozen backbone via its hook points.

`build_tuner(name, backbone, bottleneck=None, num_classes=C)` -> an attached Tuner; keep it as an attribute of
the method so its parameters train and are checkpointed. Names: adaptformer, adapter, lora, vpt_deep,
vpt_shallow, full, bitfit, ln, classifier."""

from . import adapters, lora, partial, vpt  # noqa: F401  (each registers its tuners)
from .adapters import AdaptFormer, Bottleneck, SequentialAdapter
from .base import TUNERS, Tuner, auto_bottleneck, build_tuner, register_tuner, vision_named_parameters
from .lora import LoRA
from .partial import BitFit, ClassifierOnly, FullFineTune, LayerNormTuning
from .vpt import VPTDeep, VPTShallow

__all__ = [
    "TUNERS", "AdaptFormer", "BitFit", "Bottleneck", "ClassifierOnly", "FullFineTune", "LayerNormTuning", "LoRA",
    "SequentialAdapter", "Tuner", "VPTDeep", "VPTShallow", "auto_bottleneck", "build_tuner", "register_tuner",
    "vision_named_parameters",
]
