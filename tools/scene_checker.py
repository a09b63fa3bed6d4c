"""An analytic checker for demo-scene images: finds the one object by colour segmentation and
reads off its colour, shape, position and size, to score a generated image against the
attributes its caption (or class) asked for — a GenEval-like accuracy for the demo models.

    from scene_checker import detect, score
    found = detect(image_uint8_hwc)          # Detection(colour, shape, row, col, size, ...)
    score(found, scene.attributes)           # {"colour": True, "shape": ..., "position": ..., "size": ...}

How: the background is the median of the border pixels; foreground pixels differ from it by
more than a margin; the largest 4-connected foreground component is the object. Colour is
the palette colour nearest to the component's median RGB; position the 3x3 grid cell of its
centroid; size its bounding-box extent against the two sizes' midpoint; shape from how much
of its bounding box it fills (square ~1, circle ~pi/4, triangle ~1/2) and whether it is
heavier at the bottom (the triangle points up). The pieces (foreground, components,
nearest_colour, measure, grid_cell) also serve tools/scene_checker_v2.py's many-object scenes.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from demo_scenes import COLOURS, SIZES

FOREGROUND_MARGIN = 60.0  # RGB distance from the background that counts as object
MIN_PIXELS = 12  # fewer than this: "no object found"


@dataclass(frozen=True)
class Detection:
    found: bool
    colour: str | None = None
    shape: str | None = None
    row: int | None = None
    col: int | None = None
    size: str | None = None
    fill: float = 0.0  # area / bounding-box area
    pixels: int = 0


def as_uint8(image: np.ndarray) -> np.ndarray:
    """An [H, W, 3] image as uint8 (float images are read as [0, 1])."""
    if image.dtype != np.uint8:
        image = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    return image


def foreground(image: np.ndarray, margin: float = FOREGROUND_MARGIN) -> tuple[np.ndarray, np.ndarray]:
    """(float32 pixels [H, W, 3], bool mask [H, W]): pixels farther than `margin` from the
    background, the median of the border pixels (objects never touch the border)."""
    pixels = as_uint8(image).astype(np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)
    return pixels, np.linalg.norm(pixels - background, axis=-1) > margin


def components(mask: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """The 4-connected components of `mask` as (ys, xs) index arrays, in raster order of their
    first pixel."""
    h, w = mask.shape
    seen = np.zeros_like(mask)
    found = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        component, queue = [], deque([(y0, x0)])
        seen[y0, x0] = True
        while queue:
            y, x = queue.popleft()
            component.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        ys, xs = zip(*component)
        found.append((np.array(ys), np.array(xs)))
    return found


def nearest_colour(rgb: np.ndarray, colours: dict[str, tuple[int, int, int]]) -> str:
    """The name of the palette colour nearest (RGB distance) to `rgb`."""
    names = list(colours)
    palette = np.array([colours[n] for n in names], dtype=np.float32)
    return names[int(np.argmin(np.linalg.norm(palette - rgb, axis=1)))]


@dataclass(frozen=True)
class Blob:
    """Measurements of one component: bounding box [top, bottom) x [left, right), pixel count,
    fill (count / box area), `lower` (share of pixels in the box's lower half: an upward
    triangle ~3/4, shapes symmetric top-bottom ~1/2) and centroid (y, x) in pixels."""
    top: int
    bottom: int
    left: int
    right: int
    count: int
    fill: float
    lower: float
    centroid: tuple[float, float]


def measure(ys: np.ndarray, xs: np.ndarray) -> Blob:
    count = len(ys)
    top, bottom, left, right = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    fill = count / float((bottom - top) * (right - left))
    middle = (top + bottom) / 2
    lower = float((ys >= middle).sum() / count)
    return Blob(top, bottom, left, right, count, fill, lower, (float(ys.mean()), float(xs.mean())))


def grid_cell(centroid: tuple[float, float], h: int, w: int) -> tuple[int, int]:
    """(row, col) of the 3x3 grid cell holding the point (y, x)."""
    return min(2, int(centroid[0] / h * 3)), min(2, int(centroid[1] / w * 3))


def detect(image: np.ndarray) -> Detection:
    """The object in an [H, W, 3] uint8 (or float in [0, 1]) image."""
    pixels, mask = foreground(image)
    h, w, _ = pixels.shape
    parts = components(mask)
    if not parts:
        return Detection(found=False, pixels=0)
    ys, xs = max(parts, key=lambda p: len(p[0]))  # the largest; the first of equals
    count = len(ys)
    if count < MIN_PIXELS:
        return Detection(found=False, pixels=count)
    colour = nearest_colour(np.median(pixels[ys, xs], axis=0), COLOURS)
    blob = measure(ys, xs)
    if blob.fill > 0.9:
        shape = "square"
    elif blob.fill < 0.66 or blob.lower > 0.62:  # an upward triangle has ~3/4 of its area below
        shape = "triangle"
    else:
        shape = "circle"
    row, col = grid_cell(blob.centroid, h, w)
    extent = max((blob.bottom - blob.top) / h, (blob.right - blob.left) / w)
    size = "large" if extent > (SIZES["small"] + SIZES["large"]) / 2 else "small"
    return Detection(True, colour, shape, row, col, size, blob.fill, count)


def score(found: Detection, attributes) -> dict[str, bool]:
    """Which of the asked-for attributes the detection has."""
    return {
        "colour": found.found and found.colour == attributes.colour,
        "shape": found.found and found.shape == attributes.shape,
        "position": found.found and (found.row, found.col) == (attributes.row, attributes.col),
        "size": found.found and found.size == attributes.size,
    }
