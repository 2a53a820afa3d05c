"""Metrics on hand-built predictions: top-1, group accuracies, per-class, ECE and NLL."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tailclip.engine.metrics import classification_metrics, expected_calibration_error


def test_accuracies_on_known_predictions() -> None:
    # 3 classes; class 0 many (200 train), class 1 medium (50), class 2 few (5).
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    preds = torch.tensor([0, 0, 1, 0, 0, 0])  # class 0: 2/2, class 1: 1/2, class 2: 0/2
    logits = torch.nn.functional.one_hot(preds, 3).float() * 5
    m = classification_metrics(logits, labels, np.array([200, 50, 5]))
    assert m["top1"] == pytest.approx(50.0)
    assert (m["many"], m["medium"], m["few"]) == (pytest.approx(100.0), pytest.approx(50.0), pytest.approx(0.0))
    assert m["per_class_top1"] == [pytest.approx(100.0), pytest.approx(50.0), pytest.approx(0.0)]
    assert m["top5"] == pytest.approx(100.0)
    expected_nll = float(torch.nn.functional.cross_entropy(logits, labels))
    assert m["nll"] == pytest.approx(expected_nll)


def test_ece_zero_when_confidence_equals_accuracy() -> None:
    # Confidence 0.75 everywhere and 3 of 4 correct: perfectly calibrated.
    probs = torch.tensor([[0.75, 0.25]] * 4)
    labels = torch.tensor([0, 0, 0, 1])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-6)
    # Always confident (0.99) but half wrong: ECE = 0.49.
    probs = torch.tensor([[0.99, 0.01]] * 4)
    assert expected_calibration_error(probs, torch.tensor([0, 0, 1, 1])) == pytest.approx(0.49, abs=1e-5)


def test_nan_logits_are_refused() -> None:
    with pytest.raises(FloatingPointError, match="NaN"):
        classification_metrics(torch.tensor([[math.nan, 0.0]]), torch.tensor([0]))
