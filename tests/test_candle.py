"""Candle: identity init, masks, per-sample vs transductive prediction, the CLA loss, virtual prototypes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tailclip.data.base import TaskInfo
from tailclip.losses import build_loss, loss_balances_prior
from tailclip.methods.candle import IMAGE, PROTO, TEXT, Candle, CandleConfig, attention_mask

NAMES = ["cat", "dog", "fox", "owl", "bee", "elk"]


def _info() -> TaskInfo:
    return TaskInfo(name="toy-b2n", classnames=NAMES, templates=["a photo of a {}."],
                    class_counts=np.array([5, 3, 2, 0, 0, 0]), split_names=("train", "val", "test"),
                    base_classes=[0, 1, 2], new_classes=[3, 4, 5])


def _model(tiny_backbone, **kw) -> Candle:
    torch.manual_seed(0)
    m = Candle(CandleConfig(logit_scale=100.0, **kw), tiny_backbone, _info())
    gen = torch.Generator().manual_seed(1)
    feats = torch.randn(10, tiny_backbone.embed_dim, generator=gen)
    m.set_prototypes(feats, torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 2, 2]))
    return m.eval()


def _perturb(m: Candle) -> None:
    """Move every learnable part off its init so equalities are not artefacts of identity/zero values."""
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        m.fusion.gate.fill_(0.7)


def test_identity_init_gives_zero_shot_l0(tiny_backbone) -> None:
    m = _model(tiny_backbone, gate=0.0)
    assert torch.equal(m.proj_image, torch.eye(32)) and torch.equal(m.proj_text, torch.eye(32))
    x = torch.randn(4, 32)
    l0, _, _ = m.logits(x)
    text = tiny_backbone.text_classifier(NAMES, ["a photo of a {}."]).float()
    torch.testing.assert_close(l0, 100.0 * F.normalize(x, dim=-1) @ F.normalize(text, dim=-1).t())


def test_prototypes_and_virtual_init(tiny_backbone) -> None:
    gen = torch.Generator().manual_seed(1)
    feats = torch.randn(10, 32, generator=gen)
    m = _model(tiny_backbone)
    torch.testing.assert_close(m.base_prototypes, torch.stack([feats[:5].mean(0), feats[5:8].mean(0),
                                                               feats[8:].mean(0)]))
    # text init: the new classes' raw encode_text features, as the released code (not unit-normalised)
    text = tiny_backbone.encode_text([f"a photo of a {n.replace('_', ' ')}." for n in NAMES]).float()
    torch.testing.assert_close(m.virtual_prototypes.data, text[3:])
    assert not torch.allclose(text.norm(dim=-1), torch.ones(len(NAMES)))
    p = m.prototypes()
    torch.testing.assert_close(p[:3], m.base_prototypes)
    torch.testing.assert_close(p[3:], text[3:])
    v = _model(tiny_backbone, virtual_init="visual", virtual_noise=0.05)
    noise = v.virtual_prototypes.data - v.base_prototypes.mean(0)
    assert noise.abs().max() > 0 and 0.02 < float(noise.std()) < 0.08  # mean base prototype + N(0, 0.05)
    assert v.num_trainable() == 2 * 32 * 32 + 3 * 32 + sum(p.numel() for p in v.fusion.parameters())


def released_mask(n_img: int, n_cls: int, mask: str) -> torch.Tensor:
    """Candle's released mask over [images; prototypes; texts], transcribed (True = may not attend): in_visual
    blocks the image+prototype block and unblocks its diagonal; in_text blocks the text block, then its loop
    "unblocks" mask[B + i, B + i] for i < n_cls, prototype rows that were never blocked; between blocks both
    cross blocks."""
    n = n_img + 2 * n_cls
    m = torch.zeros(n, n, dtype=torch.bool)
    v = n_img + n_cls
    if mask == "in_visual":
        m[:v, :v] = True
        for i in range(v):
            m[i, i] = False
    elif mask == "in_text":
        m[v:, v:] = True
        for i in range(n_cls):
            m[n_img + i, n_img + i] = False
    else:
        m[:v, v:] = True
        m[v:, :v] = True
    return m


@pytest.mark.parametrize("mask", ["in_visual", "in_text", "between"])
def test_masked_pairs_get_zero_attention(mask: str) -> None:
    kinds = torch.tensor([IMAGE, IMAGE, PROTO, PROTO, TEXT, TEXT])
    blocked = attention_mask(kinds, mask)
    assert torch.equal(blocked, released_mask(2, 2, mask))
    assert blocked[4, 4] == (mask == "in_text")  # in_text: a text token does not attend to itself
    attn = torch.nn.MultiheadAttention(8, 2, batch_first=True).eval()
    z = torch.randn(1, 6, 8)
    _, w = attn(z, z, z, attn_mask=blocked, average_attn_weights=False)
    assert torch.all(w[0][:, blocked] == 0) and torch.all(w[0][:, ~blocked] > 0)


@pytest.mark.parametrize("mask", ["none", "in_visual", "in_text", "between"])
def test_per_sample_equals_attention_over_each_images_own_token_set(tiny_backbone, mask: str) -> None:
    """The closed-form per-sample fusion equals running the layer on [x_i; P; T] alone, image by image."""
    m = _model(tiny_backbone, mask=mask)
    _perturb(m)
    x = torch.randn(5, 32)
    _, vt, vv = m.logits(x)
    m.cfg.transductive = True
    one = [m.logits(x[i:i + 1]) for i in range(5)]
    torch.testing.assert_close(vt, torch.cat([o[1] for o in one]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(vv, torch.cat([o[2] for o in one]), atol=1e-4, rtol=1e-4)


def test_in_text_mask_blocks_text_to_text_information(tiny_backbone) -> None:
    """With in_text, a fused text token is unchanged when another class's text feature changes."""
    m = _model(tiny_backbone, mask="in_text")
    _perturb(m)
    x = torch.randn(3, 32) @ m.proj_image

    def fused_text() -> torch.Tensor:
        shared = torch.cat([m.prototypes() @ m.proj_image, m.text_features @ m.proj_text])
        return m.fusion.per_sample(x, shared, m.kinds, m.cfg.mask)[1][:, 6:]

    before = fused_text()
    with torch.no_grad():
        m.text_features[1] += 1.0
    after = fused_text()
    torch.testing.assert_close(before[:, [0, 2, 3, 4, 5]], after[:, [0, 2, 3, 4, 5]])
    assert not torch.allclose(before[:, 1], after[:, 1])


def test_prediction_does_not_depend_on_the_other_images_by_default(tiny_backbone) -> None:
    m = _model(tiny_backbone)
    _perturb(m)
    x = torch.randn(6, 32)
    others = torch.randn(6, 32)
    a = m({"proj": x}).logits[0]
    b = m({"proj": torch.cat([x[:1], others[1:]])}).logits[0]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    m.cfg.transductive = True
    at = m({"proj": x}).logits[0]
    bt = m({"proj": torch.cat([x[:1], others[1:]])}).logits[0]
    assert (at - bt).abs().max() > 1e-3  # released mode: the test batch changes an image's prediction


def test_cla_loss_hand_example() -> None:
    counts = [3, 1, 0]
    loss = build_loss("cla", counts)
    assert loss_balances_prior("cla")
    # pi = (n + 1) / sum(n + 1) = (4, 2, 1) / 7
    torch.testing.assert_close(loss.log_prior, torch.tensor([math.log(4 / 7), math.log(2 / 7), math.log(1 / 7)]))
    z = torch.tensor([[1.0, 2.0, 0.5], [0.0, 0.0, 3.0]])
    y = torch.tensor([2, 0])
    adj = z + torch.tensor([math.log(4 / 7), math.log(2 / 7), math.log(1 / 7)])
    by_hand = -(adj[0, 2] - adj[0].exp().sum().log() + adj[1, 0] - adj[1].exp().sum().log()) / 2
    torch.testing.assert_close(loss(z, y), by_hand)


def test_training_loss_treats_prototypes_as_samples(tiny_backbone) -> None:
    m = _model(tiny_backbone).train()
    m.fusion.attn.dropout = 0.0
    x, y = torch.randn(4, 32), torch.tensor([0, 1, 2, 0])
    out = m({"proj": x}, y)
    l0, vt, vv = m.logits(x, with_prototypes=True)
    assert l0.shape == vt.shape == vv.shape == (4 + 6, 6)
    yy = torch.cat([y, torch.arange(6)])
    cla = build_loss("cla", [5, 3, 2, 0, 0, 0])
    torch.testing.assert_close(out.loss, cla(l0, yy) + cla(vt, yy) + cla(vv, yy))
    torch.testing.assert_close(out.logits, (vt + vv)[:4])
    out.loss.backward()
    assert m.virtual_prototypes.grad.abs().sum() > 0 and m.proj_text.grad.abs().sum() > 0


def test_transductive_predicts_in_the_released_batch_of_100(tiny_backbone, monkeypatch) -> None:
    """The released test loader feeds 100 images at a time; transductive predictions depend on that batch, so
    candle.transductive predicts in candle.transductive_batch chunks whatever eval.batch_size is."""
    from pathlib import Path

    from tailclip.config import load_config
    from tailclip.contract import FitContext
    from tailclip.engine import evaluate

    seen: list[int] = []
    monkeypatch.setattr(evaluate, "predict", lambda method, ctx, split: seen.append(ctx.cfg.eval.batch_size))
    cfg = load_config(None, ["method=candle", "eval.batch_size=256"])
    ctx = FitContext(cfg, None, Path("."), torch.device("cpu"))  # type: ignore[arg-type]
    evaluate.predict_split(_model(tiny_backbone, transductive=True), ctx, "test")
    evaluate.predict_split(_model(tiny_backbone), ctx, "test")
    assert seen == [100, 256]
    assert _model(tiny_backbone, transductive=True).protocol() == {"prediction": "transductive(batch 100)"}
    assert _model(tiny_backbone).protocol() == {}
    # and a transductive batch of 100 gives other logits than one of 256 (the reason it is fixed)
    m = _model(tiny_backbone, transductive=True)
    _perturb(m)
    x = torch.randn(256, tiny_backbone.embed_dim, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole = m({"proj": x}).logits
        chunks = torch.cat([m({"proj": x[i:i + 100]}).logits for i in range(0, 256, 100)])
    assert not torch.allclose(whole, chunks, atol=1e-4)


def test_results_record_the_tte_actually_applied(tiny_backbone) -> None:
    """eval.tte=five_crop on a method that predicts from cached eval-view features is recorded as not applied."""
    from pathlib import Path

    from tailclip.api import protocol_record
    from tailclip.config import load_config
    from tailclip.contract import FitContext
    from tailclip.data.base import Task

    cfg = load_config(None, ["method=candle", "eval.tte=five_crop"])
    ctx = FitContext(cfg, Task("t", NAMES, ["{}"], {}), Path("."), torch.device("cpu"))
    rec = protocol_record(_model(tiny_backbone), ctx)
    assert rec["tte"] == "none" and rec["tte_requested"].startswith("five_crop (not applied")
