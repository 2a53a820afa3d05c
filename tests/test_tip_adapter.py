"""Tip-Adapter(-F): logits equal the formula on a hand-built cache; the grid is the released one; Tip-Adapter-F on
the engine's trainer equals the released training loop on identical inputs; `train.select_on=paper` reproduces
the released scripts' selection (full val split, or test where there is no val) and says so in results.json."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tailclip.engine.fit import fit
from tailclip.methods.tip_adapter import search_alpha_beta, tip_logits


def test_logits_equal_formula_by_hand() -> None:
    # two classes, three cached keys (unit vectors), one query
    f = torch.tensor([[0.6, 0.8]])
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # text classifier
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    values = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    alpha, beta = 2.0, 5.0
    out = tip_logits(f, w, keys, values, alpha, beta, scale=100.0)
    # affinities 0.6, 0.8, 1.0 -> exp(-5*0.4), exp(-5*0.2), exp(0)
    expected = torch.tensor([[100 * 0.6 + 2 * math.exp(-2.0), 100 * 0.8 + 2 * (math.exp(-1.0) + 1.0)]])
    torch.testing.assert_close(out, expected)


def test_search_follows_released_grid() -> None:
    g = torch.Generator().manual_seed(0)
    keys = torch.nn.functional.normalize(torch.randn(8, 4, generator=g), dim=-1)
    values = torch.nn.functional.one_hot(torch.arange(8) % 2, 2).float()
    w = torch.nn.functional.normalize(torch.randn(2, 4, generator=g), dim=-1)
    feats = keys.clone()  # queries equal the cached keys: the cache model is right, the text classifier random
    labels = torch.arange(8) % 2
    alpha, beta, acc = search_alpha_beta(feats, labels, w, keys, values, 1.0, [7.0, 3.0], [10, 5])
    assert acc == 100.0
    assert min(abs(alpha - (i * 2.9 / 5 + 0.1)) for i in range(5)) < 1e-6
    assert min(abs(beta - (i * 6.9 / 10 + 0.1)) for i in range(10)) < 1e-6


def dense_search(feats, labels, w, keys, values, scale, search_scale, search_step):
    """The released loop, transcribed: the whole affinity, a one-hot matmul, the first best (beta, alpha)."""
    best = (-1.0, 0.0, 0.0)
    for i in range(search_step[0]):
        beta = i * (search_scale[0] - 0.1) / search_step[0] + 0.1
        for j in range(search_step[1]):
            alpha = j * (search_scale[1] - 0.1) / search_step[1] + 0.1
            logits = scale * feats @ w.t() + alpha * torch.exp(-beta * (1 - feats @ keys.t())) @ values
            acc = float(logits.argmax(1).eq(labels).float().mean())
            if acc > best[0]:
                best = (acc, alpha, beta)
    return best[1], best[2], 100 * best[0]


@pytest.mark.parametrize("one_hot", [True, False])
def test_chunked_search_equals_the_dense_released_loop(one_hot: bool) -> None:
    g = torch.Generator().manual_seed(3)
    c, d = 5, 16
    keys = torch.nn.functional.normalize(torch.randn(40, d, generator=g), dim=-1)
    key_labels = torch.arange(40) % c
    values = (torch.nn.functional.one_hot(key_labels, c).float() if one_hot
              else torch.rand(40, c, generator=g))
    w = torch.nn.functional.normalize(torch.randn(c, d, generator=g), dim=-1)
    feats = torch.nn.functional.normalize(keys[torch.arange(60) % 40] + 0.8 * torch.randn(60, d, generator=g), dim=-1)
    labels = key_labels[torch.arange(60) % 40]
    want = dense_search(feats, labels, w, keys, values, 10.0, [7.0, 3.0], [12, 6])
    for chunk_bytes in (4 * 40 * 7, 2**30):  # 7 val rows per chunk, and everything at once
        got = search_alpha_beta(feats, labels, w, keys, values, 10.0, [7.0, 3.0], [12, 6], chunk_bytes=chunk_bytes)
        assert got[0] == pytest.approx(want[0]) and got[1] == pytest.approx(want[1])
        assert got[2] == pytest.approx(want[2])


def test_grid_counts_equal_the_released_formula_with_long_tailed_keys() -> None:
    """Every (beta, alpha) cell's count of correct rows, not only the winner: keys of 1..37 per class (padded
    class blocks of 1..64), a class with no key, 40 betas (two exact refreshes of the recurrence)."""
    from tailclip.methods.tip_adapter import grid, grid_correct

    g = torch.Generator().manual_seed(5)
    c, d = 12, 24
    counts = [37, 20, 9, 5, 3, 2, 1, 1, 1, 16, 8, 0]
    key_labels = torch.repeat_interleave(torch.arange(c), torch.tensor(counts))
    key_labels = key_labels[torch.randperm(len(key_labels), generator=g)]  # keys in no class order
    centres = F.normalize(torch.randn(c, d, generator=g), dim=-1)
    keys = F.normalize(centres[key_labels] + 0.9 * torch.randn(len(key_labels), d, generator=g), dim=-1)
    values = F.one_hot(key_labels, c).float()
    w = F.normalize(centres + 1.2 * torch.randn(c, d, generator=g), dim=-1)
    labels = torch.arange(300) % c
    feats = F.normalize(centres[labels] + 0.9 * torch.randn(300, d, generator=g), dim=-1)
    betas, alphas = grid([7.0, 3.0], [40, 20])
    want = torch.zeros(len(betas), len(alphas), dtype=torch.long)
    for i, beta in enumerate(betas):
        for j, alpha in enumerate(alphas):
            logits = tip_logits(feats.double(), w.double(), keys.double(), values.double(), alpha, beta, 10.0)
            want[i, j] = logits.argmax(1).eq(labels).sum()
    got = grid_correct(feats, labels, w, keys, values, 10.0, betas, alphas, chunk_bytes=3 * 4 * 300 * 50)
    assert torch.equal(got, want)  # float32 here, float64 there: no row sits that close to a boundary
    assert len(set(want.flatten().tolist())) > 10  # the grid really discriminates


def register_fewshot_colors(with_val: bool = True) -> str:
    """Colour classes whose K-shot task also subsamples val to K per class (CoOp's few-shot val), so the full val
    split differs from the few-shot one; `with_val=False` builds a dataset without val (ImageNet's layout)."""
    from helpers import color_task

    from tailclip.data.registry import DATASETS, register_dataset

    name = "test-colors-fs" if with_val else "test-colors-noval"
    if name not in DATASETS:

        @register_dataset(name)
        def build(cfg):
            """TEST colour classes with a few-shot val."""
            task = color_task(4, 6, name=name)
            if not with_val:
                task.splits.pop("val")
            if cfg.shots is not None:
                rng = np.random.default_rng(cfg.seed)
                for split in [s for s in ("train", "val") if s in task.splits]:
                    labels = task.splits[split].labels
                    idx = np.sort(np.concatenate([rng.choice(np.nonzero(labels == c)[0], cfg.shots, replace=False)
                                                  for c in range(4)]))
                    task.splits[split] = task.splits[split].subset(idx)
                task.meta["shots"] = cfg.shots
            return task

    return name


def _cfg(tmp_path: Path, model: Path, dataset: str, method: str, extra: list[str]):
    from tailclip.config import load_config

    return load_config(None, [f"model.name=json:{model}", f"data.name={dataset}", "data.shots=4", f"method={method}",
                              f"{method}.search_step=[20,5]", f"output_dir={tmp_path}", "run_name=r", *extra])


def test_tip_adapter_f_on_the_trainer_equals_the_released_loop(tiny_vit_json: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Same cached views, same per-epoch order: the released loop (nn.Linear adapter on the keys, AdamW eps 1e-4,
    CosineAnnealingLR over every iteration, view e mod K) gives the keys the trainer gives, epoch by epoch."""
    from tailclip.api import build
    from tailclip.engine.trainer import epoch_order
    from tailclip.features import method_features
    from tailclip.methods import FitContext

    monkeypatch.setenv("TAILCLIP_CACHE", str(tmp_path / "cache"))
    epochs, batch, views = 4, 5, 3  # 16 keys: steps of 5, 5, 5, 1
    cfg = _cfg(tmp_path, tiny_vit_json, register_fewshot_colors(), "tip_adapter_f", [
        f"train.epochs={epochs}", f"train.batch_size={batch}", f"tip_adapter_f.augment_views={views}",
        "train.lr=0.01", "tip_adapter_f.logit_scale=100", "tip_adapter_f.init_alpha=2.0",
        "train.select_on=none"])
    task, method = build(cfg, torch.device("cpu"))
    (tmp_path / "r").mkdir()
    ctx = FitContext(cfg, task.guarded(), tmp_path / "r", torch.device("cpu"))

    # the released loop, on the same cached inputs
    feats = [F.normalize(method_features(method, ctx, "train", view=f"aug{k}").proj, dim=-1) for k in range(views)]
    labels = method_features(method, ctx, "train", view="aug0").labels
    keys = F.normalize(torch.stack([method_features(method, ctx, "train", view=f"aug{k}").proj
                                    for k in range(views)]).mean(0), dim=-1)
    values = F.one_hot(labels, 4).float()
    clip_weights = method.text_weights.t()
    adapter = torch.nn.Linear(keys.shape[1], keys.shape[0], bias=False)
    adapter.weight = torch.nn.Parameter(keys.clone())
    opt = torch.optim.AdamW(adapter.parameters(), lr=0.01, eps=1e-4)
    steps = math.ceil(len(labels) / batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps)
    alpha, beta = 2.0, 1.0
    for epoch in range(epochs):
        order = torch.as_tensor(epoch_order(len(labels), cfg.train.seed, epoch))
        for i in range(0, len(order), batch):
            idx = order[i : i + batch]
            f = feats[epoch % views][idx]
            cache_logits = ((-1) * (beta - beta * adapter(f))).exp() @ values
            loss = F.cross_entropy(100.0 * f @ clip_weights + cache_logits * alpha, labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()

    fit(method, ctx)
    assert not torch.equal(adapter.weight, keys)  # training moved the keys
    torch.testing.assert_close(method.keys.detach(), adapter.weight.detach(), rtol=1e-5, atol=1e-6)
    rows = (tmp_path / "r" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + epochs and rows[0].startswith("epoch,lr,loss,train_acc")


@pytest.mark.parametrize("method", ["tip_adapter", "tip_adapter_f"])
def test_selects_on_val_by_default(method: str, tiny_vit_json: Path, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from tailclip.api import run
    from tailclip.engine.runs import RunDir

    monkeypatch.setenv("TAILCLIP_CACHE", str(tmp_path / "cache"))
    cfg = _cfg(tmp_path, tiny_vit_json, register_fewshot_colors(), method,
               [f"{method}.augment_views=2", "train.epochs=3"])
    run_dir = run(cfg)
    res = RunDir(run_dir).read_results()
    info, sel = res[method], res["selection"]
    assert info["num_keys"] == 16 and info["augment_views"] == 2
    assert sel["selected_on_test"] is False
    ab = sel if method == "tip_adapter" else sel["alpha_beta"]
    assert ab["on"] == "val" and ab["among"] == "alpha and beta"
    assert (info["alpha"], info["beta"]) == pytest.approx((ab["chosen"]["alpha"], ab["chosen"]["beta"]))
    if method == "tip_adapter_f":
        assert sel["on"] == "val" and sel["among"] == "epochs"
        vals = [float(r.split(",")[4]) for r in (run_dir / "metrics.csv").read_text().splitlines()[1:]]
        assert sel["chosen"]["epoch"] == 1 + int(np.argmax(vals)) and sel["chosen"]["val_top1"] == max(vals)
        assert res["training"]["epochs_run"] == 3


def test_paper_protocol_searches_the_full_val_split(tiny_vit_json: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """CoOp datasets (main.py): alpha/beta are the released search on the FULL val split (24 images, not the 16
    of the 4-shot val), rebuilt from the data config without shots; nothing is chosen on test."""
    import dataclasses

    from tailclip.api import build
    from tailclip.data.registry import build_task
    from tailclip.features import split_features
    from tailclip.methods import FitContext

    monkeypatch.setenv("TAILCLIP_CACHE", str(tmp_path / "cache"))
    cfg = _cfg(tmp_path, tiny_vit_json, register_fewshot_colors(), "tip_adapter",
               ["tip_adapter.augment_views=1", "train.select_on=paper"])
    task, method = build(cfg, torch.device("cpu"))
    sel = fit(method, FitContext(cfg, task.guarded(), tmp_path, torch.device("cpu"))).selection.to_dict()
    full = split_features(method.backbone, build_task(dataclasses.replace(cfg.data, shots=None)), "val")
    assert len(full) == 24 and len(task.split("val")) == 16
    alpha, beta, acc = search_alpha_beta(F.normalize(full.proj, dim=-1), full.labels, method.text_weights,
                                         method.keys, method.values, method.scale, [7.0, 3.0], [20, 5])
    assert (method.alpha, method.beta) == pytest.approx((alpha, beta))
    assert sel["on"] == "val (full split)" and sel["chosen"]["val_top1"] == acc
    assert sel["selected_on_test"] is False and "released" in sel["protocol"]


def test_tip_adapter_f_paper_protocol_selects_the_epoch_on_test(tiny_vit_json: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """main.py: best epoch on TEST at the initial pair, alpha/beta on the full val, the better test accuracy kept."""
    from tailclip.api import run
    from tailclip.engine.runs import RunDir

    monkeypatch.setenv("TAILCLIP_CACHE", str(tmp_path / "cache"))
    cfg = _cfg(tmp_path, tiny_vit_json, register_fewshot_colors(), "tip_adapter_f",
               ["tip_adapter_f.augment_views=1", "train.epochs=2", "train.select_on=paper"])
    run_dir = run(cfg)
    res = RunDir(run_dir).read_results()
    sel = res["selection"]
    ab = sel["alpha_beta"]
    assert sel["selected_on_test"] is True and "released" in sel["protocol"]
    assert sel["on"] == "test" and sel["among"] == "epochs" and ab["on"] == "val (full split)"
    tests = [float(r.split(",")[-1]) for r in (run_dir / "metrics.csv").read_text().splitlines()[1:]]
    assert (run_dir / "metrics.csv").read_text().splitlines()[0].endswith("test_top1")
    assert sel["chosen"]["epoch"] == 1 + int(np.argmax(tests)) and sel["chosen"]["test_top1"] == max(tests)
    final = max(sel["chosen"]["test_top1"], ab["chosen"]["test_top1_searched"])
    assert res["splits"]["test"]["top1"] == pytest.approx(final)
    kept_initial = sel["chosen"]["test_top1"] > ab["chosen"]["test_top1_searched"]
    assert ab["chosen"].get("kept_initial_on_test", False) == kept_initial


def test_paper_protocol_without_val_searches_on_test(tiny_vit_json: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """ImageNet (main_imagenet.py): no val split, so alpha/beta are searched on the test split and no max is taken."""
    from tailclip.api import run
    from tailclip.engine.runs import RunDir

    monkeypatch.setenv("TAILCLIP_CACHE", str(tmp_path / "cache"))
    cfg = _cfg(tmp_path, tiny_vit_json, register_fewshot_colors(with_val=False), "tip_adapter_f",
               ["tip_adapter_f.augment_views=1", "train.epochs=2", "train.select_on=paper",
                "eval.splits=[test]"])
    res = RunDir(run(cfg)).read_results()
    ab = res["selection"]["alpha_beta"]
    assert ab["on"] == "test" and ab["selected_on_test"] is True and "test_top1_searched" not in ab["chosen"]
    assert res["top1"] == pytest.approx(ab["chosen"]["test_top1"])  # the reported number is the searched one


def test_select_on_none_keeps_the_initial_pair(tiny_vit_json: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from tailclip.api import run
    from tailclip.engine.runs import RunDir

    monkeypatch.setenv("TAILCLIP_CACHE", str(tmp_path / "cache"))
    cfg = _cfg(tmp_path, tiny_vit_json, register_fewshot_colors(), "tip_adapter",
               ["tip_adapter.augment_views=1", "tip_adapter.init_alpha=1.5", "train.select_on=none"])
    res = RunDir(run(cfg)).read_results()
    assert res["selection"]["on"] == "none" and (res["tip_adapter"]["alpha"], res["tip_adapter"]["beta"]) == (1.5, 1.0)
