"""Prompt-template sets by name. A Task carries its default set; `DataConfig.templates` overrides it by name
(or by the path of a text file with one template per line), so prompt ensembles are part of the config."""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path
from types import ModuleType

from ..errors import ConfigError, UnknownNameError

log = logging.getLogger(__name__)


def _open_clip_metadata() -> ModuleType:
    """open_clip's zero_shot_metadata module, without importing open_clip itself (seconds of model code).

    The file has no imports of its own, so it is executed standalone when open_clip is not loaded yet.
    """
    if "open_clip.zero_shot_metadata" in sys.modules:
        return sys.modules["open_clip.zero_shot_metadata"]
    spec = importlib.util.find_spec("open_clip")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        path = Path(loc) / "zero_shot_metadata.py"
        if path.is_file():
            sub = importlib.util.spec_from_file_location("_tailclip_open_clip_zero_shot_metadata", path)
            assert sub is not None and sub.loader is not None
            module = importlib.util.module_from_spec(sub)
            sub.loader.exec_module(module)
            return module
    import open_clip.zero_shot_metadata as module  # unusual install: fall back to the normal import

    return module


_META = _open_clip_metadata()
# open_clip ships the templates as lambdas; filling them with "{}" gives format strings.
IMAGENET80: list[str] = [t("{}") for t in _META.OPENAI_IMAGENET_TEMPLATES]
# The 7-template subset Tip-Adapter / CoOp-era ensembles use on ImageNet (open_clip's SIMPLE_IMAGENET_TEMPLATES).
IMAGENET7: list[str] = [t("{}") for t in _META.SIMPLE_IMAGENET_TEMPLATES]

# Sage (Peng, Zhang, Cheung), Appendix F: the 60 templates used to initialise the classifier, in the paper's order.
SAGE60: list[str] = [
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "an origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "an embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
]

# CoOp's CUSTOM_TEMPLATES (trainers/zsclip.py), keyed by our dataset names.
COOP_TEMPLATES: dict[str, str] = {
    "oxford_pets": "a photo of a {}, a type of pet.",
    "oxford_flowers": "a photo of a {}, a type of flower.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
    "dtd": "{} texture.",
    "eurosat": "a centered satellite photo of {}.",
    "stanford_cars": "a photo of a {}.",
    "food101": "a photo of {}, a type of food.",
    "sun397": "a photo of a {}.",
    "caltech101": "a photo of a {}.",
    "ucf101": "a photo of a person doing {}.",
    "imagenet": "a photo of a {}.",
}

TEMPLATE_SETS: dict[str, list[str]] = {
    "imagenet80": IMAGENET80,
    "imagenet7": IMAGENET7,
    "sage60": SAGE60,
    "photo": ["a photo of a {}."],
    **{f"coop_{name}": [template] for name, template in COOP_TEMPLATES.items()},
}


def _check(templates: list[str], source: str) -> list[str]:
    bad = [t for t in templates if t.count("{}") != 1]
    if bad or not templates:
        raise ConfigError(
            f"templates from {source} must each contain exactly one '{{}}' (class name slot); bad: {bad[:3]}"
        )
    return templates


def get_templates(name: str) -> list[str]:
    """Templates of a named set, or of a text file (one template with one `{}` per line, `#` comments)."""
    if name in TEMPLATE_SETS:
        return list(TEMPLATE_SETS[name])
    path = Path(name)
    if path.suffix == ".txt" and path.is_file():
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        return _check([ln for ln in lines if ln and not ln.startswith("#")], str(path))
    known = ", ".join(sorted(TEMPLATE_SETS))
    raise UnknownNameError(f"unknown template set {name!r}; known template sets: {known} (or a path to a .txt file)")


def resolve_templates(override: str | None, default: str) -> list[str]:
    """The templates a Task uses: the config's override when given, else the dataset's default set."""
    return get_templates(override if override else default)
