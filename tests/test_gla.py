"""GLA: planted-prior recovery, calibration (confidence = accuracy), ensemble formula, end-to-end runs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tailclip.engine.metrics import classification_metrics, expected_calibration_error
from tailclip.posthoc import (
    confidence_temperature,
    debias_zeroshot,
    estimate_prior,
    gla_ensemble,
    interpolate_states,
    mean_confidence,
)

log = logging.getLogger(__name__)

C, D = 20, 16


def planted(n_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Balanced samples from C Gaussians; logits = exact class log-likelihood + log q_true (a biased model)."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(C, D, generator=torch.Generator().manual_seed(0)) * 0.6
    q_true = torch.tensor([0.5 ** (i / 3) for i in range(C)], dtype=torch.float64)
    q_true /= q_true.sum()
    y = torch.arange(C).repeat_interleave(n_per_class)
    x = mu[y] + torch.randn(len(y), D, generator=g)
    loglik = -0.5 * torch.cdist(x, mu).pow(2)
    return (loglik + q_true.log().float()), y, q_true


def test_gla_recovers_planted_prior() -> None:
    z, y, q_true = planted(200, seed=1)
    q = estimate_prior(z, y, temperature=1.0)
    assert q.sum().item() == pytest.approx(1.0) and (q > 0).all()
    l1 = float((q - q_true).abs().sum())
    max_rel = float(((q - q_true).abs() / q_true).max())
    log.warning("planted prior: L1 error %.4f, max relative error %.3f (q_true max/min %.0f)", l1, max_rel,
                float(q_true.max() / q_true.min()))
    assert l1 < 0.08 and max_rel < 0.25
    z_test, y_test, _ = planted(100, seed=2)
    biased = float(z_test.argmax(1).eq(y_test).float().mean())
    debiased = float(debias_zeroshot(z_test, 1.0, q).argmax(1).eq(y_test).float().mean())
    assert debiased > biased + 0.05, (biased, debiased)


def test_prior_with_missing_class_stays_finite() -> None:
    z, y, _ = planted(20, seed=3)
    keep = y != 7
    q = estimate_prior(z[keep], y[keep])
    assert torch.isfinite(q).all() and q[7] < 0.5


def test_calibration_makes_confidence_equal_accuracy() -> None:
    z, y, _ = planted(50, seed=4)
    over = 6.0 * z  # an over-confident model
    acc = float(over.argmax(1).eq(y).float().mean())
    assert mean_confidence(over, 1.0) > acc + 0.1
    t = confidence_temperature(over, y)
    assert mean_confidence(over, t) == pytest.approx(acc, abs=1e-6)
    ece_before = expected_calibration_error(over.softmax(1), y)
    ece_after = expected_calibration_error((over / t).softmax(1), y)
    assert ece_after < ece_before / 2
    m = classification_metrics(over / t, y)  # ECE / NLL are in every results.json
    assert m["ece"] == pytest.approx(100 * ece_after)
    assert m["nll"] == pytest.approx(float(torch.nn.functional.cross_entropy(over / t, y)))
    assert m["nll"] < classification_metrics(over, y)["nll"]


def test_calibration_edge_cases() -> None:
    y = torch.arange(5)
    perfect = torch.eye(5) * 3
    assert confidence_temperature(perfect, y) == pytest.approx(1e-3)  # 100% accuracy: T -> 0, clamped
    with pytest.raises(ValueError):
        confidence_temperature(torch.zeros(3, 5), y)


def test_ensemble_formula() -> None:
    g = torch.Generator().manual_seed(0)
    ft, zs = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    q = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    ps = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    pt = torch.tensor([0.25, 0.25, 0.4, 0.1], dtype=torch.float64)
    out = gla_ensemble(ft, zs, 2.0, 0.5, q, ps, pt)
    ref = ft / 2.0 + zs / 0.5 - q.log().float() - ps.log().float() + pt.log().float()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(debias_zeroshot(zs, 0.5, q), zs / 0.5 - q.log().float())


def test_wise_ft_interpolation() -> None:
    zs = {"w": torch.zeros(2, 2), "n": torch.tensor([1])}
    ft = {"w": torch.ones(2, 2), "n": torch.tensor([5])}
    out = interpolate_states(zs, ft, 0.25)
    torch.testing.assert_close(out["w"], torch.full((2, 2), 0.25))
    assert int(out["n"]) == 5
    with pytest.raises(ValueError):
        interpolate_states(zs, ft, 1.5)


@pytest.mark.run_plots
def test_gla_runs_end_to_end(tiny_vit_json: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """linear probe run -> GLA debiased zero-shot and GLA ensemble on its saved logits -> WiSE-FT run."""
    from helpers import register_color_dataset

    from tailclip.api import run
    from tailclip.config import load_config
    from tailclip.engine.runs import RunDir

    monkeypatch.setenv("TAILCLIP_CACHE", str(tmp_path / "cache"))
    base = [f"model.name=json:{tiny_vit_json}", f"data.name={register_color_dataset()}", "eval.splits=[val,test]",
            f"output_dir={tmp_path / 'runs'}"]
    lp = run(load_config(None, base + ["method=linear_probe", "run_name=lp", "linear_probe.search_steps=2"]))
    assert (lp / "logits_val.safetensors").is_file() and (lp / "checkpoint.safetensors").is_file()
    deb = run(load_config(None, base + ["method=gla", "run_name=deb"]), train=False)
    res = RunDir(deb).read_results()
    prior = json.loads((deb / "prior.json").read_text())
    assert len(prior["prior"]) == 4 and sum(prior["prior"]) == pytest.approx(1.0)
    # 6 images per class: a K-shot task with K < 20, so T_zs and q are fitted on train + val (released code)
    assert res["gla"]["fitted_on"] == {"temperature_zs": "train+val", "prior": "train+val"}
    assert (deb / "plots" / "gla_prior.png").stat().st_size > 0
    ens = run(load_config(None, base + ["method=gla", "run_name=ens", "gla.mode=ensemble", f"gla.finetuned_run={lp}"]))
    res = RunDir(ens).read_results()
    assert res["gla"]["source_prior"] == "train" and res["gla"]["temperature_ft"] > 0  # the probe's loss is CE
    assert res["gla"]["fitted_on"] == {"temperature_zs": "train+val", "prior": "train+val", "temperature_ft": "val"}
    saved = load_file(str(ens / "logits_test.safetensors"))  # the reported top-1 is the ensemble's own
    assert res["top1"] == pytest.approx(100.0 * float((saved["logits"].argmax(1) == saved["labels"]).float().mean()))
    assert res["ece"] >= 0.0 and res["nll"] > 0.0
    # without saved logits the ensemble runs the fine-tuned checkpoint instead
    (lp / "logits_test.safetensors").rename(tmp_path / "moved.safetensors")
    ens2 = run(load_config(None, base + ["method=gla", "run_name=ens2", "gla.mode=ensemble",
                                         f"gla.finetuned_run={lp}"]))
    assert RunDir(ens2).read_results()["top1"] == pytest.approx(res["top1"])
    # WiSE-FT at alpha=1 is the fine-tuned run itself
    wise = run(load_config(None, base + ["method=wise_ft", "run_name=wise", f"wise_ft.finetuned_run={lp}",
                                         "wise_ft.alpha=1.0"]), train=False)
    assert RunDir(wise).read_results()["top1"] == pytest.approx(RunDir(lp).read_results()["top1"])
