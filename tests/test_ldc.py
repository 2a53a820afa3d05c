"""LDC: taps from the reference's blocks, bias-free adapters, alpha in (0, 1), ICD reducing to zero-shot, the loss on
a hand example, cached-tap and live-image steps on the same crop, parameter counts, the presets."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_VIT
from helpers import color_task
from torch import nn

from tailclip.backbones import create_backbone
from tailclip.config import load_config
from tailclip.data.transforms import eval_transform
from tailclip.errors import ConfigError
from tailclip.features import FeatureCache, split_features
from tailclip.methods import get_method
from tailclip.methods.ldc import LDCHead, ldc_loss_terms

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def vit8(tmp_path_factory: pytest.TempPathFactory):
    """A tiny ViT with 8 blocks, so the reference's L-7, L-5, L-3, L-1 are blocks 1, 3, 5, 7."""
    path = tmp_path_factory.mktemp("ldc") / "vit8.json"
    path.write_text(json.dumps({**TINY_VIT, "vision_cfg": {**TINY_VIT["vision_cfg"], "layers": 8}}))
    torch.manual_seed(0)
    return create_backbone(f"json:{path}")


@pytest.fixture(scope="module")
def tiny_rn(tiny_rn_json: Path):
    torch.manual_seed(0)
    return create_backbone(f"json:{tiny_rn_json}")


def _ldc(backbone, task, overrides: list[str] = ()):
    cfg = load_config(None, ["method=ldc", *overrides]).method_config()
    torch.manual_seed(1)
    return get_method("ldc")(cfg, backbone, task.info())


def _images(backbone, task, split: str = "train", n: int = 8) -> torch.Tensor:
    tf = eval_transform(backbone.preprocess)
    return torch.stack([tf(task.splits[split].images.load(i)) for i in range(n)])


def test_taps_come_from_blocks_l7_l5_l3_l1(vit8) -> None:
    task = color_task()
    ldc = _ldc(vit8, task)
    assert ldc.taps == ["blocks.1", "blocks.3", "blocks.5", "blocks.7"]
    x = _images(vit8, task)
    with torch.no_grad():
        feats = ldc.encode(x)
    recorded: list[torch.Tensor] = []  # open_clip's own forward, every block's output recorded by module hooks
    blocks = vit8.model.visual.transformer.resblocks
    hooks = [blk.register_forward_hook(lambda m, i, o: recorded.append(o)) for blk in blocks]
    try:
        with torch.no_grad():
            vit8.model.visual(x)
    finally:
        for h in hooks:
            h.remove()
    assert len(recorded) == 8
    for b in (1, 3, 5, 7):
        out = recorded[b]
        out = out if out.shape[0] == x.shape[0] else out.permute(1, 0, 2)  # (N, B, d) towers
        torch.testing.assert_close(feats[f"blocks.{b}"], out, rtol=1e-4, atol=1e-5)
    assert feats["blocks.1"].shape == (8, (32 // 8) ** 2 + 1, 64)


def test_resnet_taps_and_shapes(tiny_rn) -> None:
    task = color_task(size=64)
    ldc = _ldc(tiny_rn, task)
    assert ldc.taps == ["layer1", "layer2", "layer3", "layer4"]
    out = ldc.all_logits(ldc.encode(_images(tiny_rn, task)))
    assert {k: tuple(v.shape) for k, v in out.items()} == {"zs": (8, 4), "maf": (8, 4), "icd": (8, 4),
                                                          "alpha": (8, 1), "alf": (8, 4)}


def test_shapes_bias_free_and_alpha_in_0_1(vit8) -> None:
    task = color_task()
    ldc = _ldc(vit8, task)
    ldc.train()
    with torch.no_grad():
        out = ldc.all_logits(ldc.encode(_images(vit8, task) * 3))
    assert {k: tuple(v.shape) for k, v in out.items()} == {"zs": (8, 4), "maf": (8, 4), "icd": (8, 4),
                                                          "alpha": (8, 1), "alf": (8, 4)}
    assert bool(((out["alpha"] > 0) & (out["alpha"] < 1)).all())
    linears = [m for m in ldc.head.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 4 + 2 + 2 * 3 + 2 and all(m.bias is None for m in linears)
    torch.testing.assert_close(out["alf"], out["alpha"] * out["maf"] + (1 - out["alpha"]) * out["icd"])


def test_icd_with_a3_zeroed_is_zero_shot(vit8) -> None:
    task = color_task()
    ldc = _ldc(vit8, task).eval()
    with torch.no_grad():
        ldc.head.icd["a3"][-1].weight.zero_()
        x = _images(vit8, task)
        out = ldc.all_logits(ldc.encode(x))
        zs = vit8.logit_scale * F.normalize(vit8.encode_image(x).proj, dim=-1) @ F.normalize(
            vit8.text_classifier(task.classnames, task.templates), dim=-1).t()
    torch.testing.assert_close(out["icd"], out["zs"])
    torch.testing.assert_close(out["zs"], zs, rtol=1e-4, atol=1e-4)


def test_loss_on_a_hand_example() -> None:
    out = {"zs": torch.tensor([[2.0, 0.0], [0.0, 1.0]]), "maf": torch.tensor([[1.0, 0.0], [0.0, 0.0]]),
           "icd": torch.tensor([[2.0, 1.0], [1.0, 1.0]]), "alf": torch.tensor([[1.5, 0.5], [0.5, 0.5]])}
    labels = torch.tensor([0, 1])
    terms = ldc_loss_terms(out, labels, ("maf", "icd", "alf"))

    def ce(row: list[float], y: int) -> float:
        return math.log(sum(math.exp(v) for v in row)) - row[y]

    assert terms["ce_maf"].item() == pytest.approx((ce([1, 0], 0) + ce([0, 0], 1)) / 2)
    assert terms["ce_icd"].item() == pytest.approx((ce([2, 1], 0) + ce([1, 1], 1)) / 2)
    assert terms["ce_alf"].item() == pytest.approx((ce([1.5, 0.5], 0) + ce([0.5, 0.5], 1)) / 2)
    assert terms["l1_maf"].item() == pytest.approx((1 + 0 + 0 + 1) / 4)  # |maf - zs| over batch and classes
    assert terms["l1_icd"].item() == pytest.approx((0 + 1 + 1 + 0) / 4)
    total = sum(terms.values()).item()
    assert total == pytest.approx(ce([1, 0], 0) / 2 + ce([0, 0], 1) / 2 + ce([2, 1], 0) / 2 + ce([1, 1], 1) / 2
                                  + ce([1.5, 0.5], 0) / 2 + ce([0.5, 0.5], 1) / 2 + 0.5 + 0.5)


def test_cached_taps_and_live_images_take_the_same_step(vit8, tmp_path: Path) -> None:
    """One AdamW step from the cached eval-view taps equals one step from the same images through the tower."""
    task = color_task()
    fs = split_features(vit8, task, "train", taps=["blocks.1", "blocks.3", "blocks.5", "blocks.7"],
                        cache=FeatureCache(tmp_path))
    rows = list(range(8))
    cached = {n: fs.get(n)[rows] for n in ("blocks.1", "blocks.3", "blocks.5", "blocks.7", "proj")}
    labels = torch.as_tensor(task.splits["train"].labels[rows])
    params = []
    for inputs in (cached, _images(vit8, task)):
        ldc = _ldc(vit8, task)
        ldc.train()
        opt = torch.optim.AdamW([p for _, p in ldc.trainable_parameters()], lr=1e-2, eps=1e-4, weight_decay=1e-4)
        ldc(inputs, labels).loss.backward()
        opt.step()
        params.append(torch.cat([p.detach().flatten() for _, p in ldc.trainable_parameters()]))
    torch.testing.assert_close(params[0], params[1], rtol=1e-4, atol=1e-5)


def _count(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def vit_formula(d: int, big_d: int, c: int) -> int:
    levels = 4 * (d * d + 2 * d)  # Linear d->d + LayerNorm
    maf = big_d * 2048 + 2 * 2048 + 2048 * c
    icd = (c * big_d + 2 * big_d + big_d * big_d) + (2 * big_d * big_d + 2 * big_d) + (big_d * big_d + 2 * big_d
                                                                                        + big_d * c)
    alpha = big_d * big_d + 2 * big_d + big_d
    return levels + maf + icd + alpha


def rn_formula(dims: tuple[int, ...], big_d: int, c: int) -> int:
    d = dims[-1]
    levels = sum(ci * d + 2 * d for ci in dims)  # 1x1 conv + BN
    maf = big_d * big_d + 2 * big_d + big_d * c
    icd = (c * big_d + 2 * big_d + big_d * big_d) + (2 * big_d * big_d + 2 * big_d) + (big_d * big_d + 2 * big_d
                                                                                        + big_d * c)
    return levels + maf + icd + big_d * big_d + 2 * big_d + big_d


@pytest.mark.parametrize("classes", [10, 1000])
def test_parameter_counts_vitb16_and_rn50(classes: int) -> None:
    vit = LDCHead("vit", (768,) * 4, 512, classes)
    rn = LDCHead("resnet", (256, 512, 1024, 2048), 1024, classes)
    assert _count(vit) == vit_formula(768, 512, classes)
    assert _count(rn) == rn_formula((256, 512, 1024, 2048), 1024, classes)
    expected = {10: (4_764_160, 14_214_144), 1000: (7_805_440, 17_255_424)}[classes]
    assert (_count(vit), _count(rn)) == expected


def test_ablation_variants_build_only_their_parts(vit8) -> None:
    task = color_task()
    full = _count(_ldc(vit8, task).head)
    maf = _ldc(vit8, task, ["ldc.variant=maf"])
    icd = _ldc(vit8, task, ["ldc.variant=icd"])
    no_alf = _ldc(vit8, task, ["ldc.variant=no_alf"])
    assert maf.head.icd is None and maf.head.alpha is None and maf.eval_heads() == ()
    assert icd.head.maf is None and icd.head.alpha is None
    assert no_alf.head.alpha is None and no_alf.eval_heads() == ("maf", "icd", "alf")
    assert _count(no_alf.head) == full - _count(_ldc(vit8, task).head.alpha)
    x, y = _images(vit8, task), torch.as_tensor(task.splits["train"].labels[:8])
    out = no_alf(x, y)
    torch.testing.assert_close(out.heads["alf"], (out.heads["maf"] + out.heads["icd"]) / 2)
    assert set(maf(x, y).extras) == {"loss_ce_maf", "loss_l1_maf"}


def test_inputs_auto_picks_the_cache_only_when_it_fits(vit8) -> None:
    task = color_task()
    assert _ldc(vit8, task).inputs == "features"
    assert _ldc(vit8, task, ["ldc.cache_gb=0.00001"]).inputs == "images"
    assert _ldc(vit8, task, ["ldc.inputs=images"]).inputs == "images"
    with pytest.raises(ConfigError, match="ldc.fusion_weights"):
        load_config(None, ["method=ldc", "ldc.fusion_weights=[0.5,0.5]"])
    with pytest.raises(ConfigError, match="ldc.tap_blocks"):
        _ldc(vit8, task, ["ldc.tap_blocks=[1,3,5,9]"])


def test_presets_cover_11_datasets_two_towers_and_the_recipe() -> None:
    presets = [p for p in sorted((REPO / "configs" / "ldc").glob("*.yaml")) if not p.stem.endswith("_table")]
    assert len(presets) == 22
    for path in presets:
        cfg = load_config(path, [])
        m = cfg.method_config()
        assert cfg.method == "ldc" and cfg.model.name in ("ViT-B-16@openai", "RN50@openai")
        t = cfg.train
        assert (t.optimizer, t.lr, t.weight_decay, t.eps, t.epochs, t.batch_size, t.sched_unit, m.crop_scale) == (
            "adamw", 1e-4, 1e-4, 1e-4, 50, 64, "step", [0.8, 1.0])
        assert cfg.train.select_on == "none" and m.report == "beta_search"  # the released protocol by name
        assert cfg.data.templates == ("imagenet7" if cfg.data.name == "imagenet" else None)


def released_search_hp(maf: torch.Tensor, icd: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """LDC's released search_hp, transcribed: beta in [i / 50 for i in range(51)], start (0, 0), keep a beta only
    when its accuracy is strictly higher."""
    best_beta, best_acc = 0.0, 0.0
    for i in range(51):
        beta = i / 50
        pred = (beta * maf + (1 - beta) * icd).argmax(dim=1)
        acc = float((pred == labels).sum()) / len(labels) * 100
        if acc > best_acc:
            best_beta, best_acc = beta, acc
    return best_beta, best_acc


@pytest.mark.parametrize("seed", range(5))
def test_beta_search_equals_the_released_search(seed: int) -> None:
    from tailclip.methods.ldc import search_beta

    g = torch.Generator().manual_seed(seed)
    maf, icd = torch.randn(200, 7, generator=g).round(), torch.randn(200, 7, generator=g)  # rounded: ties
    labels = torch.randint(0, 7, (200,), generator=g)
    beta, acc = search_beta(maf, icd, labels)
    want_beta, want_acc = released_search_hp(maf, icd, labels)
    assert beta == want_beta and acc == pytest.approx(want_acc, abs=1e-9)


def test_beta_search_report_end_to_end(tmp_path: Path) -> None:
    """ldc.report=beta_search: the last epoch, beta searched on the chosen split, test predicted with the mix,
    recorded in results.json's ldc entry and protocol; selecting on val is refused."""
    import json

    from tailclip import api

    cfg = load_config(None, ["method=ldc", "data.name=synth-fewshot", "data.shots=2", "ldc.views=1",
                             "train.epochs=2", "ldc.report=beta_search", "ldc.beta_on=val", "eval.splits=[val,test]",
                             f"output_dir={tmp_path}", "run_name=b", "eval.plots=false"])
    res = json.loads((api.run(cfg) / "results.json").read_text())
    rec = res["ldc"]
    assert rec["report"] == "beta_search" and rec["beta_split"] == "val" and not rec["beta_on_test"]
    assert rec["beta"] in [i / 50 for i in range(51)]
    assert rec["beta_split_top1"] == pytest.approx(res["splits"]["val"]["top1"])  # val predicted with that beta
    assert res["protocol"]["ldc.report"] == "beta_search(on val)" and res["selection"]["chosen"]["epoch"] == 2
    bad = load_config(None, ["method=ldc", "data.name=synth-fewshot", "data.shots=2", "ldc.report=beta_search",
                             "train.select_on=val", f"output_dir={tmp_path}", "run_name=c"])
    with pytest.raises(ConfigError, match="beta_search keeps the last epoch"):
        api.run(bad)


def test_the_recipe_is_the_default_of_the_train_keys_and_obeyed() -> None:
    """LDC's released recipe is the default of train.*: train.epochs=2 is obeyed (it used to be ignored in favour
    of ldc.epochs), and the old key is refused by name."""
    cfg = load_config(None, ["method=ldc"])
    assert (cfg.train.epochs, cfg.train.lr, cfg.train.optimizer, cfg.train.batch_size) == (50, 1e-4, "adamw", 64)
    assert load_config(None, ["method=ldc", "train.epochs=2"]).train.epochs == 2
    assert load_config(None, ["method=lift"]).train.epochs == 10  # other methods keep the global defaults
    with pytest.raises(ConfigError, match="unknown config key 'ldc.epochs'"):
        load_config(None, ["method=ldc", "ldc.epochs=2"])
