"""Fitting a method: the engine calls its hooks in order, so no method ever calls the trainer."""

from __future__ import annotations

from collections.abc import Sequence

from ..contract import FitContext, FitResult, Method
from .trainer import StepCallback, train


def fit(method: Method, ctx: FitContext, callbacks: Sequence[StepCallback] = ()) -> FitResult:
    """prepare → the trainer when the method trains (`Method.trains`) → finish; returns what was trained and
    chosen. `callbacks` run after every optimizer step."""
    method.prepare(ctx)
    result = train(method, ctx, callbacks) if method.trains() else FitResult()
    return method.finish(ctx, result)
