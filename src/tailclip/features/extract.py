"""Computing features with a backbone and routing them through the cache.

`split_features(...)` is what frozen-encoder methods call: it returns the (memory-mapped, cached) features
of one split and view, extracting them on a miss. `extract_from_config` backs `tailclip extract`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .cache import CacheKey, FeatureCache, FeatureSet

if TYPE_CHECKING:
    from ..backbones.base import Backbone, Preprocess
    from ..config import RunConfig
    from ..data.base import Task

log = logging.getLogger(__name__)

# Tip-Adapter's cache augmentation: RandomResizedCrop(scale 0.5-1, bicubic) + horizontal flip.
AUG_SCALE = (0.5, 1.0)
AUG_SEED = 0  # view k is drawn with seed AUG_SEED + k, so augmented views are reproducible and cacheable


def backbone_fingerprint(backbone: Backbone) -> str:
    """The backbone's own `fingerprint` when it has one; else a hash of its spec and its weights (computed
    once per backbone object, which keeps random-weight test models distinct)."""
    fp = getattr(backbone, "fingerprint", None)
    if isinstance(fp, str) and fp:
        return fp
    cached = getattr(backbone, "_tailclip_fingerprint", None)
    if cached:
        return cached
    h = hashlib.sha256(json.dumps(getattr(backbone, "spec", {}), sort_keys=True, default=str).encode())
    for name, tensor in sorted(backbone.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                 if tensor.numel() else b"")
    fp = h.hexdigest()[:32]
    try:
        object.__setattr__(backbone, "_tailclip_fingerprint", fp)
    except (AttributeError, TypeError):  # pragma: no cover - modules that refuse new attributes
        log.debug("could not memoise the fingerprint on %s", type(backbone).__name__)
    return fp


def view_transform(pre: Preprocess, view: str) -> tuple[Callable[[Any], Tensor], str]:
    """(transform, description) for a view: "eval" is the backbone's eval transform, "aug<k>" an augmented one."""
    if view == "eval":
        from ..data.transforms import eval_transform

        return eval_transform(pre), "eval"
    if not view.startswith("aug") or not view[3:].isdigit():
        raise ValueError(f"unknown feature view {view!r}; use 'eval' or 'aug<k>'")
    from torchvision import transforms as T

    interp = getattr(T.InterpolationMode, pre.interpolation.upper(), T.InterpolationMode.BICUBIC)
    tf = T.Compose([
        T.RandomResizedCrop(pre.image_size, scale=AUG_SCALE, interpolation=interp),
        T.RandomHorizontalFlip(p=0.5),
        T.Lambda(lambda im: im.convert("RGB")),
        T.ToTensor(),
        T.Normalize(pre.mean, pre.std),
    ])
    seed = AUG_SEED + int(view[3:])
    return tf, f"rrc{pre.image_size}(scale={AUG_SCALE},{pre.interpolation})+hflip,seed={seed}"


@torch.no_grad()
def _batches(backbone: Backbone, loader: torch.utils.data.DataLoader, device: torch.device, precision: str,
             desc: str) -> Iterator[dict[str, Tensor]]:
    from ..engine.evaluate import autocast, iter_batches

    was_training = backbone.training
    backbone.eval()
    try:
        for images, labels, idx in iter_batches(loader, desc):
            with autocast(device, precision):
                out = backbone.encode_image(images.to(device, non_blocking=True))
            yield {"proj": out.proj.float(), "pre_proj": out.pre_proj.float(), "labels": labels, "indices": idx}
    finally:
        backbone.train(was_training)


def split_features(
    backbone: Backbone,
    task: Task,
    split: str,
    *,
    view: str = "eval",
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    precision: str = "fp32",
    num_workers: int = 0,
    on_bad_image: str = "error",
    cache: FeatureCache | str | None = None,
) -> FeatureSet:
    """Features of `task`'s `split` under `view`, from the cache or extracted into it."""
    from ..data.base import LabeledImages, collate_skip_none

    device = torch.device(device)
    if bool(getattr(backbone, "hooks", None)):
        raise RuntimeError("a tuner is attached to the backbone: its features are not the frozen ones the cache keys")
    cache = cache if isinstance(cache, FeatureCache) else FeatureCache(cache)
    data_split = task.split(split)
    transform, desc = view_transform(backbone.preprocess, view)
    key = CacheKey(
        backbone=backbone_fingerprint(backbone),
        dataset=task.name,
        split=split,
        split_fingerprint=data_split.fingerprint(),
        view=view,
        preprocess=backbone.preprocess.to_dict(),
        transform=desc,
        precision=precision,
    )
    dataset = LabeledImages(data_split, transform, on_bad_image=on_bad_image)

    def build() -> Iterator[dict[str, Tensor]]:
        gen = torch.Generator().manual_seed(AUG_SEED + (int(view[3:]) if view != "eval" else 0))
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate_skip_none,
            generator=gen, pin_memory=device.type == "cuda",
        )
        if view != "eval" and num_workers == 0:  # random transforms draw from the global RNG in the main process
            state = torch.random.get_rng_state()
            torch.manual_seed(AUG_SEED + int(view[3:]))
            try:
                yield from _batches(backbone, loader, device, precision, f"features {task.name}/{split}/{view}")
            finally:
                torch.random.set_rng_state(state)
        else:
            yield from _batches(backbone, loader, device, precision, f"features {task.name}/{split}/{view}")

    return cache.get_or_build(key, build, skipped=lambda: sorted(set(dataset.bad)))


def method_features(method: Any, ctx: Any, split: str, view: str = "eval") -> FeatureSet:
    """`split_features` with the run's settings (device, eval batch size/precision, workers, bad-image policy)
    and the method config's `feature_cache` folder, if any."""
    cfg: RunConfig = ctx.cfg
    if cfg.eval.tte != "none" and split != "train" and not getattr(method, "_warned_tte", False):
        log.warning("%s works from cached eval-view features: eval.tte=%s is not applied", cfg.method, cfg.eval.tte)
        method._warned_tte = True
    return split_features(
        method.backbone, ctx.task, split, view=view, device=ctx.device, batch_size=cfg.eval.batch_size,
        precision=cfg.eval.precision, num_workers=cfg.data.num_workers, on_bad_image=cfg.data.on_bad_image,
        cache=getattr(method.cfg, "feature_cache", None),
    )


def extract_from_config(cfg: RunConfig, splits: list[str], views: int = 0) -> list[Path]:
    """`tailclip extract`: features of each split (eval view) plus `views` augmented views of the train
    split, for the model and dataset of `cfg`. Returns the cache entry folders."""
    from ..backbones import create_backbone
    from ..data.registry import build_task
    from ..engine.evaluate import resolve_device

    device = resolve_device(cfg.device)
    backbone = create_backbone(cfg.model.name, cache_dir=cfg.model.cache_dir, device=device)
    task = build_task(cfg.data)
    method_cfg = cfg.method_config()
    cache = FeatureCache(getattr(method_cfg, "feature_cache", None))
    jobs = [(s, "eval") for s in splits if s in task.splits]
    missing = [s for s in splits if s not in task.splits]
    if missing:
        log.warning("dataset %s has no split(s) %s; skipped", task.name, ", ".join(missing))
    if views and "train" in task.splits:
        jobs += [("train", f"aug{k}") for k in range(views)]
    out = []
    for split, view in jobs:
        fs = split_features(backbone, task, split, view=view, device=device, batch_size=cfg.eval.batch_size,
                            precision=cfg.eval.precision, num_workers=cfg.data.num_workers,
                            on_bad_image=cfg.data.on_bad_image, cache=cache)
        assert fs.path is not None
        out.append(fs.path)
    return out
