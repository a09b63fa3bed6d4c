"""Scenes of the second demo generation: 1-3 objects at 128x128, with counts and relations.

Like tools/demo_scenes.py every picture is a pure function of (seed, index, split), but a
scene now holds one, two or three flat objects, each centred on its own cell of a 3x3 grid
(cells never repeat, so objects never touch), among four shapes, seven colours and two
sizes. A scene is one of three kinds, each with its own captions:

    single     "a small red circle at the top left", "At the top left, a red circle"
    relation   "a red circle left of a blue square", "a blue square above a green diamond"
    count      "two green triangles", "three large yellow squares"

A relation always joins two objects of different colours (the checker tells them apart by
colour); "left of" / "right of" means the columns differ that way, "above" / "below" the rows.
A count scene has 2 or 3 objects of one colour, shape and size.

Held-out split: a seeded 10 % of the caption strings never appear in training
(`is_heldout`); `heldout_scenes(n)` gives n evaluation scenes from them, distinct captions
first, with the objects each caption asked for so tools/scene_checker_v2.py can score them.

    from demo_scenes_v2 import scene, sample_scenes, heldout_scenes
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from demo_scenes import COLOURS as FIRST_COLOURS
from demo_scenes import POSITION_PHRASES, POSITIONS, SUPERSAMPLE, _unit_hash, draw_shape

IMAGE_SIZE = 128
DEMOS = ("demo-sd3-128", "demo-pixart")  # the demo models trained on these scenes (tools/train_demo_v2.py)
SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {**FIRST_COLOURS, "black": (35, 35, 35)}  # the six of the first demos, and black: all far apart
COLOUR_NAMES = tuple(COLOURS)
SIZES = {"small": 0.13, "large": 0.20}  # side / diameter as a fraction of the image side
SIZE_NAMES = tuple(SIZES)
# Cell centres 0.31 of the side apart: two large objects in neighbouring cells keep >= 9 px
# of background between them at 128 px, whatever the jitter, so they stay separate objects.
GRID = (0.19, 0.5, 0.81)
JITTER = 0.02
RELATIONS = ("left of", "right of", "above", "below")
NUMBERS = {2: "two", 3: "three"}
KINDS = ("single", "relation", "count")
KIND_WEIGHTS = (0.4, 0.3, 0.3)
SINGLE_TEMPLATES = (
    "a {colour} {shape} {where}",
    "a {size} {colour} {shape} {where}",
    "{where_cap}, a {colour} {shape}",
)
HELDOUT_FRACTION = 0.10
SPLIT_SEED = 4321


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    row: int
    col: int


@dataclass(frozen=True)
class Scene:
    kind: str  # "single" | "relation" | "count"
    objects: tuple[Obj, ...]  # for a relation: (subject, object) in caption order
    caption: str
    relation: str | None = None
    names_size: bool = False  # whether the caption says the size (then the checker asks for it)


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def caption_of(kind: str, objects: tuple[Obj, ...], relation: str | None, template: int) -> str:
    first = objects[0]
    if kind == "single":
        where = POSITION_PHRASES[POSITIONS[(first.row, first.col)]][0]
        text = SINGLE_TEMPLATES[template].format(colour=first.colour, shape=first.shape, size=first.size,
                                                 where=where, where_cap=where)
        return text[0].upper() + text[1:] if template == 2 else text
    if kind == "relation":
        second = objects[1]
        return f"a {first.colour} {first.shape} {relation} a {second.colour} {second.shape}"
    size = f"{first.size} " if template == 1 else ""
    return f"{NUMBERS[len(objects)]} {size}{first.colour} {_plural(first.shape)}"


def is_heldout(caption: str, split_seed: int = SPLIT_SEED) -> bool:
    return _unit_hash(split_seed, caption) < HELDOUT_FRACTION


def _cells(rng: random.Random, n: int) -> list[tuple[int, int]]:
    return rng.sample(sorted(POSITIONS), n)


def _relation_cells(rng: random.Random, relation: str) -> list[tuple[int, int]]:
    """Two distinct cells where the first stands in `relation` to the second."""
    while True:
        a, b = _cells(rng, 2)
        if {"left of": a[1] < b[1], "right of": a[1] > b[1], "above": a[0] < b[0], "below": a[0] > b[0]}[relation]:
            return [a, b]


def _draw_layout(rng: random.Random) -> Scene:
    kind = rng.choices(KINDS, KIND_WEIGHTS)[0]
    if kind == "single":
        (row, col), = _cells(rng, 1)
        obj = Obj(rng.choice(SHAPES), rng.choice(COLOUR_NAMES), rng.choice(SIZE_NAMES), row, col)
        template = rng.randrange(len(SINGLE_TEMPLATES))
        return Scene(kind, (obj,), caption_of(kind, (obj,), None, template), None, template == 1)
    if kind == "relation":
        relation = rng.choice(RELATIONS)
        colours = rng.sample(COLOUR_NAMES, 2)
        objects = tuple(Obj(rng.choice(SHAPES), c, rng.choice(SIZE_NAMES), r, k)
                        for c, (r, k) in zip(colours, _relation_cells(rng, relation)))
        return Scene(kind, objects, caption_of(kind, objects, relation, 0), relation)
    n = rng.choice((2, 3))
    shape, colour, size = rng.choice(SHAPES), rng.choice(COLOUR_NAMES), rng.choice(SIZE_NAMES)
    objects = tuple(Obj(shape, colour, size, r, k) for r, k in _cells(rng, n))
    template = rng.randrange(2)
    return Scene(kind, objects, caption_of(kind, objects, None, template), None, template == 1)


def render(sc: Scene, rng: random.Random, size: int = IMAGE_SIZE) -> np.ndarray:
    """uint8 [size, size, 3]: the scene's objects on a light, slightly tinted background."""
    s = size * SUPERSAMPLE
    grey = rng.randint(228, 246)
    background = (grey + rng.randint(-4, 4), grey + rng.randint(-4, 4), grey + rng.randint(-4, 4))
    image = Image.new("RGB", (s, s), background)
    draw = ImageDraw.Draw(image)
    for obj in sc.objects:
        cx = (GRID[obj.col] + rng.uniform(-JITTER, JITTER)) * s
        cy = (GRID[obj.row] + rng.uniform(-JITTER, JITTER)) * s
        extent = SIZES[obj.size] * s * rng.uniform(0.93, 1.07)
        draw_shape(draw, obj.shape, cx, cy, extent / 2, COLOURS[obj.colour])
    image = image.resize((size, size), Image.Resampling.BOX)
    return np.asarray(image, dtype=np.uint8).copy()


def scene(seed: int, index: int, *, heldout: bool = False, size: int = IMAGE_SIZE,
          split_seed: int = SPLIT_SEED) -> tuple[np.ndarray, Scene]:
    """Scene `index` of the stream `seed`, from the training or the held-out captions."""
    rng = random.Random(f"dite-demo-scenes-v2/{seed}/{index}/{'heldout' if heldout else 'train'}")
    while True:
        sc = _draw_layout(rng)
        if is_heldout(sc.caption, split_seed) == heldout:
            return render(sc, rng, size), sc


def sample_scenes(seed: int, n: int, *, start: int = 0, heldout: bool = False,
                  size: int = IMAGE_SIZE) -> tuple[np.ndarray, list[Scene]]:
    """n scenes: (uint8 [n, size, size, 3], scenes)."""
    pairs = [scene(seed, i, heldout=heldout, size=size) for i in range(start, start + n)]
    return np.stack([p[0] for p in pairs]), [p[1] for p in pairs]


def heldout_scenes(n: int = 100, seed: int = 0) -> list[Scene]:
    """n evaluation scenes whose captions never appear in training, distinct captions first."""
    return heldout_samples(n, seed)[1]


def heldout_samples(n: int = 100, seed: int = 0) -> tuple[np.ndarray, list[Scene]]:
    """heldout_scenes(n, seed) with their renderings: (uint8 [n, size, size, 3], scenes)."""
    images, out, seen, i = [], [], set(), 0
    while len(out) < n and i < 50 * n:
        image, sc = scene(seed, i, heldout=True)
        i += 1
        if sc.caption not in seen:
            seen.add(sc.caption)
            images.append(image)
            out.append(sc)
    return (np.stack(images) if images else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)), out


def vocabulary_texts() -> list[str]:
    """What the tokenizers learn from: captions of many training and held-out scenes (the
    vocabulary is the language, not the data), in mixed case, plus every word."""
    caps = sorted({_draw_layout(random.Random(f"dite-vocabulary/{i}")).caption for i in range(20000)})
    words = sorted({w for c in caps for w in c.replace(",", " ").split()} | set(SHAPES) | set(map(_plural, SHAPES))
                   | set(COLOUR_NAMES) | set(SIZE_NAMES) | set(NUMBERS.values()))
    return caps + [c.lower() for c in caps] + words


if __name__ == "__main__":
    import sys

    out = sys.argv[1] if len(sys.argv) > 1 else "scenes_v2.png"
    imgs, scs = sample_scenes(0, 16)
    grid = np.concatenate([np.concatenate(list(imgs[r * 4:(r + 1) * 4]), axis=1) for r in range(4)], axis=0)
    Image.fromarray(grid).save(out)
    for sc in scs:
        print(sc.kind, "|", sc.caption)
