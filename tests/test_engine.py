"""Engine: schedules, data plans, gradient accumulation, TTE averaging, model selection on validation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import read_metrics, tiny_task

from tailclip.config import TrainConfig, load_config
from tailclip.data.base import Task
from tailclip.engine.evaluate import ensemble_logits, predict_images
from tailclip.engine.fit import fit
from tailclip.engine.schedule import learning_rate
from tailclip.engine.trainer import epoch_order, plan_epoch
from tailclip.methods import FitContext, get_method
from tailclip.runtime import distributed


def test_cosine_per_epoch_matches_torch_scheduler() -> None:
    cfg = TrainConfig(epochs=10, lr=0.01)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    for epoch in range(10):
        assert learning_rate(cfg, epoch, 3, 7) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9)
        opt.step()
        sched.step()


def test_warmup_and_per_step_cosine() -> None:
    cfg = TrainConfig(epochs=4, lr=0.1, warmup_epochs=1, warmup_lr=1e-5, sched_unit="step")
    assert learning_rate(cfg, 0, 0, 10) == 1e-5 and learning_rate(cfg, 0, 9, 10) == 1e-5
    assert learning_rate(cfg, 1, 0, 10) == pytest.approx(0.1)
    assert learning_rate(cfg, 3, 9, 10) < learning_rate(cfg, 2, 0, 10) < 0.1
    lin = TrainConfig(epochs=4, lr=0.1, warmup_epochs=2, warmup_lr=0.0, warmup_type="linear")
    assert learning_rate(lin, 1, 0, 10) == pytest.approx(0.05)


def _dassl_lrs(epochs: int, lr: float, warmup_lr: float) -> list[float]:
    """The lr of each epoch under Dassl's ConstantWarmupScheduler(CosineAnnealingLR(T_max=epochs), warmup 1 epoch),
    transcribed: step() after every epoch; once past warm-up the wrapper hands over to the cosine, which
    steps from its own epoch 0."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    out = []
    for wrapper_epoch in range(epochs):
        out.append(warmup_lr if wrapper_epoch < 1 else opt.param_groups[0]["lr"])
        opt.step()
        if wrapper_epoch >= 1:
            cosine.step()
    return out


def test_cosine_span_epochs_is_dassls_schedule() -> None:
    for epochs in (10, 50):
        cfg = TrainConfig(epochs=epochs, lr=0.002, warmup_epochs=1, warmup_lr=1e-5, cosine_span="epochs")
        ours = [learning_rate(cfg, e, 0, 5) for e in range(epochs)]
        assert ours == pytest.approx(_dassl_lrs(epochs, 0.002, 1e-5), rel=1e-9)
        # the default spans the epochs after warm-up: the last epoch sits lower than Dassl's
        default = TrainConfig(epochs=epochs, lr=0.002, warmup_epochs=1, warmup_lr=1e-5)
        assert learning_rate(default, epochs - 1, 0, 5) < ours[-1]
    # CoCoOp (10 epochs): 9 % more total lr than the after-warm-up span
    co = TrainConfig(epochs=10, lr=1.0, warmup_epochs=1, cosine_span="epochs")
    short = TrainConfig(epochs=10, lr=1.0, warmup_epochs=1)
    total = sum(learning_rate(co, e, 0, 1) for e in range(1, 10))
    ratio = total / sum(learning_rate(short, e, 0, 1) for e in range(1, 10))
    assert ratio == pytest.approx(1.09, abs=0.01)


def test_drop_last_drops_the_partial_batch_as_dassl() -> None:
    from tailclip.engine.trainer import steps_per_epoch

    order = epoch_order(23, seed=0, epoch=0)
    plan = plan_epoch(order, 8, 1, 0, 1, drop_last=True)
    assert [st.global_count for st in plan] == [8, 8] and steps_per_epoch(23, 8, True) == 2
    assert [int(i) for st in plan for i in st.micro[0].indices] == order[:16].tolist()
    # fewer images than a batch: Dassl keeps them (drop_last = len(data) >= batch_size)
    assert [st.global_count for st in plan_epoch(np.arange(5), 8, 1, 0, 1, drop_last=True)] == [5]
    assert steps_per_epoch(23, 8) == 3


def test_plans_cover_every_image_once_for_any_world_size() -> None:
    order = epoch_order(23, seed=3, epoch=2)
    assert sorted(order.tolist()) == list(range(23))
    assert not np.array_equal(order, epoch_order(23, seed=3, epoch=3))
    for world in (1, 2, 3):
        for accum in (1, 2):
            seen = []
            for rank in range(world):
                for st in plan_epoch(order, 8, accum, rank, world):
                    assert st.global_count <= 8
                    seen += [int(i) for mb in st.micro if mb.real for i in mb.indices]
            assert sorted(seen) == list(range(23))
    # a partial last global batch smaller than world size gives zero-weight placeholders, never duplicates
    plans = [plan_epoch(np.arange(9), 8, 1, r, 3) for r in range(3)]
    assert [p[-1].micro[0].real for p in plans] == [1, 0, 0]


def _fit(tmp_path: Path, overrides: list[str], task: Task | None = None):
    from tailclip.backbones import create_backbone

    task = task or tiny_task()
    cfg = load_config(None, ["method=lift", "train.epochs=2", "train.batch_size=8", "train.lr=0.05",
                             f"output_dir={tmp_path}", "run_name=r", *overrides])
    torch.manual_seed(0)
    backbone = create_backbone(cfg.model.name)
    method = get_method("lift")(cfg.method_config(), backbone, task)
    run_dir = tmp_path / "r"
    run_dir.mkdir(parents=True, exist_ok=True)
    ctx = FitContext(cfg, task, run_dir, torch.device("cpu"))
    return method, ctx, fit(method, ctx)


def test_grad_accumulation_gives_the_same_training(tmp_path: Path, tiny_vit_json: Path) -> None:
    model = f"model.name=json:{tiny_vit_json}"
    a, _, _ = _fit(tmp_path / "a", [model, "train.grad_accum=1"])
    b, _, _ = _fit(tmp_path / "b", [model, "train.grad_accum=3"])
    for (name, pa), (_, pb) in zip(a.trainable_parameters(), b.trainable_parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5, msg=name)
    rows_a, rows_b = read_metrics(tmp_path / "a" / "r"), read_metrics(tmp_path / "b" / "r")
    assert len(rows_a) == 2
    for ra, rb in zip(rows_a, rows_b):
        assert float(ra["loss"]) == pytest.approx(float(rb["loss"]), rel=1e-4)
        assert ra["train_acc"] == rb["train_acc"]


def test_select_on_val_and_resume_state_written(tmp_path: Path, tiny_vit_json: Path) -> None:
    _, ctx, result = _fit(tmp_path, [f"model.name=json:{tiny_vit_json}", "train.select_on=val", "train.epochs=3"])
    rows = read_metrics(ctx.run_dir)
    vals = [float(r["val_top1"]) for r in rows]
    assert result.training.best_epoch == 1 + int(np.argmax(vals))
    state = torch.load(ctx.run_dir / "resume.pt", weights_only=True)
    assert state["finished"] and state["epoch"] == 3 and state["optimizer"] is None


def test_select_on_val_needs_a_val_split(tmp_path: Path, tiny_vit_json: Path) -> None:
    task = tiny_task()
    task.splits.pop("val")
    with pytest.raises(ValueError, match="val split"):
        _fit(tmp_path, [f"model.name=json:{tiny_vit_json}", "train.select_on=val"], task)


def test_tte_shape_and_averaging(tmp_path: Path, tiny_backbone) -> None:
    calls = []

    def forward(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape)
        return torch.stack([x.mean(dim=(1, 2, 3)), x.amax(dim=(1, 2, 3))], dim=1)

    crops = torch.randn(4, 5, 3, 8, 8)
    out = ensemble_logits(forward, crops)
    assert calls[-1] == (20, 3, 8, 8) and out.shape == (4, 2)
    torch.testing.assert_close(out, torch.stack([forward(crops[:, k]) for k in range(5)]).mean(dim=0))

    # end to end: the split's TTE logits are the mean of the method's logits on each crop
    from tailclip.data.transforms import tte_transform

    task = tiny_task()
    cfg = load_config(None, ["method=zeroshot", "eval.tte=ten_crop", "eval.batch_size=4"])
    method = get_method("zeroshot")(cfg.method_config(), tiny_backbone, task)
    ctx = FitContext(cfg, task, tmp_path, torch.device("cpu"))
    preds = predict_images(method, ctx, "test")
    assert preds.logits.shape == (6, 3) and preds.indices.tolist() == list(range(6))
    img = task.split("test").images.load(2)
    stack = tte_transform(tiny_backbone.preprocess, "ten_crop")(img)
    assert stack.shape == (10, 3, 32, 32)
    with torch.no_grad():
        manual = method(stack).logits.mean(dim=0)
    torch.testing.assert_close(preds.logits[2], manual, rtol=1e-4, atol=1e-4)


def test_single_process_distributed_helpers_are_noops() -> None:
    assert distributed.world_size() == 1 and distributed.is_main_process()
    assert distributed.all_gather_objects(3) == [3]
    t = torch.ones(2)
    assert torch.equal(distributed.all_reduce_sum(t), torch.ones(2))
    assert [len(distributed.shard(np.arange(7), r, 3)) for r in range(3)] == [3, 2, 2]


def test_resume_refuses_a_different_run(tmp_path: Path, tiny_vit_json: Path) -> None:
    model = f"model.name=json:{tiny_vit_json}"
    _fit(tmp_path, [model, "train.epochs=1"])
    with pytest.raises(Exception, match="different configuration"):
        _fit(tmp_path, [model, "train.epochs=1", "train.lr=0.5", "resume=auto"])

