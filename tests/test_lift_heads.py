"""Heads: contract tests generated from the HEADS registry (text init gives the text classifier's decisions, a
state dict reloads to identical logits, bad names and shapes are refused) and LIFT's random inits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tailclip.errors import ConfigError
from tailclip.heads import HEADS, CosineClassifier, LinearHead, build_head


@pytest.mark.parametrize("name", list(HEADS))
def test_head_contract(name: str) -> None:
    torch.manual_seed(0)
    w, f = torch.randn(7, 24), torch.randn(50, 24)
    head = build_head(name, 24, 7, w)
    logits = head(f)
    cos = F.normalize(f, dim=-1) @ F.normalize(w, dim=-1).t()
    assert logits.shape == (50, 7) and torch.equal(logits.argmax(dim=1), cos.argmax(dim=1))
    # the text-initialised head is the text classifier up to a per-image positive factor (sigma or |f|)
    torch.testing.assert_close(logits / logits.norm(dim=1, keepdim=True), cos / cos.norm(dim=1, keepdim=True))
    fresh = build_head(name, 24, 7)
    assert not torch.allclose(fresh(f), logits)
    fresh.load_state_dict(head.state_dict())
    assert torch.equal(fresh(f), logits) and type(fresh) is HEADS.get(name) and fresh.name == name
    with pytest.raises(ConfigError, match=r"\(7, 24\)"):
        build_head(name, 24, 7, torch.randn(7, 12))


def test_unknown_head_lists_the_registry() -> None:
    with pytest.raises(ConfigError, match="cosine, linear"):
        build_head("mlp", 16, 5)


def test_random_inits_follow_lift() -> None:
    torch.manual_seed(0)
    cosine = CosineClassifier(64, 10)
    torch.testing.assert_close(cosine.weight.norm(dim=1), torch.ones(10))  # uniform(-1, 1) rows, renormed
    assert cosine.weight.abs().max() < 1 and cosine.scale == 25.0 and "bias" not in dict(cosine.named_parameters())
    linear = LinearHead(512, 10)
    assert torch.all(linear.fc.bias == 0)
    assert linear.fc.weight.std().item() == pytest.approx((2 / 512) ** 0.5, rel=0.05)  # kaiming_normal_, fan_in
