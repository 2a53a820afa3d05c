"""Captions for the pretraining corpus and prompt templates for the downstream tasks.

Captions vary in wording and in what they mention besides the class (background, size, position) so the text
tower has to pick the class words out of a sentence, as with web alt-text; the class itself ("red star") is
always named, so a contrastive model learns to align it.
"""

from __future__ import annotations

from .generator import BACKGROUNDS, COLOURS, SHAPES, RenderParams, class_attributes

CAPTION_TEMPLATES: tuple[str, ...] = (
    "a photo of a {c}.",
    "a {c}.",
    "a {c} on a {bg} background.",
    "a {size} {c}.",
    "a photo of a {size} {c}.",
    "a {c} in the {pos} of the picture.",
    "a picture of a {c}.",
    "a drawing of a {c}.",
    "a {colour} {shape} shape.",
    "there is a {c} here.",
    "{c}",
    "a {size} {c} on {bg}.",
    "an image showing a {c}.",
    "a {shape} coloured {colour}.",
)

# Prompt templates of the downstream tasks (the first is CLIP's standard one).
TASK_TEMPLATES: list[str] = [
    "a photo of a {}.",
    "a {}.",
    "a drawing of a {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
]


def _position(cx: float, cy: float, size: int = 32) -> str:
    col = ("left", "middle", "right")[min(int(cx / size * 3), 2)]
    row = ("top", "middle", "bottom")[min(int(cy / size * 3), 2)]
    if row == col == "middle":
        return "centre"
    if row == "middle":
        return col
    if col == "middle":
        return row
    return f"{row} {col}"


def make_captions(p: RenderParams) -> list[str]:
    """One caption per image of a pretraining-style batch, chosen by the image's own random draw."""
    out = []
    for j, label in enumerate(p.labels):
        s, c = class_attributes(int(label))
        shape, colour = SHAPES[s], COLOURS[c][0]
        tmpl = CAPTION_TEMPLATES[min(int(p.caption_draw[j] * len(CAPTION_TEMPLATES)), len(CAPTION_TEMPLATES) - 1)]
        size = "small" if p.radius[j] < 8.2 else ("large" if p.radius[j] > 9.8 else "medium")
        k = int(p.bg_kind[j])
        bg = "patterned"
        if p.style == "pretrain":
            base = BACKGROUNDS[k % len(BACKGROUNDS)][0]
            bg = base if k < len(BACKGROUNDS) else f"mottled {base}"
        out.append(
            tmpl.format(c=f"{colour} {shape}", colour=colour, shape=shape, size=size, bg=bg,
                        pos=_position(float(p.cx[j]), float(p.cy[j])))
        )
    return out
