"""Tuners: parameter-efficient modules living inside a frozen backbone via its hook points.

`build_tuner(name, backbone, options, num_classes=C)` -> an attached Tuner; `options` is an instance of the
tuner's `Options` dataclass (None: defaults). Keep the tuner as an attribute of the method so its parameters
train and are checkpointed. `TUNERS` is the one list of tuners (LIFT's table rows: adaptformer, adapter, lora,
vpt_deep, vpt_shallow, full, bitfit, ln, classifier; and Sage's sg_adapter)."""

from . import adapters, lora, partial, sg_adapter, vpt  # noqa: F401  (each registers its tuners)
from .adapters import Adapter, AdapterOptions, AdaptFormer, AdaptFormerOptions, Bottleneck
from .base import (
    TUNERS,
    NoOptions,
    Tuner,
    auto_bottleneck,
    build_tuner,
    register_tuner,
    resolve_bottleneck,
)
from .lora import LoRA, LoRAOptions
from .partial import BitFit, ClassifierOnly, FullFineTune, LayerNormTuning
from .sg_adapter import SGAdapter, SGAdapterOptions, SGBranch
from .vpt import VPTDeep, VPTOptions, VPTShallow

__all__ = [
    "TUNERS", "AdaptFormer", "AdaptFormerOptions", "Adapter", "AdapterOptions", "BitFit", "Bottleneck",
    "ClassifierOnly", "FullFineTune", "LayerNormTuning", "LoRA", "LoRAOptions", "NoOptions", "SGAdapter",
    "SGAdapterOptions", "SGBranch", "Tuner", "VPTDeep",
    "VPTOptions", "VPTShallow", "auto_bottleneck", "build_tuner", "register_tuner", "resolve_bottleneck",
]
