"""Dataset registry: `@register_dataset(name)` on a builder `(cfg: DataConfig) -> Task`."""

from __future__ import annotations

from collections.abc import Callable

from ..config import DataConfig
from ..registry import Registry
from .base import Task

DatasetBuilder = Callable[[DataConfig], Task]
DATASETS: Registry[DatasetBuilder] = Registry("dataset")


def register_dataset(name: str) -> Callable[[DatasetBuilder], DatasetBuilder]:
    """Register a builder; its docstring's first line is what `tailclip list datasets` prints."""
    return DATASETS.register(name)


def build_task(cfg: DataConfig) -> Task:
    """Build the Task a DataConfig names (shots/seed handling is up to the builder or `fewshot.apply_shots`)."""
    from . import load_all  # noqa: F401  (explicit imports fill the registry)
    from .prepare import prepared_record

    task = DATASETS.get(cfg.name)(cfg)
    record = prepared_record(cfg.root)
    if record is not None:  # a `tailclip prepare` copy: results.json says the images were pre-resized
        task.meta["prepared"] = record
    return task
