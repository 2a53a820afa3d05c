"""CoOp (Zhou et al., IJCV 2022) and CoCoOp (Zhou et al., CVPR 2022): learned prompt context, frozen CLIP.

CoOp: every class prompt is `[SOS] ctx_1 .. ctx_M classname . [EOT]` with M learned context vectors in the token
embedding space (one set for all classes, or one per class with `csc`), laid out exactly as CoOp's
PromptLearner: "X X .. X classname." is tokenized and embedded, and the context vectors replace the embeddings
of the "X" tokens. Text features come from `backbone.encode_text_embeddings`; logits = logit_scale * cos(image,
text); loss CE (the `loss` option, so GLA's `source_prior: auto` can tell that the prior was not balanced).

CoCoOp adds a meta-net (Linear D->D/16, ReLU, Linear D/16->text_width) of the L2-normalised image feature whose
output pi is added to every context vector, so each image gets its own prompts: B x C text encodings a step.

Both encoders are frozen, so both train from the feature cache (`inputs = "features"`): K augmented views of
the train split (CoOp's RandomResizedCrop scale 0.08-1, bicubic, + flip) are extracted once and every epoch
reads one of them per sample. This is CoOp's / CoCoOp's training up to which random crops are seen (K fixed
views instead of a fresh crop per epoch): the loss and gradients on a given crop are the same.

Base-to-new tasks (`info.base_classes`): training prompts cover the base classes only and CE runs over them,
as CoCoOp's `SUBSAMPLE_CLASSES base`; evaluation encodes every class and the orchestrator scores base images
among base classes and new among new (`label_spaces`). Padding after the last end-of-text token is dropped
before the text tower: with its causal mask that leaves the pooled features unchanged.

Equations, the released protocol, the named options and every deliberate difference: docs/methods/coop.md.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones.base import Backbone
from ..config import InputsOption, TrainConfig, check_choice, check_range
from ..contract import FeatureSpec, Inputs, Method, Output, register_method
from ..data.base import TaskInfo
from ..errors import ConfigError
from ..features import AugSpec
from ..losses import build_loss, loss_names
from .clip_kit import logit_scale

log = logging.getLogger(__name__)

COOP_AUG = AugSpec(scale=(0.08, 1.0), interpolation="bicubic", flip=True)  # Dassl's random_resized_crop + flip
POSITIONS = ("end", "middle", "front")


def coop_epochs(shots: int | None) -> int | None:
    """CoOp's scripts (COOP.md: rn50_ep50 at 1 shot, rn50_ep100 at 2 and 4, rn50 (200 epochs) at 8 and 16);
    None: not a K-shot task."""
    if shots is None:
        return None
    return 50 if shots <= 1 else 100 if shots <= 4 else 200


@dataclass
class CoOpConfig(InputsOption):
    n_ctx: int = 16  # context vectors M (ignored when ctx_init is set: M = its token count)
    ctx_init: str = ""  # "" : N(0, init_std) init; else the embeddings of these words ("a photo of a": M = 4)
    init_std: float = 0.02
    csc: bool = False  # class-specific context (one set of M vectors per class); with ctx_init: one shared set,
    # as the released PromptLearner (its ctx_init branch never reads CSC)
    class_token_position: str = "end"  # end | middle | front
    loss: str = "ce"  # a registered loss (GLA's source_prior=auto reads it)
    logit_scale: float | None = None  # None: the model's own (100 for OpenAI CLIP)
    views: int = 10  # cached augmented views of the train split (K; 0: the un-augmented eval view only)
    per: str = "sample"  # which view a sample reads each epoch: sample (random) | epoch (view e mod K)
    epochs_by_shots: bool = False  # train.epochs from CoOp's rule by K (coop_epochs): one preset for a shot grid

    def __post_init__(self) -> None:
        check_choice("coop.class_token_position", self.class_token_position, POSITIONS)
        check_choice("coop.loss", self.loss, loss_names())
        check_choice("coop.per", self.per, ("sample", "epoch"))
        check_choice("coop.inputs", self.inputs, ("features", "images"))
        check_range("coop.init_std", self.init_std, 0.0)
        if self.n_ctx < 1 or self.views < 0:
            raise ConfigError(f"coop.n_ctx={self.n_ctx} must be >= 1 and coop.views={self.views} >= 0")


@dataclass
class CoCoOpConfig(InputsOption):
    n_ctx: int = 4
    ctx_init: str = "a photo of a"
    init_std: float = 0.02
    loss: str = "ce"
    logit_scale: float | None = None
    views: int = 10
    per: str = "sample"
    eval_chunk: int = 4096  # at most this many prompts (images x classes) through the text tower at once

    def __post_init__(self) -> None:
        check_choice("cocoop.loss", self.loss, loss_names())
        check_choice("cocoop.per", self.per, ("sample", "epoch"))
        check_choice("cocoop.inputs", self.inputs, ("features", "images"))
        check_range("cocoop.init_std", self.init_std, 0.0)
        if self.n_ctx < 1 or self.views < 0 or self.eval_chunk < 1:
            raise ConfigError("cocoop.n_ctx and cocoop.eval_chunk must be >= 1, cocoop.views >= 0")


class PromptLearner(nn.Module):
    """CoOp's prompt layout for a list of class names: frozen prefix (SOS) and suffix (class tokens, ".", EOT)
    embeddings around the learned context, and the EOT positions the text tower pools at."""

    def __init__(self, backbone: Backbone, classnames: list[str], n_ctx: int, ctx_init: str, init_std: float,
                 csc: bool = False, position: str = "end") -> None:
        super().__init__()
        width = backbone.text_width
        with torch.no_grad():
            if ctx_init:
                ids = backbone.tokenize([ctx_init.replace("_", " ")])
                n_ctx = int(backbone.eot_positions(ids)[0]) - 1
                init = backbone.token_embedding(ids)[0, 1 : 1 + n_ctx].float().cpu()
                ctx = init.clone()  # shared even with csc: the released ctx_init branch ignores CSC
                if csc:
                    log.warning("coop: csc=true with ctx_init=%r trains one shared context, as the released code",
                                ctx_init)
            else:
                shape = (len(classnames), n_ctx, width) if csc else (n_ctx, width)
                ctx = torch.randn(shape) * init_std
            names = [n.replace("_", " ") for n in classnames]
            ids = backbone.tokenize([" ".join(["X"] * n_ctx) + " " + n + "." for n in names])
            eot = backbone.eot_positions(ids)
            length = int(eot.max()) + 1  # causal tower: padding after the last EOT never reaches a pooled token
            emb = backbone.token_embedding(ids[:, :length]).float()
            name_ids = backbone.tokenize(names)
            name_lens = (backbone.eot_positions(name_ids) - 1).tolist()
        self.n_ctx, self.csc, self.position = n_ctx, csc and not ctx_init, position
        self.ctx = nn.Parameter(ctx)
        self.register_buffer("prefix", emb[:, :1].clone(), persistent=False)
        self.register_buffer("suffix", emb[:, 1 + n_ctx :].clone(), persistent=False)
        self.register_buffer("eot", eot.clone(), persistent=False)
        self.name_lens = [int(n) for n in name_lens]

    def prompts(self, ctx: Tensor, classes: Tensor | None = None) -> Tensor:
        """(C', L, W) prompt embeddings of `classes` (None: all) with context `ctx` ((M, W) or (C, M, W))."""
        prefix, suffix = self.prefix, self.suffix
        if classes is not None:
            prefix, suffix = prefix[classes], suffix[classes]
            if ctx.dim() == 3:
                ctx = ctx[classes]
        c = prefix.shape[0]
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(c, -1, -1)
        if self.position == "end":
            return torch.cat([prefix, ctx, suffix], dim=1)
        lens = [self.name_lens[i] for i in (classes.tolist() if classes is not None else range(c))]
        half = self.n_ctx // 2
        rows = []
        for i, n in enumerate(lens):
            name, rest = suffix[i : i + 1, :n], suffix[i : i + 1, n:]
            if self.position == "middle":
                parts = [prefix[i : i + 1], ctx[i : i + 1, :half], name, ctx[i : i + 1, half:], rest]
            else:  # front
                parts = [prefix[i : i + 1], name, ctx[i : i + 1], rest]
            rows.append(torch.cat(parts, dim=1))
        return torch.cat(rows)

    def eot_of(self, classes: Tensor | None = None) -> Tensor:
        return self.eot if classes is None else self.eot[classes]


class _PromptMethod(Method):
    """What CoOp and CoCoOp share: the prompt learner, the cached-view spec, base-class training."""

    inputs = "features"

    def __init__(self, cfg: Any, backbone: Backbone, info: TaskInfo, csc: bool = False, position: str = "end") -> None:
        super().__init__(cfg, backbone, info)
        self.scale = logit_scale(cfg.logit_scale, backbone)
        self.prompt_learner = PromptLearner(backbone, list(info.classnames), cfg.n_ctx, cfg.ctx_init, cfg.init_std,
                                            csc, position)
        base = info.base_classes if info.base_classes is not None else list(range(info.num_classes))
        self.register_buffer("train_classes", torch.as_tensor(base, dtype=torch.long), persistent=False)
        counts = torch.as_tensor(info.class_counts, dtype=torch.float64)[self.train_classes]
        self.loss_fn = build_loss(cfg.loss, counts.clamp_min(1))
        self._trained_on_subset = len(base) < info.num_classes

    def feature_spec(self) -> FeatureSpec:
        return FeatureSpec(tensors=("proj",), views=self.cfg.views, per=self.cfg.per, augment=COOP_AUG)

    def _loss(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """(loss over the training classes, full (B, C) logits with -inf for the classes not trained on)."""
        if not self._trained_on_subset:
            return self.loss_fn(logits, labels), logits
        remap = torch.full((self.num_classes,), -1, dtype=torch.long, device=labels.device)
        remap[self.train_classes] = torch.arange(len(self.train_classes), device=labels.device)
        target = remap[labels]
        if (target < 0).any():
            raise RuntimeError("a training label is outside the base classes the prompts were built for")
        full = logits.new_full((logits.shape[0], self.num_classes), float("-inf"))
        full[:, self.train_classes] = logits
        return self.loss_fn(logits, target), full

    def text_features(self, ctx: Tensor, classes: Tensor | None = None) -> Tensor:
        """(C', D) L2-normalised text features of `classes` with context `ctx`."""
        pl = self.prompt_learner
        feats = self.backbone.encode_text_embeddings(pl.prompts(ctx, classes), pl.eot_of(classes))
        return F.normalize(feats.float(), dim=-1)


@register_method("coop")
class CoOp(_PromptMethod):
    """CoOp: M learned context vectors before the class name (frozen CLIP), CE; trains on cached views."""

    Config = CoOpConfig

    def __init__(self, cfg: CoOpConfig, backbone: Backbone, info: TaskInfo) -> None:
        super().__init__(cfg, backbone, info, cfg.csc, cfg.class_token_position)
        self._text_cache: tuple[int, Tensor] | None = None

    def train_config(self, train: TrainConfig) -> TrainConfig:
        epochs = coop_epochs(self.info.shots) if self.cfg.epochs_by_shots else None
        if epochs is None:
            return train
        return dataclasses.replace(train, epochs=epochs, warmup_epochs=min(train.warmup_epochs, epochs))

    def all_text_features(self) -> Tensor:
        """Every class's text feature; cached while the context is unchanged and no gradient is needed."""
        ctx = self.prompt_learner.ctx
        if self.training or torch.is_grad_enabled():
            return self.text_features(ctx)
        key = ctx._version
        if self._text_cache is None or self._text_cache[0] != key or self._text_cache[1].device != ctx.device:
            self._text_cache = (key, self.text_features(ctx))
        return self._text_cache[1]

    def forward(self, inputs: Inputs, labels: Tensor | None = None) -> Output:
        img = F.normalize(self.encode(inputs)["proj"].float(), dim=-1)
        if labels is None:
            return Output(self.scale * img @ self.all_text_features().t())
        text = self.text_features(self.prompt_learner.ctx, self.train_classes if self._trained_on_subset else None)
        loss, logits = self._loss(self.scale * img @ text.t(), labels)
        return Output(logits, loss)

    def extra_results(self) -> dict[str, Any]:
        return {"n_ctx": self.prompt_learner.n_ctx, "csc": self.prompt_learner.csc, "ctx_init": self.cfg.ctx_init,
                "class_token_position": self.cfg.class_token_position, "trained_classes": len(self.train_classes)}


@register_method("cocoop")
class CoCoOp(_PromptMethod):
    """CoCoOp: CoOp's context plus a per-image shift from a meta-net of the image feature (frozen CLIP)."""

    Config = CoCoOpConfig

    def __init__(self, cfg: CoCoOpConfig, backbone: Backbone, info: TaskInfo) -> None:
        super().__init__(cfg, backbone, info)
        dim = backbone.embed_dim
        self.meta_net = nn.Sequential(nn.Linear(dim, dim // 16), nn.ReLU(), nn.Linear(dim // 16, backbone.text_width))

    def image_bias(self, img: Tensor) -> Tensor:
        """(B, text_width) shift pi(x) added to every context vector, from the L2-normalised image feature."""
        return self.meta_net(img)

    def logits_for(self, img: Tensor, classes: Tensor | None) -> Tensor:
        """(B, C') logits: for each image, its own prompts (ctx + pi(x)) for the classes."""
        pl = self.prompt_learner
        n_cls = pl.prefix.shape[0] if classes is None else len(classes)
        ctx = pl.ctx.unsqueeze(0) + self.image_bias(img).unsqueeze(1)  # (B, M, W)
        per_chunk = max(1, self.cfg.eval_chunk // max(n_cls, 1))
        out = []
        for start in range(0, img.shape[0], per_chunk):
            rows = []
            for b in range(start, min(start + per_chunk, img.shape[0])):
                rows.append(pl.prompts(ctx[b], classes))
            emb = torch.cat(rows)  # (b * C', L, W)
            eot = pl.eot_of(classes).repeat(len(rows))
            text = F.normalize(self.backbone.encode_text_embeddings(emb, eot).float(), dim=-1)
            text = text.view(len(rows), n_cls, -1)
            out.append(self.scale * torch.einsum("bd,bcd->bc", img[start : start + len(rows)], text))
        return torch.cat(out)

    def forward(self, inputs: Inputs, labels: Tensor | None = None) -> Output:
        img = F.normalize(self.encode(inputs)["proj"].float(), dim=-1)
        if labels is None:
            return Output(self.logits_for(img, None))
        logits = self.logits_for(img, self.train_classes if self._trained_on_subset else None)
        loss, full = self._loss(logits, labels)
        return Output(full, loss)

    def extra_results(self) -> dict[str, Any]:
        return {"n_ctx": self.prompt_learner.n_ctx, "ctx_init": self.cfg.ctx_init,
                "meta_net_params": sum(p.numel() for p in self.meta_net.parameters()),
                "trained_classes": len(self.train_classes)}
