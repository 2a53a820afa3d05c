"""Explicit imports that fill the dataset registry (timm style: reading this file lists every dataset module)."""

from ..synthetic import tasks as synthetic_tasks  # noqa: F401  (synth-lt, synth-fewshot, synth-b2n, synth-b2n-lt)
from . import base2new, cifar, coop, imagenet, lt, user  # noqa: F401
