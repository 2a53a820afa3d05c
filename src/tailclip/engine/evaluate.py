"""Inference over a split: batches of images (optional test-time crop ensembling) or of cached eval-view
features through the method, as its `inputs` declares; mixed precision; every declared head's logits too.

Under torchrun each rank predicts a contiguous shard of the split (no padding, so no duplicated images) and
the shards are gathered and put back in split order on every rank."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..contract import FitContext, Method, Predictions
from ..data.base import LabeledImages, collate_skip_none
from ..runtime import autocast, distributed, iter_batches

log = logging.getLogger(__name__)


def label_space(task: Any, split: str, base_scoring: str = "base") -> list[int] | None:
    """The classes a split's images are scored among (task.meta["label_spaces"]); None: every class. With
    base_scoring="all" (Candle's released evaluation) base test images are scored among every class."""
    if split == "test_base" and base_scoring == "all":
        return None
    return task.meta.get("label_spaces", {}).get(split)


def in_label_space(task: Any, split: str, preds: Predictions, base_scoring: str = "base") -> Predictions:
    """Base-to-new protocol: a split's images scored among its own classes only (`label_space`: base images among
    base classes, or all classes with base_scoring="all"; new among new), columns and labels renumbered; other
    splits unchanged."""
    space = label_space(task, split, base_scoring)
    if space is None:
        return preds
    cols = torch.as_tensor(space, dtype=torch.long)
    remap = torch.full((preds.logits.shape[1],), -1, dtype=torch.long)
    remap[cols] = torch.arange(len(cols))
    labels = remap[preds.labels]
    if (labels < 0).any():
        raise RuntimeError(f"split {split!r} holds labels outside its label space")
    return Predictions(preds.logits[:, cols], labels, preds.indices, preds.skipped,
                       {h: v[:, cols] for h, v in preds.heads.items()})


def image_loader(
    ctx: FitContext, split: str, transform, batch_size: int, shuffle: bool = False,
    indices: np.ndarray | None = None, persistent: bool = False,
) -> tuple[torch.utils.data.DataLoader, LabeledImages]:
    """Loader over a split (or the given positions of it); items are (image, label, position in the split).
    `persistent`: the workers outlive an epoch (for a loader iterated again, e.g. every epoch's validation)."""
    dataset = LabeledImages(ctx.task.split(split), transform, on_bad_image=ctx.cfg.data.on_bad_image)
    source = dataset if indices is None else torch.utils.data.Subset(dataset, indices.tolist())
    loader = torch.utils.data.DataLoader(
        source,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=ctx.cfg.data.num_workers,
        persistent_workers=persistent and ctx.cfg.data.num_workers > 0,
        collate_fn=collate_skip_none,
        pin_memory=ctx.device.type == "cuda",
        generator=torch.Generator(),  # own generator: evaluation never consumes the global (training) RNG
    )
    return loader, dataset


def ensemble_logits(forward: Callable[[Tensor], Tensor], images: Tensor) -> Tensor:
    """Logits of a batch; a (B, crops, 3, H, W) batch (five/ten-crop TTE) gives the mean logits over crops."""
    if images.ndim == 5:
        b, n = images.shape[:2]
        return forward(images.flatten(0, 1)).float().view(b, n, -1).mean(dim=1)
    return forward(images).float()


def _stack_outputs(method: Method, images: Tensor) -> Tensor:
    """(B, 1 + heads, C): the logits, then each declared head's, so TTE averages every head the same way."""
    heads = method.eval_heads()

    def forward(x: Tensor) -> Tensor:
        out = method(x)
        return torch.cat([out.logits.float()] + [out.heads[h].float() for h in heads], dim=-1)

    return ensemble_logits(forward, images).view(images.shape[0], 1 + len(heads), -1)


def predict_split(method: Method, ctx: FitContext, split: str) -> Predictions:
    """A split's logits as a run reports them: the method's own predictions when it computes them (GLA), else the
    engine's loop with the evaluation settings the method asks for (`Method.eval_config`)."""
    own = method.own_predictions(ctx, split)
    if own is not None:
        return own
    evaluation = method.eval_config(ctx.cfg.eval)
    if evaluation != ctx.cfg.eval:
        ctx = dataclasses.replace(ctx, cfg=dataclasses.replace(ctx.cfg, eval=evaluation))
    return predict(method, ctx, split)


def predict(method: Method, ctx: FitContext, split: str, tte: str | None = None, desc: str | None = None,
            loaders: dict | None = None) -> Predictions:
    """The engine's loop: images through the method, or the split's cached features for feature methods.
    `loaders`: a dict the caller keeps to reuse image loaders (and their workers) across calls."""
    if method.inputs == "features":
        return predict_features(method, ctx, split, desc)
    return predict_images(method, ctx, split, tte, desc, loaders)


@torch.no_grad()
def predict_features(method: Method, ctx: FitContext, split: str, desc: str | None = None) -> Predictions:
    """Logits of a features method on `split` from its cached eval-view features (the tensors its
    `feature_spec()` names, each (B, ...)), in eval.batch_size chunks."""
    fs = method.cached_features(ctx, split)
    names = method.feature_spec().tensors
    data = {k: fs.get(k) for k in names}
    heads = method.eval_heads()
    bs = ctx.cfg.eval.batch_size
    was_training = method.training
    method.eval()
    parts: list[Tensor] = []
    try:
        for i in range(0, len(fs), bs):
            batch = {k: v[i : i + bs].to(ctx.device, torch.float32) for k, v in data.items()}
            with autocast(ctx.device, ctx.cfg.eval.precision):
                out = method(batch)
            parts.append(torch.stack([out.logits.float()] + [out.heads[h].float() for h in heads], dim=1).cpu())
    finally:
        method.train(was_training)
    stacked = torch.cat(parts) if parts else torch.zeros(0, 1 + len(heads), method.num_classes)
    return Predictions(stacked[:, 0].contiguous(), fs.labels, fs.indices, list(fs.skipped),
                       {h: stacked[:, 1 + j].contiguous() for j, h in enumerate(heads)})


@torch.no_grad()
def predict_images(
    method: Method, ctx: FitContext, split: str, tte: str | None = None, desc: str | None = None,
    loaders: dict | None = None,
) -> Predictions:
    """Logits of `method` on every image of `split` (averaged over crops when TTE is on; `tte` overrides
    eval.tte, e.g. "none" for the per-epoch validation pass). The transform is the method's own
    `eval_transform(tte)` when it gives one, else the backbone's preprocessing with the TTE crops."""
    from ..data.transforms import eval_transform, tte_transform

    distributed.init_distributed(ctx.device)
    pre = method.backbone.preprocess
    tte = ctx.cfg.eval.tte if tte is None else tte
    transform = method.eval_transform(tte)
    if transform is None:
        transform = eval_transform(pre) if tte == "none" else tte_transform(pre, tte)
    n = len(ctx.task.split(split))
    world = distributed.world_size()
    mine = distributed.shard(np.arange(n), distributed.rank(), world) if world > 1 else None
    key = (split, tte)
    if loaders is not None and key in loaders:
        loader, dataset = loaders[key]
    else:
        loader, dataset = image_loader(ctx, split, transform, ctx.cfg.eval.batch_size, indices=mine,
                                       persistent=loaders is not None)
        if loaders is not None:
            loaders[key] = loader, dataset
    was_training = method.training
    method.eval()
    all_logits, all_labels, all_idx = [], [], []
    try:
        for images, labels, idx in iter_batches(loader, desc or f"eval {split}"):
            images = images.to(ctx.device, non_blocking=True)
            with autocast(ctx.device, ctx.cfg.eval.precision):
                logits = _stack_outputs(method, images)
            all_logits.append(logits.cpu())
            all_labels.append(labels)
            all_idx.append(idx)
    finally:
        method.train(was_training)
    c = method.num_classes
    local = (
        torch.cat(all_logits) if all_logits else torch.zeros(0, 1 + len(method.eval_heads()), c),
        torch.cat(all_labels) if all_labels else torch.zeros(0, dtype=torch.long),
        torch.cat(all_idx) if all_idx else torch.zeros(0, dtype=torch.long),
    )
    shards = distributed.all_gather_objects(local)
    logits = torch.cat([s[0] for s in shards])
    labels = torch.cat([s[1] for s in shards])
    idx = torch.cat([s[2] for s in shards])
    if idx.numel() == 0:
        raise RuntimeError(f"no image of split {split!r} could be evaluated")
    order = idx.argsort()
    logits, labels, idx = logits[order], labels[order], idx[order]
    seen = set(idx.tolist())
    skipped = sorted({dataset.split.images.ident(i) for i in range(n) if i not in seen})
    heads = {h: logits[:, 1 + j].contiguous() for j, h in enumerate(method.eval_heads())}
    return Predictions(logits[:, 0].contiguous(), labels, idx, skipped, heads)
