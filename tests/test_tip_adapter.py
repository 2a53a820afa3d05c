"""Tip-Adapter(-F): logits equal the formula on a hand-built cache; search and fine-tuning run end to end."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

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


@pytest.mark.parametrize("method", ["tip_adapter", "tip_adapter_f"])
def test_runs_end_to_end(method: str, tiny_vit_json: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_features import register_color_dataset

    from tailclip.api import run
    from tailclip.config import load_config
    from tailclip.engine.runs import RunDir

    monkeypatch.setenv("TAILCLIP_CACHE", str(tmp_path / "cache"))
    cfg = load_config(None, [
        f"model.name=json:{tiny_vit_json}", f"data.name={register_color_dataset()}", "data.shots=4",
        f"method={method}", f"{method}.augment_views=2", f"{method}.epochs=3", f"{method}.search_step=[20,5]",
        f"output_dir={tmp_path}", "run_name=r",
    ])
    res = RunDir(run(cfg)).read_results()
    info = res[method]
    assert info["num_keys"] == 16 and info["augment_views"] == 2 and "alpha" in info and "beta" in info
    assert res["top1"] is not None
    if method == "tip_adapter_f":
        assert info["epoch_selected_on"] == "val" and res["selected_on_test"] is False
        assert len(info["history"]) == 3 and 1 <= info["best_epoch"] <= 3
        assert (tmp_path / "r" / "checkpoint.safetensors").is_file()


def test_paper_protocol_is_declared(tiny_vit_json: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_features import register_color_dataset

    from tailclip.api import run
    from tailclip.config import load_config
    from tailclip.engine.runs import RunDir

    monkeypatch.setenv("TAILCLIP_CACHE", str(tmp_path / "cache"))
    cfg = load_config(None, [
        f"model.name=json:{tiny_vit_json}", f"data.name={register_color_dataset()}", "data.shots=2",
        "method=tip_adapter_f", "tip_adapter_f.augment_views=1", "tip_adapter_f.epochs=2",
        "tip_adapter_f.search_step=[5,3]", "tip_adapter_f.paper_protocol=true", f"output_dir={tmp_path}",
        "run_name=p",
    ])
    res = RunDir(run(cfg)).read_results()
    assert res["selected_on_test"] is True and res["tip_adapter_f"]["epoch_selected_on"] == "test"
    assert "TEST" in res["tip_adapter_f"]["protocol"]
