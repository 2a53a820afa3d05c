"""The device a run uses, its autocast policy, and the progress loop over a DataLoader."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from tqdm.auto import tqdm

from . import distributed


def resolve_device(name: str) -> torch.device:
    """auto: CUDA when available (under torchrun: this rank's GPU, cuda:LOCAL_RANK), else CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            info = distributed.env_info()
            return torch.device(f"cuda:{info.local_rank}" if info.enabled else "cuda")
        return torch.device("cpu")
    return torch.device(name)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """fp32: nothing; amp: fp16 on CUDA (bf16 on CPU, which has no fast fp16); amp_bf16: bf16; fp16_weights
    (training only): fp16 on every device, as the released fp16 models compute."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=autocast_dtype(device, precision))


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype:
    if precision == "fp32":
        return torch.float32
    if precision == "fp16_weights":
        return torch.float16
    return torch.bfloat16 if precision == "amp_bf16" or device.type == "cpu" else torch.float16


def iter_batches(loader: torch.utils.data.DataLoader, desc: str) -> Iterator[tuple[torch.Tensor, ...]]:
    """The loader's batches with a progress bar on the main process; batches in which every image was a skipped
    bad image (None) are left out."""
    disable = None if distributed.is_main_process() else True
    for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=disable):
        if batch is None:
            continue
        yield batch
