"""Local weight lookup: Hugging Face cache folders, offline detection, resolving open_clip pretrained files, the
missing-weights messages, and reading what a checkpoint file is (OpenAI TorchScript archive, which activation
its weights were trained with).

Weights are looked up locally first (open_clip's pretrained config -> Hugging Face cache file or URL cache);
a download is attempted only when not offline, and any failure becomes a WeightsNotFoundError that names
the missing file and how to point at a local copy, never a network stack trace."""

from __future__ import annotations

import logging
import os
import socket
import zipfile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ..errors import WeightsNotFoundError

log = logging.getLogger(__name__)

HOW_TO_POINT = (
    "To use a local copy, download it and pass `model.name=ARCH@/path/to/file` (a checkpoint file), "
    "`model.name=local-dir:DIR` (a folder with open_clip_config.json + weights) or `model.cache_dir=DIR` "
    "(a Hugging Face cache or a plain folder holding the file)."
)


# --------------------------------------------------------------------------------------------------
# where files may be, and whether we may download
# --------------------------------------------------------------------------------------------------
def _env_true(var: str) -> bool:
    return os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")


def is_offline(host: str = "huggingface.co") -> bool:
    """Offline when the user says so (HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE, TAILCLIP_OFFLINE) or when `host`
    cannot be reached within a few seconds: then we fail at once with a clear message instead of letting a
    download library retry for half a minute."""
    if any(_env_true(v) for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TAILCLIP_OFFLINE")):
        return True
    try:
        with socket.create_connection((host, 443), timeout=3):
            return False
    except OSError:
        return True


def hf_cache_dirs(cache_dir: str | None) -> list[Path]:
    """Where Hugging Face files may already be: `cache_dir` (an HF cache), then the default HF hub cache
    (read from the environment at call time, so HF_HOME / HF_HUB_CACHE set after import still count)."""
    dirs = [Path(cache_dir).expanduser()] if cache_dir else []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(Path(os.environ["HF_HUB_CACHE"]).expanduser())
    else:
        home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
        dirs.append(Path(home).expanduser() / "hub")
    return dirs


def cached_hf_file(repo: str, filename: str, cache_dir: str | None) -> str | None:
    """Local path of `filename` of HF repo `repo` in any cache of `hf_cache_dirs` (or a plain `cache_dir`)."""
    from huggingface_hub import try_to_load_from_cache

    for folder in hf_cache_dirs(cache_dir):
        found = try_to_load_from_cache(repo, filename, cache_dir=str(folder))
        if isinstance(found, str) and os.path.isfile(found):
            return found
    if cache_dir and (Path(cache_dir).expanduser() / filename).is_file():  # a plain folder holding the file
        return str(Path(cache_dir).expanduser() / filename)
    return None


def fetch_hf_file(name: str, repo: str, filenames: list[str], cache_dir: str | None) -> str:
    """The first of `filenames` from HF repo `repo`: local cache first, then a download unless offline."""
    for fname in filenames:
        found = cached_hf_file(repo, fname, cache_dir)
        if found:
            return found
    error = ""
    if not is_offline():
        from huggingface_hub import hf_hub_download

        for fname in filenames:
            try:
                return hf_hub_download(repo_id=repo, filename=fname, cache_dir=cache_dir)
            except Exception as e:  # noqa: BLE001 - reported below as a missing file, not a stack trace
                error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    raise WeightsNotFoundError(missing_message(name, [f"{' or '.join(filenames)} from Hugging Face repo {repo}"],
                                               cache_dir, error))


def resolve_pretrained_file(name: str, pcfg: dict[str, Any], cache_dir: str | None) -> str:
    """Local path of an open_clip pretrained checkpoint (pretrained cfg: hf_hub 'org/repo/[file]' and/or url)."""
    from open_clip.constants import HF_WEIGHTS_NAME
    from open_clip.pretrained import _get_safe_alternatives

    if pcfg.get("file"):
        if os.path.isfile(pcfg["file"]):
            return pcfg["file"]
        raise WeightsNotFoundError(missing_message(name, [pcfg["file"]], cache_dir))
    wanted: list[str] = []
    repo, hf_names = "", []
    if pcfg.get("hf_hub"):
        repo, fname = os.path.split(pcfg["hf_hub"])  # 'org/repo/' (default file) or 'org/repo/file.bin'
        fname = fname or HF_WEIGHTS_NAME
        hf_names = [*_get_safe_alternatives(fname), fname]
        for fn in hf_names:
            found = cached_hf_file(repo, fn, cache_dir)
            if found:
                return found
        wanted.append(f"{' or '.join(hf_names)} from Hugging Face repo {repo}")
    url = pcfg.get("url", "")
    if url:
        fname = os.path.basename(urlparse(url).path)
        for folder in [cache_dir, os.path.expanduser("~/.cache/clip")]:
            if folder and (Path(folder).expanduser() / fname).is_file():
                return str(Path(folder).expanduser() / fname)
        wanted.append(url)
    error = ""
    if repo and not is_offline():
        from huggingface_hub import hf_hub_download

        for fn in hf_names:
            try:
                return hf_hub_download(repo_id=repo, filename=fn, cache_dir=cache_dir)
            except Exception as e:  # noqa: BLE001
                error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    elif url and not is_offline(urlparse(url).hostname or ""):
        from open_clip.pretrained import download_pretrained_from_url

        try:
            return download_pretrained_from_url(url, cache_dir=cache_dir)
        except Exception as e:  # noqa: BLE001
            error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    raise WeightsNotFoundError(missing_message(name, wanted, cache_dir, error))


def missing_message(name: str, wanted: list[str], cache_dir: str | None, error: str = "") -> str:
    """What is missing, where we looked, why nothing was downloaded, and how to point at a local copy."""
    where = ", ".join(str(d) for d in hf_cache_dirs(cache_dir))
    why = f"download failed ({error})" if error else "offline (no download attempted)"
    return (
        f"weights for {name!r} are not available locally: missing {'; or '.join(wanted)} "
        f"(looked in {where}; {why}). {HOW_TO_POINT}"
    )


def find_checkpoint_in_dir(folder: Path) -> Path | None:
    """The weights file of a local-dir: folder, preferring open_clip's own names and safetensors."""
    preferred = [
        "open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
        "open_clip_pytorch_model.pth", "model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth",
    ]
    for fname in preferred:
        if (folder / fname).is_file():
            return folder / fname
    found = sorted(p for ext in ("*.safetensors", "*.bin", "*.pth", "*.pt") for p in folder.glob(ext))
    if len(found) > 1:
        log.warning("several checkpoints in %s: %s; using %s", folder, [p.name for p in found], found[0].name)
    return found[0] if found else None


# --------------------------------------------------------------------------------------------------
# what a checkpoint file holds
# --------------------------------------------------------------------------------------------------
# keys every OpenAI CLIP state dict has (ViT and ModifiedResNet towers alike); open_clip's CLIP class keeps
# this layout, so these keys alone tell "OpenAI layout" but not "OpenAI weights"
_OPENAI_LAYOUT_KEYS = ("token_embedding.weight", "positional_embedding", "text_projection", "ln_final.weight",
                       "visual.conv1.weight")


def is_torchscript_archive(path: Path | str) -> bool:
    """A TorchScript (JIT) archive, the format OpenAI released CLIP in (torch.load's own test: constants.pkl)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.rsplit("/", 1)[-1] == "constants.pkl" for n in z.namelist())


def _state_dict_keys(path: Path) -> set[str]:
    """Parameter names in a checkpoint file without keeping its tensors (safetensors header; torch files mmap'd)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
    else:
        import torch

        try:
            try:
                ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) torch files cannot be memory-mapped
                ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure means "not a state dict we can read"
            raise WeightsNotFoundError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e)[:200]}") from None
        if isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict):
            ckpt = ckpt["state_dict"]
        keys = set(ckpt) if isinstance(ckpt, dict) else set()
    return {k.removeprefix("module.") for k in keys}


def _released_quick_gelu(arch: str, path: Path) -> bool | None:
    """QuickGELU flag of the open_clip release `path` recognisably is (its URL file name, or a file inside that
    release's Hugging Face cache folder); None when it is none of them."""
    import open_clip

    where = str(path.expanduser().absolute())
    for a in (arch, f"{arch}-quickgelu"):
        for tag in open_clip.list_pretrained_tags_by_model(a):
            pcfg = open_clip.get_pretrained_cfg(a, tag)
            url_file = os.path.basename(urlparse(pcfg.get("url") or "").path)
            repo = os.path.split(pcfg.get("hf_hub") or "")[0]
            hf_folder = f"{os.sep}models--{repo.replace('/', '--')}{os.sep}" if repo else None
            if (url_file and path.name == url_file) or (hf_folder and hf_folder in where):
                log.info("%s is open_clip's %s@%s release", path, a, tag)
                return bool(pcfg.get("quick_gelu", False))
    return None


def checkpoint_quick_gelu(arch: str, path: Path) -> bool | None:
    """Whether the weights in `path` for open_clip architecture `arch` were trained with QuickGELU.

    True:  a TorchScript archive (how OpenAI released CLIP, the file `ARCH@openai` loads from its URL), or a
           recognisable open_clip release trained with QuickGELU (OpenAI's, DFN, MetaCLIP).
    False: a layout OpenAI never shipped (e.g. a custom text tower), a recognisable GELU release, or an
           architecture none of whose releases used QuickGELU.
    None:  cannot be told: an OpenAI-layout state dict (open_clip keeps OpenAI's key names, so GELU and QuickGELU
           weights look alike) for an architecture that has QuickGELU releases."""
    import open_clip

    if is_torchscript_archive(path):
        return True
    if path.suffix in (".npz", ".npy"):  # big_vision (SigLIP) weights: never OpenAI's
        return False
    keys = _state_dict_keys(path)
    if not set(_OPENAI_LAYOUT_KEYS) <= keys:
        return False
    released = _released_quick_gelu(arch, path)
    if released is not None:
        return released
    tags = [(a, t) for a in (arch, f"{arch}-quickgelu") for t in open_clip.list_pretrained_tags_by_model(a)]
    if not any(open_clip.get_pretrained_cfg(a, t).get("quick_gelu", False) for a, t in tags):
        return False
    return None


__all__ = [
    "HOW_TO_POINT",
    "cached_hf_file",
    "checkpoint_quick_gelu",
    "fetch_hf_file",
    "find_checkpoint_in_dir",
    "hf_cache_dirs",
    "is_offline",
    "is_torchscript_archive",
    "missing_message",
    "resolve_pretrained_file",
]
