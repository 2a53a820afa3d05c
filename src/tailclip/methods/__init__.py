"""The registered methods; importing this package (done by `import tailclip`) registers each one. The contract
they implement is `tailclip.contract`; `tailclip list methods` prints the registry."""

# One import per method module (each registers itself).
from ..contract import METHODS, FitContext, Method, Output, Predictions, register_method
from . import candle, coop, gla, ldc, lift, linear_probe, sage, tip_adapter, zeroshot  # noqa: F401


def get_method(name: str) -> type[Method]:
    return METHODS.get(name)


__all__ = ["METHODS", "FitContext", "Method", "Output", "Predictions", "get_method", "register_method"]
