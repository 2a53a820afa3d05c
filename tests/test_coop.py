"""CoOp / CoCoOp: the prompt layout, equivalence with encode_text, what trains, the meta-net, base-to-new."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import make_image_folder

from tailclip.api import run
from tailclip.config import DataConfig, load_config
from tailclip.data.base import Task, TaskInfo
from tailclip.data.base2new import make_base_to_new
from tailclip.data.registry import DATASETS
from tailclip.engine.runs import RunDir
from tailclip.methods import get_method
from tailclip.methods.coop import PromptLearner, coop_epochs

NAMES = ["red_circle", "blue square", "aeroplane", "dog"]


def _info(n: int = len(NAMES), base: list[int] | None = None) -> TaskInfo:
    counts = np.full(n, 4)
    if base is not None:
        counts[[c for c in range(n) if c not in base]] = 0
    return TaskInfo("t", NAMES[:n], ["a photo of a {}."], counts, ("train", "val", "test"), shots=4,
                    base_classes=base, new_classes=None if base is None else [c for c in range(n) if c not in base])


def _method(name: str, backbone, info: TaskInfo, *overrides: str):
    cfg = load_config(None, [f"method={name}", *overrides]).method_config()
    return get_method(name)(cfg, backbone, info)


def test_prompt_layout_is_coops(tiny_backbone) -> None:
    """Context slots sit where the "X" tokens were; SOS before, class tokens, "." and EOT after."""
    pl = PromptLearner(tiny_backbone, NAMES, 16, "", 0.02)
    ids = tiny_backbone.tokenize([" ".join(["X"] * 16) + " " + n.replace("_", " ") + "." for n in NAMES])
    emb = tiny_backbone.token_embedding(ids)
    ctx = torch.randn(16, tiny_backbone.text_width)
    prompts = pl.prompts(ctx)
    length = int(pl.eot.max()) + 1
    assert prompts.shape == (len(NAMES), length, tiny_backbone.text_width)
    torch.testing.assert_close(prompts[:, 0], emb[:, 0])  # SOS
    torch.testing.assert_close(prompts[:, 1:17], ctx.expand(len(NAMES), -1, -1))
    torch.testing.assert_close(prompts[:, 17:], emb[:, 17:length])  # class tokens, ".", EOT (then padding)
    assert torch.equal(pl.eot, tiny_backbone.eot_positions(ids))
    for i, name in enumerate(NAMES):  # the class tokens follow the context, then "." and EOT
        n = pl.name_lens[i]
        name_ids = tiny_backbone.tokenize([name.replace("_", " ")])[0]
        assert torch.equal(ids[i, 17 : 17 + n], name_ids[1 : 1 + n]) and int(pl.eot[i]) == 17 + n + 1
    x_id = tiny_backbone.tokenize(["X"])[0, 1]
    assert (ids[:, 1:17] == x_id).all()


@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_a_photo_of_a_context_reproduces_encode_text(tiny_backbone, position: str) -> None:
    """Context = embeddings of "a photo of a" (M = 4): text features equal encode_text of the written prompt."""
    pl = PromptLearner(tiny_backbone, NAMES, 16, "a photo of a", 0.02, position=position)
    assert pl.n_ctx == 4
    with torch.no_grad():
        got = tiny_backbone.encode_text_embeddings(pl.prompts(pl.ctx), pl.eot)
    names = [n.replace("_", " ") for n in NAMES]
    if position == "end":
        written = [f"a photo of a {n}." for n in names]
    elif position == "middle":
        written = [f"a photo {n} of a." for n in names]
    else:
        written = [f"{n} a photo of a." for n in names]
    torch.testing.assert_close(got, tiny_backbone.encode_text(written), atol=1e-5, rtol=0)


def test_coop_zero_shot_logits_and_only_context_trains(tiny_backbone) -> None:
    m = _method("coop", tiny_backbone, _info(), "coop.ctx_init=a photo of a")
    assert [n for n, _ in m.trainable_parameters()] == ["prompt_learner.ctx"]
    assert m.num_trainable() == 4 * tiny_backbone.text_width
    proj = torch.randn(6, tiny_backbone.embed_dim)
    m.eval()
    with torch.no_grad():
        logits = m({"proj": proj}).logits
    text = F.normalize(tiny_backbone.encode_text([f"a photo of a {n.replace('_', ' ')}." for n in NAMES]), dim=-1)
    torch.testing.assert_close(logits, m.scale * F.normalize(proj, dim=-1) @ text.t(), atol=1e-4, rtol=0)
    m.train()
    out = m({"proj": proj}, torch.tensor([0, 1, 2, 3, 0, 1]))
    out.loss.backward()
    grads = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    assert list(grads) == ["prompt_learner.ctx"] and grads["prompt_learner.ctx"].abs().sum() > 0
    assert all(p.grad is None for p in tiny_backbone.parameters())


def test_coop_parameter_counts(tiny_backbone) -> None:
    assert _method("coop", tiny_backbone, _info()).num_trainable() == 16 * tiny_backbone.text_width
    csc = _method("coop", tiny_backbone, _info(), "coop.csc=true")
    assert csc.num_trainable() == len(NAMES) * 16 * tiny_backbone.text_width
    assert csc.prompt_learner.prompts(csc.prompt_learner.ctx).shape[0] == len(NAMES)
    # the released PromptLearner: ctx_init builds one shared context whatever CSC says
    shared = _method("coop", tiny_backbone, _info(), "coop.csc=true", "coop.ctx_init=a photo of a")
    assert shared.num_trainable() == 4 * tiny_backbone.text_width and not shared.prompt_learner.csc


def test_cocoop_meta_net_shapes_and_per_image_bias(tiny_backbone) -> None:
    m = _method("cocoop", tiny_backbone, _info())
    d, w = tiny_backbone.embed_dim, tiny_backbone.text_width
    shapes = {n: tuple(p.shape) for n, p in m.trainable_parameters()}
    assert shapes == {"prompt_learner.ctx": (4, w), "meta_net.0.weight": (d // 16, d), "meta_net.0.bias": (d // 16,),
                      "meta_net.2.weight": (w, d // 16), "meta_net.2.bias": (w,)}
    with torch.no_grad():  # the tiny model's hidden layer has d/16 = 2 units: keep them active
        m.meta_net[0].bias.fill_(1.0)
    proj = F.normalize(torch.randn(3, d), dim=-1)
    bias = m.image_bias(proj)
    assert bias.shape == (3, w) and not torch.allclose(bias[0], bias[1])
    # each image's logits are CoOp's with its own context ctx + pi(x)
    m.eval()
    with torch.no_grad():
        logits = m({"proj": proj}).logits
        for b in range(3):
            ctx = m.prompt_learner.ctx + bias[b]
            text = m.text_features(ctx)
            torch.testing.assert_close(logits[b], m.scale * proj[b] @ text.t(), atol=1e-4, rtol=0)
        # a zero meta-net output gives the plain "a photo of a" prompts for every image
        m.meta_net[2].weight.zero_()
        m.meta_net[2].bias.zero_()
        zs = F.normalize(tiny_backbone.encode_text([f"a photo of a {n.replace('_', ' ')}." for n in NAMES]), dim=-1)
        torch.testing.assert_close(m({"proj": proj}).logits, m.scale * proj @ zs.t(), atol=1e-4, rtol=0)


def test_cocoop_gradients_reach_context_and_meta_net_only(tiny_backbone) -> None:
    torch.manual_seed(0)  # (the meta-net's init and the batch: independent of which tests ran before)
    m = _method("cocoop", tiny_backbone, _info())
    m.train()
    m({"proj": torch.randn(2, tiny_backbone.embed_dim)}, torch.tensor([1, 3])).loss.backward()
    got = {n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got == {"prompt_learner.ctx", "meta_net.0.weight", "meta_net.0.bias", "meta_net.2.weight",
                   "meta_net.2.bias"}


@pytest.mark.parametrize("name", ["coop", "cocoop"])
def test_base_classes_train_only_base_prompts(tiny_backbone, name: str) -> None:
    """Base-to-new: CE runs over the base classes; the returned training logits mask new classes; eval covers all."""
    m = _method(name, tiny_backbone, _info(base=[0, 1]))
    proj = torch.randn(4, tiny_backbone.embed_dim)
    labels = torch.tensor([0, 1, 1, 0])
    m.train()
    out = m({"proj": proj}, labels)
    assert torch.isinf(out.logits[:, 2:]).all() and torch.isfinite(out.logits[:, :2]).all()
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits[:, :2], labels))
    with pytest.raises(RuntimeError, match="outside the base classes"):
        m({"proj": proj}, torch.tensor([0, 1, 2, 3]))
    m.eval()
    with torch.no_grad():
        full = m({"proj": proj}).logits
    assert full.shape == (4, 4) and torch.isfinite(full).all()
    torch.testing.assert_close(full[:, :2], out.logits[:, :2].detach(), atol=1e-4, rtol=0)


def test_coop_epochs_rule() -> None:
    # CoOp's COOP.md: rn50_ep50 for 1 shot, rn50_ep100 for 2 and 4 shots, rn50 (200 epochs) for 8 and 16
    released = {1: 50, 2: 100, 4: 100, 8: 200, 16: 200}
    assert {k: coop_epochs(k) for k in released} == released
    assert coop_epochs(None) is None


def test_config_errors_name_the_key() -> None:
    from tailclip.errors import ConfigError

    with pytest.raises(ConfigError, match="coop.loss"):
        load_config(None, ["method=coop", "coop.loss=nope"])
    with pytest.raises(ConfigError, match="coop.class_token_position"):
        load_config(None, ["method=coop", "coop.class_token_position=left"])


@pytest.mark.parametrize("name", ["coop", "cocoop"])
def test_a_short_training_run_improves_train_accuracy(tiny_backbone, name: str) -> None:
    """30 SGD steps on a tiny 4-class feature task (random-init context for CoOp) lift train accuracy."""
    torch.manual_seed(0)
    m = _method(name, tiny_backbone, TaskInfo("t", NAMES, ["{}"], np.full(4, 8), ("train",), shots=8))
    g = torch.Generator().manual_seed(0)
    centers = F.normalize(torch.randn(4, tiny_backbone.embed_dim, generator=g), dim=-1)
    y = torch.arange(4).repeat(8)
    x = {"proj": centers[y] + 0.3 * torch.randn(32, tiny_backbone.embed_dim, generator=g)}
    opt = torch.optim.SGD([p for _, p in m.trainable_parameters()], lr=0.5, momentum=0.9)

    def accuracy() -> float:
        m.eval()
        with torch.no_grad():
            return float((m(x).logits.argmax(1) == y).float().mean())

    before = accuracy()
    m.train()
    for _ in range(30):
        opt.zero_grad()
        m(x, y).loss.backward()
        opt.step()
    assert accuracy() >= before + 0.25


def _b2n_folder(cfg: DataConfig, root: Path) -> Task:
    full = DATASETS.get("image-folder")(dataclasses.replace(cfg, name="image-folder", root=str(root), shots=None))
    return make_base_to_new(dataclasses.replace(full, name="folder-b2n"), cfg)


@pytest.mark.parametrize("name", ["coop", "cocoop"])
def test_base_to_new_run_scores_base_new_and_hm(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                tiny_vit_json: Path) -> None:
    """Trained on the base classes only (train has no new-class image), scored on test_base and test_new."""
    data = make_image_folder(tmp_path / "data")
    monkeypatch.setitem(DATASETS._entries, "folder-b2n", lambda cfg: _b2n_folder(cfg, data))
    monkeypatch.setenv("TAILCLIP_CACHE", str(tmp_path / "cache"))
    cfg = load_config(None, [f"model.name=json:{tiny_vit_json}", "data.name=folder-b2n", "data.shots=2",
                             f"method={name}", f"{name}.views=2", "train.epochs=2", "train.batch_size=4",
                             "eval.splits=[test_base,test_new]", "eval.plots=false", f"output_dir={tmp_path}",
                             "run_name=r"])
    res = RunDir(run(cfg)).read_results()
    assert res[name]["trained_classes"] == 2 and res["task_meta"]["base_classes"] == [0, 1]
    assert res["splits"]["test_base"]["num_samples"] == 6 and res["splits"]["test_new"]["num_samples"] == 6
    assert len(res["splits"]["test_new"]["per_class_top1"]) == 2  # new images scored among new classes only
    base, new = res["base"], res["new"]
    assert res["hm"] == pytest.approx(2 * base * new / (base + new) if base + new else 0.0)


def test_presets_load_and_gla_ensembles_the_coop_grid() -> None:
    """Every CoOp/CoCoOp preset validates (CE: GLA's source_prior=auto takes the train prior, see
    test_protocols_gla), and the ImageNet RN50 GLA preset ensembles the CoOp grid."""
    root = Path(__file__).resolve().parents[1] / "configs"
    presets = sorted((root / "coop").glob("*.yaml")) + sorted((root / "cocoop").glob("*.yaml"))
    assert len(presets) == 22
    for path in presets:
        cfg = load_config(path)
        assert cfg.train.lr == 0.002 and cfg.train.warmup_epochs == 1 and cfg.train.warmup_lr == 1e-5
        assert cfg.method_config().loss == "ce"
    coop = load_config(root / "coop" / "imagenet_rn50.yaml")
    assert coop.train.epochs == 50 and coop.train.batch_size == 32 and coop.method_config().n_ctx == 16
    gla = load_config(root / "gla" / "imagenet_rn50_ensemble.yaml")
    assert gla.method_config().finetuned_run == f"runs/{coop.run_name}/k{{shots}}-s{{seed}}"


def test_epochs_by_shots_sets_the_recipe(tiny_backbone) -> None:
    from tailclip.config import TrainConfig

    train = TrainConfig(epochs=200, warmup_epochs=1)
    m = _method("coop", tiny_backbone, _info(), "coop.epochs_by_shots=true")  # a 4-shot task
    assert m.train_config(train).epochs == 100 and m.train_config(train).warmup_epochs == 1
    assert _method("coop", tiny_backbone, _info()).train_config(train).epochs == 200
