"""Method registry. Explicit imports below fill it; `tailclip list methods` prints it."""

# One import per method module (each registers itself).
from . import candle, coop, gla, ldc, lift, linear_probe, sage, tip_adapter, zeroshot  # noqa: F401
from .base import METHODS, FitContext, Method, Output, Predictions, register_method


def get_method(name: str) -> type[Method]:
    return METHODS.get(name)


__all__ = ["METHODS", "FitContext", "Method", "Output", "Predictions", "get_method", "register_method"]
