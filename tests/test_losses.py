"""Losses and heads: LA on a hand-computed example, balanced softmax, CE; cosine head text initialisation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tailclip.errors import UnknownNameError
from tailclip.heads import CosineClassifier, LinearHead, build_head, map_text_to_pre_proj, text_init_weights
from tailclip.losses import (
    LOSSES,
    BalancedSoftmaxLoss,
    CrossEntropy,
    LogitAdjustedLoss,
    Loss,
    build_loss,
    log_prior,
    loss_balances_prior,
    loss_names,
    register_loss,
)


def test_logit_adjusted_loss_hand_computed() -> None:
    # counts 6/3/1 -> pi = .6/.3/.1; z = (1, 2, 0), y = 0:
    # loss = log(.6 e^1 + .3 e^2 + .1 e^0) - log(.6 e^1)
    expected = math.log(0.6 * math.e + 0.3 * math.e**2 + 0.1) - math.log(0.6 * math.e)
    loss = LogitAdjustedLoss([6, 3, 1], tau=1.0)(torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([0]))
    assert float(loss) == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.883956, abs=1e-6)


def test_la_tau_and_balanced_softmax() -> None:
    z, y = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 3.0]]), torch.tensor([0, 2])
    counts = [6, 3, 1]
    tau2 = LogitAdjustedLoss(counts, tau=2.0)(z, y)
    manual = F.cross_entropy(z + 2.0 * torch.tensor([0.6, 0.3, 0.1]).log(), y)
    assert float(tau2) == pytest.approx(float(manual), abs=1e-6)
    # balanced softmax adds log n_c: a constant shift of log pi, so it equals LA with tau = 1
    assert float(BalancedSoftmaxLoss(counts)(z, y)) == pytest.approx(float(LogitAdjustedLoss(counts)(z, y)), abs=1e-6)
    assert float(CrossEntropy(counts)(z, y)) == pytest.approx(float(F.cross_entropy(z, y)), abs=1e-7)
    assert float(build_loss("la", counts, tau=1.0)(z, y)) == pytest.approx(float(LogitAdjustedLoss(counts)(z, y)))


def test_every_loss_declares_whether_it_balances_the_prior() -> None:
    assert set(loss_names()) >= {"ce", "la", "bs"} and loss_names() == tuple(LOSSES)
    assert {n: loss_balances_prior(n) for n in ("ce", "la", "bs")} == {"ce": False, "la": True, "bs": True}
    for name, cls in LOSSES.items():  # the registry is the one list; every entry says it
        assert isinstance(cls.balances_prior, bool) and isinstance(build_loss(name, [3, 2, 1]), Loss), name
    with pytest.raises(UnknownNameError, match="bs, ce, cf, cla, la"):
        loss_balances_prior("nope")

    class Undeclared(Loss):
        def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(logits, labels)

    with pytest.raises(TypeError, match="balances_prior"):
        register_loss("undeclared")(Undeclared)
    assert "undeclared" not in LOSSES


def test_loss_buffers_are_not_checkpointed_and_zero_counts_are_finite() -> None:
    loss = LogitAdjustedLoss([5, 0, 2])
    assert loss.state_dict() == {}
    assert torch.isfinite(log_prior([5, 0, 2])).all()
    assert torch.isfinite(loss(torch.zeros(1, 3), torch.tensor([1])))


def test_cosine_classifier_scale_and_init() -> None:
    w = torch.randn(5, 16)
    head = CosineClassifier.from_weights(w, scale=25.0)
    f = torch.randn(4, 16)
    logits = head(f)
    torch.testing.assert_close(logits, 25.0 * F.normalize(f, dim=-1) @ F.normalize(w, dim=-1).t())
    assert logits.abs().max() <= 25.0 + 1e-4
    assert not any("bias" in n for n, _ in head.named_parameters())
    linear = LinearHead.from_weights(w)
    assert linear.fc.bias is not None and torch.all(linear.fc.bias == 0)
    with pytest.raises(ValueError):
        build_head("mlp", 16, 5)


def test_text_init_goes_through_proj_transpose(tiny_backbone) -> None:
    names = ["red circle", "blue square", "green star"]
    w = text_init_weights(tiny_backbone, names)
    text = tiny_backbone.text_classifier(names, ["a photo of a {}."])
    expected = F.normalize(text @ tiny_backbone.visual_proj.t(), dim=-1)
    assert w.shape == (3, tiny_backbone.width)
    torch.testing.assert_close(w, expected)
    torch.testing.assert_close(map_text_to_pre_proj(text, None), F.normalize(text, dim=-1))
    # with the text-initialised cosine head, logits are sigma * cos(f, proj^T w): the ranking of zero-shot CLIP
    # is not guaranteed (proj is not orthogonal) but the head must start finite and bounded
    head = build_head("cosine", tiny_backbone.width, 3, w)
    feats = tiny_backbone.encode_image(torch.randn(2, 3, 32, 32)).pre_proj
    assert head(feats).shape == (2, 3)
