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
heavier at the bottom (the triangle points up).
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


def _largest_component(mask: np.ndarray) -> np.ndarray:
    h, w = mask.shape
    seen = np.zeros_like(mask)
    best: list[tuple[int, int]] = []
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
        if len(component) > len(best):
            best = component
    out = np.zeros_like(mask)
    if best:
        ys, xs = zip(*best)
        out[list(ys), list(xs)] = True
    return out


def detect(image: np.ndarray) -> Detection:
    """The object in an [H, W, 3] uint8 (or float in [0, 1]) image."""
    if image.dtype != np.uint8:
        image = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    pixels = image.astype(np.float32)
    h, w, _ = pixels.shape
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)
    mask = np.linalg.norm(pixels - background, axis=-1) > FOREGROUND_MARGIN
    mask = _largest_component(mask)
    count = int(mask.sum())
    if count < MIN_PIXELS:
        return Detection(found=False, pixels=count)
    rgb = np.median(pixels[mask], axis=0)
    names = list(COLOURS)
    palette = np.array([COLOURS[n] for n in names], dtype=np.float32)
    colour = names[int(np.argmin(np.linalg.norm(palette - rgb, axis=1)))]
    ys, xs = np.nonzero(mask)
    top, bottom, left, right = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    box_h, box_w = bottom - top, right - left
    fill = count / float(box_h * box_w)
    middle = (top + bottom) / 2
    lower = (ys >= middle).sum() / count  # an upward triangle has ~3/4 of its area below
    if fill > 0.9:
        shape = "square"
    elif fill < 0.66 or lower > 0.62:
        shape = "triangle"
    else:
        shape = "circle"
    cy, cx = ys.mean() / h, xs.mean() / w
    row, col = min(2, int(cy * 3)), min(2, int(cx * 3))
    extent = max(box_h / h, box_w / w)
    size = "large" if extent > (SIZES["small"] + SIZES["large"]) / 2 else "small"
    return Detection(True, colour, shape, row, col, size, fill, count)


def score(found: Detection, attributes) -> dict[str, bool]:
    """Which of the asked-for attributes the detection has."""
    return {
        "colour": found.found and found.colour == attributes.colour,
        "shape": found.found and found.shape == attributes.shape,
        "position": found.found and (found.row, found.col) == (attributes.row, attributes.col),
        "size": found.found and found.size == attributes.size,
    }
