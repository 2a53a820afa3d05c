"""Inference over a split: batches through the method, optional test-time crop ensembling, mixed precision."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from ..data.base import LabeledImages, collate_skip_none

if TYPE_CHECKING:
    from ..methods.base import FitContext, Method, Predictions

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """fp32: nothing; amp: fp16 on CUDA (bf16 on CPU, which has no fast fp16); amp_bf16: bf16."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "amp_bf16" or device.type == "cpu" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def image_loader(
    ctx: FitContext, split: str, transform, batch_size: int, shuffle: bool = False
) -> tuple[torch.utils.data.DataLoader, LabeledImages]:
    dataset = LabeledImages(ctx.task.split(split), transform, on_bad_image=ctx.cfg.data.on_bad_image)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=ctx.cfg.data.num_workers,
        collate_fn=collate_skip_none,
        pin_memory=ctx.device.type == "cuda",
    )
    return loader, dataset


def iter_batches(loader: torch.utils.data.DataLoader, desc: str) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=None):
        if batch is None:  # every item of this batch was a skipped bad image
            continue
        yield batch


@torch.no_grad()
def predict_images(method: Method, ctx: FitContext, split: str) -> Predictions:
    """Logits of `method` on every image of `split` (averaged over crops when eval.tte is set)."""
    from ..data.transforms import eval_transform, tte_transform
    from ..methods.base import Predictions

    pre = method.backbone.preprocess
    tte = ctx.cfg.eval.tte
    transform = eval_transform(pre) if tte == "none" else tte_transform(pre, tte)
    loader, dataset = image_loader(ctx, split, transform, ctx.cfg.eval.batch_size)
    method.eval()
    all_logits, all_labels, all_idx = [], [], []
    for images, labels, idx in iter_batches(loader, f"eval {split}"):
        images = images.to(ctx.device, non_blocking=True)
        with autocast(ctx.device, ctx.cfg.eval.precision):
            if images.ndim == 5:  # (B, crops, 3, H, W): average logits over crops
                b, n = images.shape[:2]
                logits = method(images.flatten(0, 1)).logits.float().view(b, n, -1).mean(dim=1)
            else:
                logits = method(images).logits.float()
        all_logits.append(logits.cpu())
        all_labels.append(labels)
        all_idx.append(idx)
    if not all_logits:
        raise RuntimeError(f"no image of split {split!r} could be evaluated")
    skipped = sorted(set(dataset.split.images.ident(i) for i in set(range(len(dataset))) - set(torch.cat(all_idx).tolist())))
    return Predictions(torch.cat(all_logits), torch.cat(all_labels), torch.cat(all_idx), skipped)
