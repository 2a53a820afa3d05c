"""The engine's trainer on cached features: extras logged per epoch, view choices, hooks, selection among epochs
and heads (restored from a checkpoint), the method's eval transform, and the linear-probe head on the trainer."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import color_task
from torch import Tensor, nn

from tailclip.config import InputsOption, load_config
from tailclip.contract import FeatureSpec, Inputs
from tailclip.engine import trainer as trainer_mod
from tailclip.engine.checkpoint import load_checkpoint, save_checkpoint
from tailclip.engine.evaluate import predict, predict_images
from tailclip.engine.fit import fit
from tailclip.engine.trainer import METRIC_COLUMNS, train
from tailclip.errors import ConfigError
from tailclip.features import AugSpec
from tailclip.methods import FitContext, Method, Output


class ToyFeatures(Method):
    """A linear head on cached proj features with two heads and two extras (not registered: tests only)."""

    name = "toy_features"
    inputs = "features"
    select_among = ("epochs", "heads")

    def __init__(self, backbone, info, spec: FeatureSpec | None = None, cfg: object = None) -> None:
        super().__init__(cfg, backbone, info)
        self.fc = nn.Linear(backbone.embed_dim, info.num_classes)
        self.spec = spec or FeatureSpec()
        self.seen: list[tuple[str, tuple[int, ...]]] = []
        self.calls: list[tuple] = []

    def feature_spec(self) -> FeatureSpec:
        return self.spec

    def eval_heads(self) -> tuple[str, ...]:
        return ("constant", "linear")

    def on_epoch_start(self, epoch: int, num_epochs: int) -> None:
        self.calls.append(("epoch", epoch, num_epochs))

    def after_step(self, step: int) -> None:
        self.calls.append(("step", step))

    def forward(self, inputs: Inputs, labels: Tensor | None = None) -> Output:
        f = self.encode(inputs)["proj"]
        if self.training:
            self.seen.append(("batch", tuple(f.shape)))
        if f.ndim == 3:  # per="all": (B, K, D), average the views
            f = f.mean(dim=1)
        linear = self.fc(F.normalize(f.float(), dim=-1) * 10)
        heads = {"constant": torch.zeros_like(linear), "linear": linear}
        logits = heads[self.active_head or "linear"]
        if labels is None:
            return Output(logits, heads=heads)
        extras = {"const": torch.tensor(2.0), "label_mean": labels.float().mean()}
        return Output(logits, F.cross_entropy(linear, labels), extras=extras, heads=heads)


def _setup(tmp_path: Path, tiny_backbone, overrides: list[str], monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TAILCLIP_CACHE", str(tmp_path / "cache"))
    task = color_task(4, 6)
    cfg = load_config(None, ["method=zeroshot", "train.epochs=2", "train.batch_size=5", "train.lr=0.5",
                             "train.optimizer=sgd", *overrides])
    run_dir = tmp_path / "run"
    run_dir.mkdir(exist_ok=True)
    return task, cfg, FitContext(cfg, task.guarded(), run_dir, torch.device("cpu"))


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as fh:
        return list(csv.DictReader(fh))


def test_extras_are_logged_per_epoch_weighted_like_the_loss(tmp_path: Path, tiny_backbone,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    tags: list[str] = []

    class Recorder:
        def __init__(self, enabled: bool, log_dir) -> None:
            pass

        def scalar(self, tag: str, value, step: int) -> None:
            tags.append(tag)

        def close(self) -> None:
            pass

    monkeypatch.setattr(trainer_mod, "_TensorBoard", Recorder)
    task, _cfg, ctx = _setup(tmp_path, tiny_backbone, ["train.select_on=none"], monkeypatch)
    method = ToyFeatures(tiny_backbone, task.info())
    result = train(method, ctx)
    rows = _rows(ctx.run_dir)
    header = list(rows[0])
    assert header[: len(METRIC_COLUMNS)] == list(METRIC_COLUMNS)
    # extras after the fixed columns, in order of appearance, then the per-head val columns
    assert header[len(METRIC_COLUMNS):] == ["const", "label_mean", "val_top1_constant", "val_top1_linear"]
    for row in rows:
        assert float(row["const"]) == 2.0
        # 24 rows in batches of 5, 5, 5, 5, 4: the batch means weighted by batch size give the mean label 1.5
        # (the plain mean of the five batch means would not)
        assert float(row["label_mean"]) == pytest.approx(1.5)
        assert float(row["val_top1_constant"]) == 25.0  # all-zero logits predict class 0 of 4 balanced classes
    assert {"epoch/const", "epoch/label_mean", "epoch/loss"} <= set(tags)
    assert [c for c in method.calls if c[0] == "epoch"] == [("epoch", 0, 2), ("epoch", 1, 2)]
    assert [c[1] for c in method.calls if c[0] == "step"] == list(range(1, 11))  # 5 steps x 2 epochs
    assert result.selection.to_dict() == {"on": "none", "among": "epochs", "chosen": {"epoch": 2},
                                          "selected_on_test": False}


@pytest.mark.parametrize("per", ["epoch", "sample", "all"])
def test_view_choices(per: str, tmp_path: Path, tiny_backbone, monkeypatch: pytest.MonkeyPatch) -> None:
    from tailclip.features import method_features

    task, cfg, ctx = _setup(tmp_path, tiny_backbone, ["train.select_on=none", "train.batch_size=24"], monkeypatch)
    method = ToyFeatures(tiny_backbone, task.info(), FeatureSpec(("proj",), views=2, per=per))
    batches: list[Tensor] = []
    orig = method.forward

    def spy(inputs, labels=None):
        if method.training:
            batches.append(inputs["proj"].detach().clone())
        return orig(inputs, labels)

    method.forward = spy  # type: ignore[method-assign]
    train(method, ctx)
    views = torch.stack([method_features(method, ctx, "train", view=f"aug{k}").proj for k in range(2)])  # (2, 24, D)
    for epoch, batch in enumerate(batches):  # one step per epoch: the whole split in epoch order
        order = torch.as_tensor(trainer_mod.epoch_order(24, cfg.train.seed, epoch))
        if per == "all":
            assert batch.shape == (24, 2, views.shape[-1])
            torch.testing.assert_close(batch, views[:, order].transpose(0, 1))
        elif per == "epoch":
            torch.testing.assert_close(batch, views[epoch % 2, order])
        else:
            from0 = (batch == views[0, order]).all(1)
            from1 = (batch == views[1, order]).all(1)
            assert bool((from0 | from1).all()) and from0.any() and from1.any()


def test_selection_among_heads_and_epochs_restored_from_checkpoint(tmp_path: Path, tiny_backbone,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    task, cfg, ctx = _setup(tmp_path, tiny_backbone, ["train.epochs=3"], monkeypatch)  # auto: val exists
    method = ToyFeatures(tiny_backbone, task.info())
    result = train(method, ctx)
    summary, selection = result.training, result.selection.to_dict()
    rows = _rows(ctx.run_dir)
    scores = [(float(r[f"val_top1_{h}"]), -int(r["epoch"]), -i, h) for r in rows
              for i, h in enumerate(method.eval_heads())]
    best = max(scores)  # the first best wins: earlier epoch, then earlier head
    assert selection["on"] == "val" and selection["among"] == "epochs and heads"
    assert selection["chosen"] == {"epoch": -best[1], "head": best[3], "val_top1": best[0]}
    assert method.active_head == best[3] and summary.best_epoch == -best[1]
    full = FitContext(cfg, task, ctx.run_dir, ctx.device)
    before = predict(method, full, "test")
    save_checkpoint(method, full)
    fresh = ToyFeatures(tiny_backbone, task.info())
    load_checkpoint(fresh, ctx.run_dir)
    assert fresh.active_head == method.active_head
    assert torch.equal(predict(fresh, full, "test").logits, before.logits)


def test_paper_selection_needs_a_declared_protocol(tmp_path: Path, tiny_backbone,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    task, _cfg, ctx = _setup(tmp_path, tiny_backbone, ["train.select_on=paper"], monkeypatch)
    with pytest.raises(ValueError, match="declares no paper protocol"):
        train(ToyFeatures(tiny_backbone, task.info()), ctx)


def test_predict_images_uses_the_method_eval_transform(tmp_path: Path, tiny_backbone) -> None:
    from tailclip.methods.zeroshot import ZeroShot, ZeroShotConfig

    class Constant(ZeroShot):
        def eval_transform(self, tte: str):
            return lambda img: torch.zeros(3, 32, 32)

    task = color_task(4, 2)
    cfg = load_config(None, ["method=zeroshot"])
    method = Constant(ZeroShotConfig(), tiny_backbone, task.info())
    preds = predict_images(method, FitContext(cfg, task, tmp_path, torch.device("cpu")), "test")
    with torch.no_grad():
        expected = method(torch.zeros(1, 3, 32, 32)).logits
    torch.testing.assert_close(preds.logits, expected.expand(8, -1))


def test_linear_probe_head_trains_on_the_trainer(tmp_path: Path, tiny_backbone,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The cosine head learns from cached features: once extracted, the backbone never runs during training."""
    from tailclip.features import method_features
    from tailclip.methods import get_method

    task, cfg, ctx = _setup(tmp_path, tiny_backbone, ["method=linear_probe", "linear_probe.head=cosine",
                                                      "train.epochs=5", "train.lr=0.05", "train.batch_size=8"],
                            monkeypatch)
    method = get_method("linear_probe")(cfg.method_config(), tiny_backbone, task.info())
    start = method.head.weight.detach().clone()
    for split in ("train", "val"):
        method_features(method, ctx, split)  # extract first
    calls: list[int] = []
    with monkeypatch.context() as m:
        m.setattr(tiny_backbone, "encode_image", lambda *a, **k: calls.append(1))
        result = fit(method, ctx)
    assert not calls and not torch.equal(method.head.weight, start)
    rows = _rows(ctx.run_dir)
    assert len(rows) == 5 and float(rows[-1]["loss"]) < float(rows[0]["loss"])
    vals = [float(r["val_top1"]) for r in rows]
    assert result.selection.on == "val" and result.selection.chosen["epoch"] == 1 + int(np.argmax(vals))



@pytest.mark.parametrize("views", [0, 2])
def test_inputs_images_trains_a_features_method_on_a_live_forward(tmp_path, tiny_backbone, monkeypatch,
                                                                  views: int) -> None:
    """`<method>.inputs=images`: the trainer reads images, the transform is the cached views' augmentation (the
    eval view when none are cached); on the eval view both paths take the same steps."""
    spec = FeatureSpec(views=views, augment=AugSpec(scale=(0.8, 1.0), interpolation="bicubic"))
    task, cfg, ctx = _setup(tmp_path, tiny_backbone, [], monkeypatch)
    torch.manual_seed(0)
    from_images = ToyFeatures(tiny_backbone, task.info(), spec, InputsOption(inputs="images"))
    assert from_images.inputs == "images" and ToyFeatures.inputs == "features"
    if views:
        crop = repr(from_images.train_transform(0))
        assert "RandomResizedCrop" in crop and "scale=(0.8, 1.0)" in crop and "bicubic" in crop.lower()
        return
    from_cache = ToyFeatures(tiny_backbone, task.info(), spec, InputsOption(inputs="features"))
    from_cache.load_state_dict(from_images.state_dict())
    before = from_cache.fc.weight.detach().clone()
    train(from_images, ctx)
    train(from_cache, FitContext(cfg, task.guarded(), tmp_path / "run2", torch.device("cpu")))
    assert from_images.seen and from_images.seen == from_cache.seen
    assert not torch.allclose(from_cache.fc.weight, before)
    torch.testing.assert_close(from_images.fc.weight, from_cache.fc.weight, atol=1e-5, rtol=1e-4)


def test_inputs_switch_is_checked(tiny_backbone) -> None:
    with pytest.raises(ConfigError, match="inputs='video'"):
        ToyFeatures(tiny_backbone, color_task(2, 2).info(), cfg=InputsOption(inputs="video"))
    with pytest.raises(ConfigError, match="candle.inputs"):
        load_config(None, ["method=candle", "candle.inputs=video"])
