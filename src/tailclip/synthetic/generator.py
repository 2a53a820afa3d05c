"""Procedural images of the built-in synthetic world: 100 classes = 10 shapes x 10 colours at 32x32 px.

Every image is a pure function of (seed, stream, index, label, style): its random parameters come from a
counter-based generator `np.random.default_rng([seed, stream, index])`, so any single image renders on its own
(no files, no state) and a batch renders to exactly the same pixels as the images one by one. Rendering is
vectorised in numpy (2x supersampled masks, then averaged) so tens of thousands of images take seconds.

Two styles give fine-tuning a domain gap to close, as with real benchmarks:
  "pretrain"    named, desaturated background, flat with a faint gradient or mottled with a second muted
                colour, and mild noise (the captioned pretraining corpus);
  "downstream"  two-tone textures (stripes, checkers, waves) in random muted hues, dimmer/brighter shapes and
                stronger noise (the downstream tasks).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

IMAGE_SIZE = 32
GENERATOR_VERSION = 1  # bump when rendering changes: it is part of every image identifier (feature-cache keys)
_SS = 2  # supersampling factor for anti-aliased edges

SHAPES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "cross", "ring", "heart", "crescent", "diamond", "arrow",
)
COLOURS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("red", (225, 30, 35)),
    ("orange", (255, 140, 0)),
    ("yellow", (245, 225, 20)),
    ("green", (30, 170, 45)),
    ("cyan", (0, 210, 230)),
    ("blue", (35, 60, 225)),
    ("purple", (135, 40, 195)),
    ("pink", (255, 115, 195)),
    ("white", (250, 250, 250)),
    ("black", (12, 12, 12)),
)
NUM_SHAPES = len(SHAPES)
NUM_COLOURS = len(COLOURS)
NUM_CLASSES = NUM_SHAPES * NUM_COLOURS

# Named backgrounds of the pretraining style (desaturated, mid luminance, so every shape colour stands out).
BACKGROUNDS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("gray", (128, 128, 128)),
    ("light gray", (178, 178, 178)),
    ("dark gray", (82, 82, 82)),
    ("beige", (196, 186, 158)),
    ("slate", (96, 108, 128)),
    ("khaki", (150, 146, 108)),
)

STYLES = ("pretrain", "downstream")
# Stream ids keep the image sequences of different splits independent for the same seed.
STREAMS = {"pretrain": 0, "train": 1, "val": 2, "test": 3}


def class_attributes(label: int) -> tuple[int, int]:
    """(shape index, colour index) of class `label`.

    Classes are laid out diagonally (label = 10k + s has shape s and colour (s + k) mod 10), so any block of
    consecutive labels, e.g. the base half 0..49 of base-to-new, covers every shape and every colour and the
    new half consists of unseen *combinations* of seen attributes.
    """
    if not 0 <= label < NUM_CLASSES:
        raise ValueError(f"class label {label} is outside [0, {NUM_CLASSES})")
    k, s = divmod(int(label), NUM_SHAPES)
    return s, (s + k) % NUM_COLOURS


CLASSNAMES: list[str] = [
    f"{COLOURS[class_attributes(c)[1]][0]} {SHAPES[class_attributes(c)[0]]}" for c in range(NUM_CLASSES)
]


@dataclass
class RenderParams:
    """Per-image random parameters of a batch (arrays of length N); what captions are written from."""

    labels: np.ndarray
    cx: np.ndarray
    cy: np.ndarray
    radius: np.ndarray
    angle: np.ndarray
    colour: np.ndarray  # (N, 3) float shape colour after jitter/lighting
    bg_kind: np.ndarray  # pretrain: index into BACKGROUNDS; downstream: texture type
    bg1: np.ndarray  # (N, 3)
    bg2: np.ndarray  # (N, 3) second tone (downstream) / gradient end (pretrain)
    freq: np.ndarray
    orient: np.ndarray
    phase: np.ndarray
    noise_sigma: np.ndarray
    blotch: np.ndarray  # (N, 5, 5) coarse random field of the pretraining style's mottled backgrounds
    noise: np.ndarray  # (N, H, W, 3)
    caption_draw: np.ndarray  # (N,) uniform in [0, 1) used to pick a caption template
    style: str


def _muted(rng: np.random.Generator, sat_max: float, v_lo: float, v_hi: float) -> np.ndarray:
    """A random desaturated RGB colour (HSV with low saturation) in 0..255."""
    h, s, v = rng.random(), rng.uniform(0.0, sat_max), rng.uniform(v_lo, v_hi)
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.asarray(rgb, dtype=np.float32) * 255.0


def draw_params(
    seed: int, stream: int, indices: Sequence[int], labels: Sequence[int], style: str
) -> RenderParams:
    """Draw the random parameters of images `indices` of (seed, stream) with the given class labels."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; choose one of {STYLES}")
    n = len(indices)
    if len(labels) != n:
        raise ValueError(f"{n} indices but {len(labels)} labels")
    f32 = np.float32
    out = {
        k: np.zeros(n, f32)
        for k in ("cx", "cy", "radius", "angle", "freq", "orient", "phase", "noise_sigma", "caption_draw")
    }
    colour = np.zeros((n, 3), f32)
    bg1 = np.zeros((n, 3), f32)
    bg2 = np.zeros((n, 3), f32)
    bg_kind = np.zeros(n, np.int64)
    noise = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE, 3), f32)
    blotch = np.zeros((n, 5, 5), f32)
    style_id = STYLES.index(style)
    for j, (idx, lab) in enumerate(zip(indices, labels)):
        rng = np.random.default_rng([int(seed), int(stream), style_id, int(idx)])
        _, c = class_attributes(int(lab))
        radius = rng.uniform(6.5, 11.5)
        margin = radius * 0.9
        out["radius"][j] = radius
        out["cx"][j] = rng.uniform(margin, IMAGE_SIZE - margin)
        out["cy"][j] = rng.uniform(margin, IMAGE_SIZE - margin)
        out["angle"][j] = np.deg2rad(rng.uniform(-25.0, 25.0))
        base = np.asarray(COLOURS[c][1], f32)
        if style == "pretrain":
            colour[j] = base + rng.uniform(-15, 15, 3)
            k = int(rng.integers(2 * len(BACKGROUNDS)))  # k >= len(BACKGROUNDS): mottled variant
            bg_kind[j] = k
            bg1[j] = np.asarray(BACKGROUNDS[k % len(BACKGROUNDS)][1], f32) + rng.uniform(-10, 10, 3)
            if k < len(BACKGROUNDS):
                bg2[j] = bg1[j] + rng.uniform(-18, 18)  # gradient end: same hue, other brightness
            else:
                bg2[j] = _muted(rng, 0.3, 0.3, 0.8)
                blotch[j] = rng.random((5, 5))
            out["noise_sigma"][j] = rng.uniform(3.0, 8.0)
        else:
            colour[j] = base * rng.uniform(0.8, 1.1) + rng.uniform(-20, 20, 3)
            bg_kind[j] = int(rng.integers(3))
            bg1[j] = _muted(rng, 0.35, 0.3, 0.8)
            bg2[j] = 0.5 * bg1[j] + 0.5 * _muted(rng, 0.35, 0.3, 0.8)  # second tone: half-way to another colour
            out["noise_sigma"][j] = rng.uniform(6.0, 14.0)
        out["freq"][j] = rng.uniform(0.08, 0.22)
        out["orient"][j] = rng.uniform(0, np.pi)
        out["phase"][j] = rng.uniform(0, 2 * np.pi)
        out["caption_draw"][j] = rng.random()
        noise[j] = rng.standard_normal((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=f32)
    return RenderParams(
        labels=np.asarray(labels, np.int64), colour=np.clip(colour, 0, 255), bg_kind=bg_kind,
        bg1=np.clip(bg1, 0, 255), bg2=np.clip(bg2, 0, 255), noise=noise, blotch=blotch, style=style, **out,
    )


def _shape_mask(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Membership of shape-local coordinates (u right, v up, in units of the radius) in shape `shape`."""
    rho = np.sqrt(u * u + v * v)
    name = SHAPES[shape]
    if name == "circle":
        return rho <= 0.9
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.72
    if name == "triangle":
        return (v >= -0.55) & (np.abs(u) <= (1.0 - v) * 0.62)
    if name == "star":
        phi = np.mod(np.arctan2(v, u) - np.pi / 2, 2 * np.pi / 5)
        d = np.minimum(phi, 2 * np.pi / 5 - phi) / (np.pi / 5)  # 0 at a point, 1 between points
        return rho <= 1.0 - 0.58 * d
    if name == "cross":
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 0.95))
    if name == "ring":
        return (rho <= 0.95) & (rho >= 0.55)
    if name == "heart":
        x, y = u * 1.15, (v + 0.1) * 1.15
        return (x * x + y * y - 1) ** 3 - x * x * y**3 <= 0
    if name == "crescent":
        return (rho <= 0.95) & ((u - 0.45) ** 2 + (v - 0.1) ** 2 >= 0.72**2)
    if name == "diamond":
        return np.abs(u) / 0.62 + np.abs(v) <= 1.0
    if name == "arrow":
        head = (v >= 0.05) & (v <= 1.0) & (np.abs(u) <= (1.0 - v) * 0.8)
        stem = (np.abs(u) <= 0.22) & (v >= -0.95) & (v < 0.05)
        return head | stem
    raise ValueError(name)


def _upsample_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) linear-interpolation weights: a smooth field from a coarse random grid."""
    pos = (np.arange(n_out, dtype=np.float32) + 0.5) / n_out * (n_in - 1)
    lo = np.minimum(np.floor(pos).astype(np.int64), n_in - 2)
    frac = pos - lo
    m = np.zeros((n_out, n_in), np.float32)
    m[np.arange(n_out), lo] = 1 - frac
    m[np.arange(n_out), lo + 1] = frac
    return m


def render(p: RenderParams) -> np.ndarray:
    """Render a batch of parameters to uint8 images (N, 32, 32, 3)."""
    n = len(p.labels)
    size = IMAGE_SIZE
    # pixel-centre coordinates of the supersampled grid, in output-pixel units
    g = (np.arange(size * _SS, dtype=np.float32) + 0.5) / _SS
    ys, xs = np.meshgrid(g, g, indexing="ij")
    alpha = np.zeros((n, size * _SS, size * _SS), np.float32)
    shapes = np.asarray([class_attributes(int(c))[0] for c in p.labels], np.int64)
    for s in np.unique(shapes):
        sel = np.nonzero(shapes == s)[0]
        dx = xs[None] - p.cx[sel, None, None]
        dy = p.cy[sel, None, None] - ys[None]  # v points up
        ca, sa = np.cos(p.angle[sel])[:, None, None], np.sin(p.angle[sel])[:, None, None]
        r = p.radius[sel, None, None]
        u = (ca * dx + sa * dy) / r
        v = (-sa * dx + ca * dy) / r
        alpha[sel] = _shape_mask(int(s), u, v)
    alpha = alpha.reshape(n, size, _SS, size, _SS).mean(axis=(2, 4))[..., None]

    pix = (np.arange(size, dtype=np.float32) + 0.5)[None, :, None]
    x = np.broadcast_to(pix.transpose(0, 2, 1), (1, size, size))  # x varies along the last axis
    y = np.broadcast_to(pix, (1, size, size))
    co, so = np.cos(p.orient)[:, None, None], np.sin(p.orient)[:, None, None]
    proj = co * x + so * y
    if p.style == "pretrain":
        gradient = proj / size  # faint linear gradient across the image
        interp = _upsample_matrix(p.blotch.shape[1], size)
        mottled = np.einsum("hi,nij,wj->nhw", interp, p.blotch, interp)
        t = np.where((p.bg_kind >= len(BACKGROUNDS))[:, None, None], mottled, gradient)[..., None]
    else:
        f, ph = p.freq[:, None, None], p.phase[:, None, None]
        stripes = 0.5 + 0.5 * np.sign(np.sin(2 * np.pi * f * proj + ph))
        perp = -so * x + co * y
        checker = 0.5 + 0.5 * np.sign(np.sin(2 * np.pi * f * proj + ph) * np.sin(2 * np.pi * f * perp))
        waves = 0.5 + 0.5 * np.sin(2 * np.pi * f * proj + ph + 1.5 * np.sin(2 * np.pi * f * perp))
        kind = p.bg_kind[:, None, None]
        t = np.where(kind == 0, stripes, np.where(kind == 1, checker, waves))[..., None]
    bg = p.bg1[:, None, None, :] * (1 - t) + p.bg2[:, None, None, :] * t
    img = bg * (1 - alpha) + p.colour[:, None, None, :] * alpha
    img = img + p.noise * p.noise_sigma[:, None, None, None]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render_images(
    seed: int, stream: int, indices: Sequence[int], labels: Sequence[int], style: str, chunk: int = 2048
) -> np.ndarray:
    """Render images `indices` (with `labels`) of (seed, stream, style); chunked to bound memory."""
    outs = []
    for lo in range(0, len(indices), chunk):
        hi = lo + chunk
        outs.append(render(draw_params(seed, stream, indices[lo:hi], labels[lo:hi], style)))
    if not outs:
        return np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    return np.concatenate(outs)


class SyntheticImages:
    """An `ImageSource` whose image i is image `positions[i]` (default i) of (seed, stream, style) with class
    `labels[i]`. The whole source is rendered on first read, once per machine (`world_cache`), and read
    memory-mapped afterwards; `load_array` hands out uint8 batches for tensor-side augmentation."""

    def __init__(self, labels: Sequence[int], style: str, stream: int, seed: int = 0,
                 positions: Sequence[int] | None = None, name: str = "synthetic") -> None:
        if style not in STYLES:
            raise ValueError(f"unknown style {style!r}; choose one of {STYLES}")
        self.labels = np.asarray(labels, np.int64)
        self.positions = np.arange(len(self.labels)) if positions is None else np.asarray(positions, np.int64)
        if len(self.positions) != len(self.labels):
            raise ValueError(f"{len(self.positions)} positions but {len(self.labels)} labels")
        self.style, self.stream, self.seed, self.name = style, int(stream), int(seed), name
        self._array: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_array": None}  # DataLoader workers re-open the cache instead of copying it

    def subset(self, indices: Sequence[int]) -> SyntheticImages:
        """The images `indices` of this source as a source of their own (cached as its own, smaller entry)."""
        idx = np.asarray(indices, np.int64)
        return SyntheticImages(self.labels[idx], self.style, self.stream, self.seed, self.positions[idx], self.name)

    def ident(self, index: int) -> str:
        return (f"synthetic-v{GENERATOR_VERSION}://{self.name}/{self.style}/s{self.seed}/stream{self.stream}/"
                f"{int(self.positions[index])}")

    def array(self) -> np.ndarray:
        """All images of the source, uint8 (N, 32, 32, 3) (memory-mapped when cached on disk)."""
        if self._array is None:
            from .world_cache import rendered_images

            self._array = rendered_images(self.seed, self.stream, self.style, self.positions, self.labels)
        return self._array

    def load(self, index: int) -> Image.Image:
        return Image.fromarray(np.asarray(self.array()[index]))

    def load_array(self, indices: Sequence[int]) -> np.ndarray:
        """Many images at once as uint8 (N, 32, 32, 3)."""
        return np.asarray(self.array()[np.asarray(indices, np.int64)])


WORLD_SEED = 0  # fixes every downstream image of the world; DataConfig.seed only picks which ones a task uses
TEST_PER_CLASS = 100


def balanced_test_images(limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The balanced downstream test split (or its first `limit` images) as arrays (uint8 images, labels): what the
    recorded zero-shot metrics use; identical to rendering `build_task(synth-lt).split("test")` image by image."""
    labels = np.arange(NUM_CLASSES * TEST_PER_CLASS, dtype=np.int64) % NUM_CLASSES
    labels = labels[:limit] if limit is not None else labels
    images = render_images(WORLD_SEED, STREAMS["test"], list(range(len(labels))), labels.tolist(), "downstream")
    return images, labels
