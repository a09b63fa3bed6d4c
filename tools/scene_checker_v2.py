"""The checker of the second demo scenes (tools/demo_scenes_v2.py): finds every object of a
128x128 image and scores it against its Scene, GenEval-like, per attribute and per kind.

    from scene_checker_v2 import detect_all, score, summarize
    objects = detect_all(image_uint8_hwc)   # [Found(colour, shape, size, row, col, centroid, ...)]
    checks = score(objects, scene)          # {"correct": True, "colour": ..., "relation": None, ...}
    summarize(checks_list, scenes)          # means overall and per kind

Detection (the pieces are tools/scene_checker.py's): foreground = pixels farther than 60 from
the border-median background; every 4-connected component of at least MIN_PIXELS pixels is
an object. Its colour is the palette colour nearest its median RGB; its grid cell that of its
centroid; its size "large" when its bounding box is wider or taller than the midpoint of the
two sizes; its shape from its fill of the bounding box (square ~1, circle ~pi/4, triangle and
diamond ~1/2) and, between the two halves, where its mass lies (an upward triangle has ~3/4
of it in the lower half of its box, the diamond 1/2).

Objects are matched to what the caption asked by colour (a relation's two objects always
differ in colour, a count's share one), the largest of a colour first. Attributes (None where
the scene does not ask):

    count     the image holds exactly as many objects as the scene
    colour    the multiset of detected colours is the asked one (nothing missing, nothing extra)
    shape     every matched object has the asked shape (False when a colour is missing)
    position  single: the matched object is in the asked cell
    size      where the caption names the size: every matched object has it
    relation  relation: both colours found, and the subject's centroid lies on the asked side
              of the object's along the axis ("left of": smaller x; "above": smaller y)

The headline `correct` per kind is what the caption is mostly about, as the first checker's
text headline (colour + position) was; shape is left out of it because, with 4 shapes at
16-28 px, it is the hardest reading and would hide the rest, and is reported on its own and
in `correct_strict` (= correct and shape):

    single    colour and position: the one object, of the asked colour, in the asked cell
    relation  the relation holds (both colours found; other objects allowed)
    count     exactly n objects of the asked colour (objects of other colours allowed)

Extra objects fail a single's headline (its colour multiset) and every kind's `count`. A
random-weights model's colourful noise breaks into ~20 "objects" of all colours, so it meets
a relation's headline by chance about half the time and a single's almost never; read the
relation headline next to `count`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from demo_scenes_v2 import COLOURS, SIZES, Scene
from scene_checker import components, foreground, grid_cell, measure, nearest_colour

# The smallest rendered object (a small diamond or triangle) covers >= 128 pixels and renders
# hold no other components; a third of that drops specks of a generated image.
MIN_PIXELS = 40
# The thresholds and, in comments, the range each side of them on 3000 rendered scenes (5169
# objects; tests/test_scene_checker_v2.py reads a further 1200 scenes).
SIZE_SPLIT = (SIZES["small"] + SIZES["large"]) / 2  # 0.165 of the side: small <= 0.148, large >= 0.1875
SQUARE_FILL = 0.9  # squares >= 0.986, circles <= 0.844
CIRCLE_FILL = 0.66  # circles >= 0.691, diamonds <= 0.627, triangles <= 0.592
TRIANGLE_LOWER = 0.62  # triangles >= 0.679, diamonds <= 0.556, circles <= 0.533
ATTRIBUTES = ("count", "colour", "shape", "position", "size", "relation")


@dataclass(frozen=True)
class Found:
    colour: str
    shape: str
    size: str
    row: int
    col: int
    centroid: tuple[float, float]  # (y, x) as fractions of the image side
    pixels: int
    fill: float
    lower: float


def shape_of(fill: float, lower: float) -> str:
    if fill > SQUARE_FILL:
        return "square"
    if lower > TRIANGLE_LOWER:
        return "triangle"
    return "circle" if fill > CIRCLE_FILL else "diamond"


def detect_all(image: np.ndarray, min_pixels: int = MIN_PIXELS) -> list[Found]:
    """Every object of an [H, W, 3] uint8 (or float in [0, 1]) image, largest first."""
    pixels, mask = foreground(image)
    h, w, _ = pixels.shape
    found = []
    for ys, xs in components(mask):
        if len(ys) < min_pixels:
            continue
        blob = measure(ys, xs)
        extent = max((blob.bottom - blob.top) / h, (blob.right - blob.left) / w)
        row, col = grid_cell(blob.centroid, h, w)
        found.append(Found(nearest_colour(np.median(pixels[ys, xs], axis=0), COLOURS),
                           shape_of(blob.fill, blob.lower), "large" if extent > SIZE_SPLIT else "small",
                           row, col, (blob.centroid[0] / h, blob.centroid[1] / w), blob.count, blob.fill, blob.lower))
    return sorted(found, key=lambda f: -f.pixels)


def holds(relation: str, subject: Found, obj: Found) -> bool:
    (sy, sx), (oy, ox) = subject.centroid, obj.centroid
    return {"left of": sx < ox, "right of": sx > ox, "above": sy < oy, "below": sy > oy}[relation]


def score(found: list[Found], sc: Scene) -> dict[str, bool | None]:
    """Each attribute the scene asks for (None where it asks nothing), `correct` (the kind's
    headline) and `correct_strict` (headline and shape)."""
    by_colour = {c: [f for f in found if f.colour == c] for c in {o.colour for o in sc.objects}}
    if sc.kind == "count":
        matched = by_colour[sc.objects[0].colour]  # all of them: each must look as asked
    else:
        matched = [by_colour[o.colour][0] if by_colour[o.colour] else None for o in sc.objects]
    complete = bool(matched) and all(m is not None for m in matched)
    wanted = list(sc.objects) if sc.kind != "count" else [sc.objects[0]] * len(matched)  # a count's look alike
    asked = sc.objects[0]
    out = {
        "count": len(found) == len(sc.objects),
        "colour": Counter(f.colour for f in found) == Counter(o.colour for o in sc.objects),
        "shape": complete and all(m.shape == o.shape for m, o in zip(matched, wanted)),
        "position": (complete and (matched[0].row, matched[0].col) == (asked.row, asked.col))
        if sc.kind == "single" else None,
        "size": (complete and all(m.size == o.size for m, o in zip(matched, wanted)))
        if sc.names_size else None,
        "relation": (complete and holds(sc.relation, matched[0], matched[1])) if sc.kind == "relation" else None,
    }
    out["correct"] = {"single": out["colour"] and out["position"], "relation": out["relation"],
                      "count": len(matched) == len(sc.objects)}[sc.kind]
    out["correct_strict"] = out["correct"] and out["shape"]
    return out


def summarize(checks: list[dict], scenes: list[Scene]) -> dict[str, dict[str, float | int | None]]:
    """Means of `correct`, `correct_strict` and each attribute over the scenes that ask for it:
    {"all": {...}, "single": {...}, "relation": {...}, "count": {...}}, each with its scene count "n"
    (a mean is None where no scene of the group asks for the attribute)."""
    groups = {"all": list(range(len(scenes)))}
    for kind in ("single", "relation", "count"):
        groups[kind] = [i for i, sc in enumerate(scenes) if sc.kind == kind]
    out = {}
    for name, members in groups.items():
        row: dict[str, float | int | None] = {"n": len(members)}
        for key in ("correct", "correct_strict") + ATTRIBUTES:
            values = [checks[i][key] for i in members if checks[i][key] is not None]
            row[key] = float(np.mean(values)) if values else None
        out[name] = row
    return out
