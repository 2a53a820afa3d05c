"""Datasets as Tasks (class names + templates + splits), K-shot sampling, grouping, transforms, verification.

`build_task(DataConfig(name=..., root=...))` builds any registered dataset; `tailclip list datasets` lists them.
"""

from .base import (
    ArrayImages,
    FileImages,
    ImageSource,
    LabeledImages,
    Split,
    SubsetImages,
    Task,
    collate_skip_none,
)
from .fewshot import FEWSHOT_VAL_MAX, apply_shots, sample_k_shot, seeded_order
from .groups import GROUP_NAMES, group_masks, many_medium_few
from .registry import DATASETS, build_task, register_dataset
from .templates import TEMPLATE_SETS, get_templates, resolve_templates
from .transforms import eval_transform, train_transform, tte_transform
from .verify import verify_dataset


def list_datasets() -> list[tuple[str, str]]:
    """(name, one-line description) of every registered dataset, sorted by name."""
    from . import load_all  # noqa: F401

    return [(name, (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else "") for name, fn in DATASETS.items()]


__all__ = [
    "DATASETS",
    "FEWSHOT_VAL_MAX",
    "GROUP_NAMES",
    "TEMPLATE_SETS",
    "ArrayImages",
    "FileImages",
    "ImageSource",
    "LabeledImages",
    "Split",
    "SubsetImages",
    "Task",
    "apply_shots",
    "build_task",
    "collate_skip_none",
    "eval_transform",
    "get_templates",
    "group_masks",
    "list_datasets",
    "many_medium_few",
    "register_dataset",
    "resolve_templates",
    "sample_k_shot",
    "seeded_order",
    "train_transform",
    "tte_transform",
    "verify_dataset",
]
