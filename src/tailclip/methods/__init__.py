"""Method registry. Explicit imports below fill it; `tailclip list methods` prints it."""

from .base import METHODS, FitContext, Method, Output, Predictions, register_method

# One import per method module (each registers itself).
from . import zeroshot  # noqa: E402,F401
from . import lift  # noqa: E402,F401
from . import gla, linear_probe, tip_adapter  # noqa: E402,F401


def get_method(name: str) -> type[Method]:
    return METHODS.get(name)


__all__ = ["METHODS", "FitContext", "Method", "Output", "Predictions", "get_method", "register_method"]
