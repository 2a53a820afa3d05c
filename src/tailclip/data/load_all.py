"""Explicit imports that fill the dataset registry (timm style: reading this file lists every dataset module).
`synthetic` holds the built-in world's tasks: synth-lt, synth-fewshot, synth-b2n, synth-b2n-lt, synth-xd."""

from . import base2new, cifar, coop, imagenet, lt, synthetic, user  # noqa: F401
