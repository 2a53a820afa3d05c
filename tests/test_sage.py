"""Sage: the SG-Adapter against a direct transcription of equations 7-9, Table 9's parameter formula and Table 12's
totals, the compensation-factor loss (eq. 21-22) on a hand example, FIT (eq. 23-24) on the same crop, the ablation
switches, the presets (Table 8) and the 60 templates of Appendix F."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import make_image_folder

from tailclip.api import run
from tailclip.config import load_config
from tailclip.data.base import TaskInfo
from tailclip.data.templates import get_templates
from tailclip.errors import ConfigError
from tailclip.losses import build_loss, loss_balances_prior
from tailclip.methods import get_method
from tailclip.table import load_table
from tailclip.tuners import SGAdapterOptions, SGBranch, auto_bottleneck, build_tuner

PRESETS = sorted((Path(__file__).resolve().parents[1] / "configs" / "sage").glob("[!a]*.yaml"))  # not ablation*
LIFT_ROW = load_table(PRESETS[0].parent / "ablation.yaml").rows[0].overrides  # the ablation's first row
COUNTS = np.array([40, 20, 10, 5, 2])


def _info(counts: np.ndarray = COUNTS) -> TaskInfo:
    return TaskInfo("toy", [f"thing {i}" for i in range(len(counts))], ["a photo of a {}."], counts,
                    ("train", "val", "test"))


def _sage(backbone, overrides: list[str] = (), counts: np.ndarray = COUNTS):
    cfg = load_config(None, ["method=sage", *overrides]).method_config()
    return get_method("sage")(cfg, backbone, _info(counts))


def _perturb(module: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))


# --- equations 7-9, transcribed separately: every step spelled out as the paper writes it -------------------------
def _layer_norm(x: torch.Tensor, ln: torch.nn.LayerNorm) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def _sg_reference(h: torch.Tensor, w: torch.Tensor, b: SGBranch) -> torch.Tensor:
    """s * f'_SG for h (B, N, d) and classifier weights w (C, d): eq. 7 and 8 with repeat() over the tokens."""
    w_bar = w.sum(0, keepdim=True) / w.shape[0]  # (1, d)
    f_v = _layer_norm(h, b.ln)
    f_t = _layer_norm(w_bar.expand(h.shape[0], h.shape[1], -1), b.ln)  # LN(repeat(w_bar, b, 1))
    proj = f_t @ b.proj.weight.t() + b.proj.bias if b.proj is not None else f_t
    f_vt = proj * f_v
    down = {k: (getattr(b, f"down_{k}").weight, getattr(b, f"down_{k}").bias) for k in ("v", "vt", "t")}
    left = f_v @ down["v"][0].t() + down["v"][1]
    right = f_vt @ down["vt"][0].t() + down["vt"][1] + b.s_vt * (f_t @ down["t"][0].t() + down["t"][1])
    g = torch.cat([left, right], dim=-1)
    w_up, b_up = b.up.weight.t(), b.up.bias
    out = b.alpha * (torch.relu(g) @ w_up + b_up) + (1 - b.alpha) * (g @ w_up + b_up)
    return b.s * out


@pytest.mark.parametrize("w_proj", [True, False])
def test_sg_block_equals_equations_7_to_9(tiny_backbone, w_proj: bool) -> None:
    torch.manual_seed(0)
    w = torch.randn(5, tiny_backbone.width)
    tuner = build_tuner("sg_adapter", tiny_backbone,
                        SGAdapterOptions(bottleneck=3, alpha=0.3, w_proj=w_proj, guidance=lambda: w))
    try:
        _perturb(tuner)  # non-zero up-projection, s_vt, s away from their init
        assert all(float(b.up.weight.detach().abs().sum()) > 0 for b in tuner.branches)
        x = torch.randn(2, 3, 32, 32)
        taps = [f"blocks.{i}{k}" for i in range(tiny_backbone.num_blocks) for k in ("", ".attn", ".mlp")]
        with torch.no_grad():
            out = tiny_backbone.encode_image(x, taps=taps).taps
            blocks = tiny_backbone.model.visual.transformer.resblocks
            for i, b in enumerate(tuner.branches):
                h = out[f"blocks.{i}.attn"]
                mlp = blocks[i].mlp(blocks[i].ln_2(h))  # the frozen MLP branch
                expected = mlp + _sg_reference(h, w, b) + h  # eq. 9
                torch.testing.assert_close(out[f"blocks.{i}"], expected, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(out[f"blocks.{i}.mlp"] - mlp, _sg_reference(h, w, b), rtol=1e-5, atol=1e-5)
    finally:
        tuner.detach()


def test_identity_at_init_and_gradients_reach_the_classifier(tiny_backbone) -> None:
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        frozen = tiny_backbone.encode_image(x).pre_proj
    method = _sage(tiny_backbone, ["sage.fit=false"])
    try:
        assert torch.all(torch.stack([b.up.weight.abs().sum() for b in method.tuner.branches]) == 0)
        with torch.no_grad():
            torch.testing.assert_close(method.features(x), frozen, rtol=0, atol=1e-6)
        with torch.no_grad():
            for b in method.tuner.branches:
                b.up.weight.normal_(std=0.1)
        # a loss on the features alone: the head gets gradient only through w_bar (the SG-Adapter's guidance)
        method.features(x).square().sum().backward()
        grad = method.head.weight.grad
        assert grad is not None and float(grad.abs().sum()) > 0
        # w_bar is the mean of the rows: every row gets the same gradient
        torch.testing.assert_close(grad, grad[:1].expand_as(grad))
    finally:
        method.tuner.detach()
        tiny_backbone.zero_grad(set_to_none=True)


# --- Table 9 / Table 12 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("d", "r"), [(64, 1), (64, 3), (768, 4), (768, 32), (1024, 8)])
@pytest.mark.parametrize("w_proj", [True, False])
def test_parameters_per_block_follow_table_9(d: int, r: int, w_proj: bool) -> None:
    branch = SGBranch(d, r, alpha=0.1, w_proj=w_proj)
    counted = sum(p.numel() for p in branch.parameters())
    formula = (5 * r + d + 4) * d + 3 * r + 2  # Table 9
    assert counted == SGBranch.num_parameters(d, r, w_proj) == (formula if w_proj else formula - d * d - d)


# Table 12 prints its rows swapped: the 6.96 / 8.19 / 7.13 / 18.04 it labels "w/o W_proj" are the totals *with*
# W_proj (Table 1 gives Sage 6.96M); its unit is 2^20 parameters, and the head is not counted.
TABLE_12 = {100: (6.96, 0.20), 365: (7.13, 0.38), 1000: (8.19, 1.43), 8142: (18.04, 11.29)}


@pytest.mark.parametrize("classes", list(TABLE_12))
def test_vitb16_totals_next_to_table_12(classes: int) -> None:
    r = auto_bottleneck(classes, 12)
    with_proj = 12 * SGBranch.num_parameters(768, r)
    without = 12 * SGBranch.num_parameters(768, r, w_proj=False)
    paper_with, paper_without = TABLE_12[classes]
    assert with_proj / 2**20 == pytest.approx(paper_with, abs=0.01)
    assert without / 2**20 == pytest.approx(paper_without, abs=0.01)
    if classes == 100:
        assert (r, with_proj, without) == (4, 7_299_240, 212_136)


def test_vitb16_block_count_is_built_from_a_real_block(tiny_backbone) -> None:
    """One SG branch at ViT-B/16's width (d = 768, r = 4 at C = 100) is 608,270 parameters."""
    assert sum(p.numel() for p in SGBranch(768, 4, 0.1).parameters()) == 608_270
    method = _sage(tiny_backbone)
    try:
        d, blocks = tiny_backbone.width, tiny_backbone.num_blocks
        r = auto_bottleneck(len(COUNTS), blocks)
        res = method.extra_results()
        assert res["tuner_params_per_block"] == (5 * r + d + 4) * d + 3 * r + 2
        assert res["tuner_params"] == blocks * res["tuner_params_per_block"]
        assert method.num_trainable() == res["tuner_params"] + len(COUNTS) * d + 2  # + head + s1, s2
    finally:
        method.tuner.detach()


# --- compensation factor (eq. 21-22) -----------------------------------------------------------------------------
def test_cf_loss_on_a_hand_example() -> None:
    counts, mu, gamma = [8, 4, 2], 0.5, 0.5
    z, y = [1.0, -0.5, 2.0], 1
    s_n, c, n_min = 14, 3, 2
    lam = [mu * n**gamma * s_n / (c * n_min) for n in counts]  # eq. 21 with equality
    assert lam == pytest.approx([7 / 3 * math.sqrt(8) / 2, 7 / 3 * 2 / 2, 7 / 3 * math.sqrt(2) / 2])
    num = [math.exp(zi) * n * la for zi, n, la in zip(z, counts, lam)]
    expected = -math.log(num[y] / sum(num))  # eq. 22
    # by hand: n Lambda is proportional to n^1.5 -> e^1 * 22.627, e^-0.5 * 8, e^2 * 2.828 = 61.51, 4.852, 20.90
    assert expected == pytest.approx(-math.log(4.852 / (61.51 + 4.852 + 20.90)), abs=1e-3)
    assert expected == pytest.approx(2.8894, abs=1e-4)
    loss = build_loss("cf", counts, mu=mu, gamma=gamma)
    torch.testing.assert_close(loss.compensation(), torch.tensor(lam, dtype=torch.float32))
    value = loss(torch.tensor([z]), torch.tensor([y]))
    assert float(value) == pytest.approx(expected, rel=1e-6)
    assert loss_balances_prior("cf")


def test_cf_additive_reading_on_a_hand_example() -> None:
    """The other reading of eq. 22: Lambda added to the logits, CE(z + log n + Lambda); mu then matters, while the
    printed (product) reading ignores it."""
    counts, z, y = [8, 4, 2], [1.0, -0.5, 2.0], 1
    lam = [0.5 * n**0.5 * 14 / (3 * 2) for n in counts]
    adj = [zi + math.log(n) + la for zi, n, la in zip(z, counts, lam)]
    expected = -adj[y] + math.log(sum(math.exp(a) for a in adj))
    loss = build_loss("cf", counts, mu=0.5, gamma=0.5, reading="additive")
    assert float(loss(torch.tensor([z]), torch.tensor([y]))) == pytest.approx(expected, rel=1e-6)
    zt, yt = torch.tensor([z]), torch.tensor([y])
    for reading, depends in (("product", False), ("additive", True)):
        a = build_loss("cf", counts, mu=0.5, gamma=0.5, reading=reading)(zt, yt)
        b = build_loss("cf", counts, mu=1.0, gamma=0.5, reading=reading)(zt, yt)
        assert (abs(float(a) - float(b)) > 1e-3) == depends
    cfg = load_config(None, ["method=sage", "sage.cf_reading=additive"]).method_config()
    assert cfg.loss_options()["reading"] == "additive"


def test_fit_starts_as_the_sum_of_the_three_logits(tiny_backbone) -> None:
    """fit_init = 1 (the reading that keeps FIT on where lambda3 = 1e-7, iNat): z_hat = z + z^v + z^t at init."""
    torch.manual_seed(4)
    method = _sage(tiny_backbone, ["sage.lambda1=1e-7", "sage.lambda2=1e-7", "sage.lambda3=1e-7"])
    try:
        method.eval()
        x = torch.randn(2, 3, 32, 32)
        f = method.features(x)
        z, z_v, z_t = method.head(f), method.head(method.zero_shot_features(x)), method.zs_logits(f)
        with torch.no_grad():
            torch.testing.assert_close(method(x).logits, z + z_v + z_t, rtol=1e-5, atol=1e-4)
    finally:
        method.tuner.detach()


def test_cf_with_constant_lambda_is_la() -> None:
    """gamma = 0 makes Lambda the same for every class: CF is then LA (tau = 1), values and gradients."""
    counts = [50, 20, 5, 1]
    z = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3, 0, 2])
    za, zb = z.clone().requires_grad_(), z.clone().requires_grad_()
    cf, la = build_loss("cf", counts, mu=0.7, gamma=0.0)(za, y), build_loss("la", counts)(zb, y)
    cf.backward()
    la.backward()
    torch.testing.assert_close(cf, la)
    torch.testing.assert_close(za.grad, zb.grad)


def test_lift_accepts_any_registered_loss(tiny_backbone) -> None:
    cfg = load_config(None, ["method=lift", "lift.loss=cf"]).method_config()
    method = get_method("lift")(cfg, tiny_backbone, _info())
    try:
        assert type(method.loss_fn).__name__ == "CompensatedLALoss" and method.loss_fn.gamma == 0.05
    finally:
        method.tuner.detach()
    with pytest.raises(ConfigError, match="lift.loss='nope'"):
        load_config(None, ["method=lift", "lift.loss=nope"])


# --- FIT (eq. 23-24) ---------------------------------------------------------------------------------------------
def _trained_looking(method) -> None:
    _perturb(method.tuner, seed=1)
    with torch.no_grad():
        method.head.weight.add_(0.2 * torch.randn_like(method.head.weight))
        method.s1.fill_(0.7)
        method.s2.fill_(-0.4)


def test_fit_uses_the_same_crop_and_the_weighted_sum(tiny_backbone, monkeypatch: pytest.MonkeyPatch) -> None:
    method = _sage(tiny_backbone, ["sage.lambda1=0.3", "sage.lambda2=0.2", "sage.lambda3=0.5", "sage.gamma=0.1"])
    try:
        _trained_looking(method)
        x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 4, 2])
        seen = []
        encode = tiny_backbone.encode_image

        def spy(images, taps=()):
            seen.append((images, bool(tiny_backbone.hooks), torch.is_grad_enabled()))
            return encode(images, taps)

        monkeypatch.setattr(tiny_backbone, "encode_image", spy)
        out = method(x, y)
        # two forwards of the very same batch: tuned (hooks on, with grad), then frozen (hooks paused, no grad)
        assert [(s[0] is x, s[1], s[2]) for s in seen] == [(True, True, True), (True, False, False)]
        monkeypatch.undo()

        with torch.no_grad():
            f = tiny_backbone.encode_image(x).pre_proj
            method.tuner.detach()
            f_zs = tiny_backbone.encode_image(x).pre_proj  # no-hook forward of the same batch
            method.tuner.attach(tiny_backbone)
        text = F.normalize(method.zs_weight, dim=-1)
        w = F.normalize(method.head.weight.detach(), dim=-1)
        cos = lambda a, b: 25.0 * F.normalize(a, dim=-1) @ b.t()
        z, z_v, z_t = cos(f, w), cos(f_zs, w), cos(f, text)
        z_hat = z + 0.7 * z_v - 0.4 * z_t  # eq. 23
        torch.testing.assert_close(out.logits.detach(), z_hat, rtol=1e-5, atol=1e-5)
        cf = build_loss("cf", COUNTS, mu=0.5, gamma=0.1)
        terms = [cf(t, y) for t in (z, z_v, z_t, z_hat)]
        expected = terms[0] + 0.3 * terms[1] + 0.2 * terms[2] + 0.5 * terms[3]  # eq. 24
        torch.testing.assert_close(out.loss.detach(), expected, rtol=1e-5, atol=1e-5)
        for name, value in zip(("loss_z", "loss_zv", "loss_zt", "loss_zhat"), terms):
            torch.testing.assert_close(out.extras[name], value, rtol=1e-5, atol=1e-5)
        assert float(out.extras["s1"]) == pytest.approx(0.7) and float(out.extras["s2"]) == pytest.approx(-0.4)
        # W^zs is the head's initialisation: the 60-template ensemble in the pre-projection space
        from tailclip.heads import text_init_weights

        torch.testing.assert_close(method.zs_weight, text_init_weights(tiny_backbone, _info().classnames,
                                                                       get_templates("sage60")))
        method.eval()  # at evaluation the prediction is z_hat too
        with torch.no_grad():
            torch.testing.assert_close(method(x).logits, z_hat, rtol=1e-5, atol=1e-5)
        out.loss.backward()
        assert method.s1.grad is not None and method.s2.grad is not None
    finally:
        method.tuner.detach()
        tiny_backbone.zero_grad(set_to_none=True)


def test_fit_with_zero_scales_and_weights_is_the_plain_logit(tiny_backbone) -> None:
    torch.manual_seed(3)
    with_fit = _sage(tiny_backbone, ["sage.lambda1=0", "sage.lambda2=0", "sage.lambda3=0", "sage.fit_init=0"])
    with_fit.tuner.detach()
    torch.manual_seed(3)
    plain = _sage(tiny_backbone, ["sage.fit=false"])
    try:
        _perturb(plain.tuner, seed=2)
        with_fit.tuner.load_state_dict(plain.tuner.state_dict())
        x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 4, 2])
        a = plain(x, y)
        plain.tuner.detach()
        with_fit.tuner.attach(tiny_backbone)
        b = with_fit(x, y)
        torch.testing.assert_close(b.logits, a.logits)
        torch.testing.assert_close(b.loss, a.loss)
        assert not plain.s1.requires_grad and "s1" not in dict(plain.trainable_parameters())
    finally:
        for m in (plain, with_fit):
            if m.tuner.attached:
                m.tuner.detach()


def test_lift_row_of_the_ablation_is_lift(tiny_backbone) -> None:
    """Sage's first ablation row (AdaptFormer, one-template init, LA, no FIT) is LIFT itself."""
    torch.manual_seed(5)
    sage = _sage(tiny_backbone, LIFT_ROW)
    sage.tuner.detach()
    torch.manual_seed(5)
    lift = get_method("lift")(load_config(None, ["method=lift"]).method_config(), tiny_backbone, _info())
    try:
        _perturb(lift.tuner, seed=4)
        sage.tuner.load_state_dict(lift.tuner.state_dict())
        torch.testing.assert_close(sage.head.weight, lift.head.weight)
        x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 3, 4])
        a = lift(x, y)
        lift.tuner.detach()
        sage.tuner.attach(tiny_backbone)
        b = sage(x, y)
        torch.testing.assert_close(b.logits, a.logits)
        torch.testing.assert_close(b.loss, a.loss)
    finally:
        for m in (lift, sage):
            if m.tuner.attached:
                m.tuner.detach()


def test_fit_terms_land_in_metrics_csv(tiny_vit_json: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAILCLIP_CACHE", str(tmp_path / "cache"))
    data = make_image_folder(tmp_path / "data")
    path = run(load_config(None, [f"model.name=json:{tiny_vit_json}", "data.name=image-folder", f"data.root={data}",
                                  f"output_dir={tmp_path / 'runs'}", "run_name=sage", "method=sage",
                                  "train.epochs=1", "train.batch_size=8", "eval.splits=[test]", "eval.plots=false"]))
    header = (path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"loss_z", "loss_zv", "loss_zt", "loss_zhat", "s1", "s2"} <= set(header)


# --- presets, switches, templates --------------------------------------------------------------------------------
TABLE_8 = {  # alpha, mu, gamma, lambda1, lambda2, lambda3, epochs
    "cifar100_lt_ir100": (0.1, 0.5, 0.05, 0.015, 0.015, 0.4, 10),
    "cifar100_lt_ir50": (0.1, 0.5, 0.06, 0.0001, 0.01, 0.6, 10),
    "cifar100_lt_ir10": (0.1, 0.5, 0.06, 0.002, 0.005, 0.2, 10),
    "places_lt": (0.8, 0.5, 0.05, 0.003, 0.01, 0.2, 10),
    "imagenet_lt": (0.8, 0.5, 0.05, 0.005, 0.01, 0.2, 10),
    "inat2018": (1.0, 0.5, 0.085, 1e-7, 1e-7, 1e-7, 20),
}


@pytest.mark.parametrize("path", PRESETS, ids=[p.name for p in PRESETS])
def test_presets_carry_table_8(path: Path) -> None:
    cfg = load_config(path, [])
    s = cfg.method_config()
    assert cfg.method == "sage" and cfg.model.name == "ViT-B-16@openai"
    got = (s.alpha, s.mu, s.gamma, s.lambda1, s.lambda2, s.lambda3, cfg.train.epochs)
    assert got == pytest.approx(TABLE_8[path.stem])
    assert (s.adapter, s.init, s.loss, s.fit, s.w_proj) == ("sg", "sage60", "cf", True, True)
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.momentum, cfg.train.weight_decay) == (0.01, 128, 0.9, 5e-4)


def test_every_dataset_of_tables_1_to_4_has_a_preset() -> None:
    assert {p.stem for p in PRESETS} == set(TABLE_8)


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match="sage.adapter"):
        load_config(None, ["method=sage", "sage.adapter=lora"])
    with pytest.raises(ConfigError, match="sage.alpha"):
        load_config(None, ["method=sage", "sage.alpha=1.5"])
    with pytest.raises(ConfigError, match="sage.init"):
        load_config(None, ["method=sage", "sage.init=imagenet80"])


def test_sg_adapter_needs_a_pre_projection_classifier(tiny_backbone) -> None:
    with pytest.raises(ConfigError, match="guidance"):
        build_tuner("sg_adapter", tiny_backbone, num_classes=10)
    w = torch.zeros(10, tiny_backbone.width + 1)
    with pytest.raises(ConfigError, match="pre-projection"):
        build_tuner("sg_adapter", tiny_backbone, SGAdapterOptions(guidance=lambda: w), num_classes=10)


def test_sage60_is_appendix_f() -> None:
    t = get_templates("sage60")
    assert len(t) == len(set(t)) == 60
    assert (t[0], t[11], t[36], t[57], t[59]) == ("a photo of a {}.", "the embroidered {}.", "a {} in a video game.",
                                                 "an embroidered {}.", "itap of the {}.")
