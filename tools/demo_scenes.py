"""Synthetic scenes for dite's demo models: one flat object on a plain light background.

Everything is a pure function of a seed: the same (seed, index) always gives the same
picture, caption and attributes, on any machine. A scene is one shape (circle, square,
triangle) in one of six colours far apart in hue, in one of two sizes, centred on one cell
of a 3x3 grid (with a small jitter), drawn anti-aliased (4x supersampled) at 64x64.

Captions come from a few templates ("a red circle at the top left", "a small blue square on
the right", "a large yellow triangle in the center", ...). The class id of the
class-conditional model is shape x colour (`class_id`).

Held-out split: a seeded 10 % of the (attributes, template) caption strings never appear in
training (`is_heldout`); `heldout_scenes` draws evaluation scenes from them, each with its
attribute tuple so an evaluator can check colour, shape and position.

Used by tools/train_demo.py (training data), the quality harness and tests:

    from demo_scenes import render, sample_scenes, heldout_scenes, class_id
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SUPERSAMPLE = 4

SHAPES = ("circle", "square", "triangle")
# Six colours 60 degrees or more apart in hue, saturated, so a segmentation by hue finds them.
COLOURS = {
    "red": (220, 30, 30),
    "yellow": (235, 200, 20),
    "green": (30, 160, 50),
    "cyan": (20, 185, 200),
    "blue": (35, 60, 215),
    "purple": (150, 45, 185),
}
COLOUR_NAMES = tuple(COLOURS)
SIZES = {"small": 0.20, "large": 0.34}  # object side / diameter as a fraction of the image side
SIZE_NAMES = tuple(SIZES)
# Grid cell centres as a fraction of the side; rows top -> bottom, columns left -> right.
GRID = (0.22, 0.5, 0.78)
JITTER = 0.03  # uniform +- this fraction of the side
POSITIONS = {
    (0, 0): "top left", (0, 1): "top", (0, 2): "top right",
    (1, 0): "left", (1, 1): "center", (1, 2): "right",
    (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right",
}
# How each position is said; the first phrase is what templates use by default.
POSITION_PHRASES = {
    "top left": ("at the top left", "in the top left corner"),
    "top": ("at the top", "at the top center"),
    "top right": ("at the top right", "in the top right corner"),
    "left": ("on the left", "at the left"),
    "center": ("in the center", "in the middle"),
    "right": ("on the right", "at the right"),
    "bottom left": ("at the bottom left", "in the bottom left corner"),
    "bottom": ("at the bottom", "at the bottom center"),
    "bottom right": ("at the bottom right", "in the bottom right corner"),
}
# {size} templates name the size; the others do not (both sizes share those captions).
TEMPLATES = (
    "a {colour} {shape} {where}",
    "a {size} {colour} {shape} {where}",
    "a {colour} {shape} {where2}",
    "a {size} {colour} {shape} {where2}",
    "{where_cap}, a {colour} {shape}",
)
HELDOUT_FRACTION = 0.10
SPLIT_SEED = 1234
NUM_CLASSES = len(SHAPES) * len(COLOURS)


@dataclass(frozen=True)
class Attributes:
    shape: str
    colour: str
    size: str
    row: int
    col: int

    @property
    def position(self) -> str:
        return POSITIONS[(self.row, self.col)]

    @property
    def class_id(self) -> int:
        return class_id(self.shape, self.colour)


@dataclass(frozen=True)
class Scene:
    attributes: Attributes
    template: int
    caption: str
    centre: tuple[float, float]  # (x, y) in pixels of the IMAGE_SIZE image
    extent: float  # side / diameter in pixels
    background: tuple[int, int, int]

    def to_dict(self) -> dict:
        out = asdict(self)
        out["attributes"]["position"] = self.attributes.position
        out["attributes"]["class_id"] = self.attributes.class_id
        return out


def class_id(shape: str, colour: str) -> int:
    """shape x colour: circle-red 0, circle-yellow 1, ..., triangle-purple 17."""
    return SHAPES.index(shape) * len(COLOURS) + COLOUR_NAMES.index(colour)


def class_name(index: int) -> str:
    shape, colour = divmod(index, len(COLOURS))
    return f"{COLOUR_NAMES[colour]} {SHAPES[shape]}"


def all_attributes() -> list[Attributes]:
    return [Attributes(s, c, z, r, k) for s in SHAPES for c in COLOUR_NAMES for z in SIZE_NAMES
            for (r, k) in POSITIONS]


def caption(attrs: Attributes, template: int) -> str:
    phrases = POSITION_PHRASES[attrs.position]
    text = TEMPLATES[template].format(colour=attrs.colour, shape=attrs.shape, size=attrs.size,
                                      where=phrases[0], where2=phrases[1], where_cap=phrases[0])
    return text[0].upper() + text[1:] if template == 4 else text


def _unit_hash(*parts) -> float:
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


def is_heldout(attrs: Attributes, template: int, split_seed: int = SPLIT_SEED) -> bool:
    """Whether this caption string belongs to the held-out split (same for both sizes when
    the template does not name the size, so the string itself never appears in training)."""
    size = attrs.size if "{size}" in TEMPLATES[template] else "-"
    return _unit_hash(split_seed, attrs.shape, attrs.colour, size, attrs.row, attrs.col, template) < HELDOUT_FRACTION


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, half: float, fill) -> None:
    """One filled shape whose bounding box is the square of half-side `half` around (cx, cy)."""
    if shape == "circle":
        draw.ellipse([cx - half, cy - half, cx + half, cy + half], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - half, cy - half, cx + half, cy + half], fill=fill)
    elif shape == "triangle":  # upright, pointing up
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)
    elif shape == "diamond":  # a square turned 45 degrees
        draw.polygon([(cx, cy - half), (cx + half, cy), (cx, cy + half), (cx - half, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render(attrs: Attributes, rng: random.Random, size: int = IMAGE_SIZE) -> tuple[np.ndarray, Scene]:
    """(uint8 [size, size, 3] image, scene) with jitter and background drawn from `rng`."""
    s = size * SUPERSAMPLE
    grey = rng.randint(228, 246)
    background = (grey + rng.randint(-4, 4), grey + rng.randint(-4, 4), grey + rng.randint(-4, 4))
    cx = (GRID[attrs.col] + rng.uniform(-JITTER, JITTER)) * s
    cy = (GRID[attrs.row] + rng.uniform(-JITTER, JITTER)) * s
    extent = SIZES[attrs.size] * s * rng.uniform(0.93, 1.07)
    half = extent / 2
    image = Image.new("RGB", (s, s), background)
    draw = ImageDraw.Draw(image)
    draw_shape(draw, attrs.shape, cx, cy, half, COLOURS[attrs.colour])
    image = image.resize((size, size), Image.Resampling.BOX)
    scene = Scene(attrs, -1, "", (cx / SUPERSAMPLE, cy / SUPERSAMPLE), extent / SUPERSAMPLE, background)
    return np.asarray(image, dtype=np.uint8).copy(), scene


def _draw(rng: random.Random, heldout: bool, split_seed: int) -> tuple[Attributes, int]:
    while True:
        attrs = Attributes(rng.choice(SHAPES), rng.choice(COLOUR_NAMES), rng.choice(SIZE_NAMES),
                           rng.randrange(3), rng.randrange(3))
        template = rng.randrange(len(TEMPLATES))
        if is_heldout(attrs, template, split_seed) == heldout:
            return attrs, template


def scene(seed: int, index: int, *, heldout: bool = False, size: int = IMAGE_SIZE,
          split_seed: int = SPLIT_SEED) -> tuple[np.ndarray, Scene]:
    """Scene `index` of the stream `seed` (training split, or held-out captions)."""
    rng = random.Random(f"dite-demo-scenes/{seed}/{index}/{'heldout' if heldout else 'train'}")
    attrs, template = _draw(rng, heldout, split_seed)
    image, sc = render(attrs, rng, size)
    return image, Scene(attrs, template, caption(attrs, template), sc.centre, sc.extent, sc.background)


def sample_scenes(seed: int, n: int, *, start: int = 0, heldout: bool = False,
                  size: int = IMAGE_SIZE) -> tuple[np.ndarray, list[Scene]]:
    """n scenes: (uint8 [n, size, size, 3], scenes)."""
    images, scenes = [], []
    for i in range(start, start + n):
        image, sc = scene(seed, i, heldout=heldout, size=size)
        images.append(image)
        scenes.append(sc)
    return np.stack(images), scenes


def heldout_scenes(n: int = 100, seed: int = 0) -> list[Scene]:
    """n evaluation scenes whose captions never appear in training, distinct captions first."""
    out, seen, i = [], set(), 0
    while len(out) < n and i < 50 * n:
        _, sc = scene(seed, i, heldout=True)
        i += 1
        if sc.caption not in seen:
            seen.add(sc.caption)
            out.append(sc)
    return out


def all_captions(heldout: bool | None = False) -> list[str]:
    """Every caption string of the split (None: both), sorted; "" not included."""
    out = set()
    for attrs in all_attributes():
        for t in range(len(TEMPLATES)):
            if heldout is None or is_heldout(attrs, t) == heldout:
                out.add(caption(attrs, t))
    if heldout is False:  # a string shared by both sizes is train if any of its uses is
        out -= {c for c in all_captions(True)}
    return sorted(out)


def to_tensor(images: np.ndarray):
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W] in [-1, 1]."""
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


if __name__ == "__main__":
    import sys

    out = sys.argv[1] if len(sys.argv) > 1 else "scenes.png"
    imgs, scs = sample_scenes(0, 16)
    grid = np.concatenate([np.concatenate(list(imgs[r * 4:(r + 1) * 4]), axis=1) for r in range(4)], axis=0)
    Image.fromarray(grid).resize((512, 512), Image.Resampling.NEAREST).save(out)
    for sc in scs:
        print(sc.caption, "|", sc.attributes.class_id)
    print(len(all_captions()), "train captions,", len(all_captions(True)), "held out")
