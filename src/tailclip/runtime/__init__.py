"""Where code runs: the device, mixed precision and the processes of a torchrun job. The bottom layer that the
feature cache and the engine share, so neither has to import the other for it."""

from . import distributed
from .device import autocast, autocast_dtype, iter_batches, resolve_device

__all__ = ["autocast", "autocast_dtype", "distributed", "iter_batches", "resolve_device"]
