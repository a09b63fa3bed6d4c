"""Sample the shipped demo models and check the pictures against their captions.

    python tools/demo_samples.py sd3 --n 100 --grid sd3_grid.png    # held-out captions
    python tools/demo_samples.py dit --grid dit_grid.png              # every class, 2 seeds

A quick analytic check (the model card's numbers; tools/eval_quality.py is the full
harness): the object is the pixels far from the image's border colour; its colour is the
nearest of the six palette colours to their median, its position the 3x3 cell of their
centroid, its shape the fill ratio of its bounding box (square ~1, circle ~0.79,
triangle ~0.5).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo_scenes as scenes  # noqa: E402


def analyse(image: np.ndarray) -> dict | None:
    """(colour, row, col, shape) of the object in a uint8 [H, W, 3] image, or None if none found."""
    img = image.astype(np.float32)
    h, w, _ = img.shape
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    background = np.median(border, axis=0)
    mask = np.abs(img - background).max(-1) > 60
    if mask.sum() < 6:
        return None
    colour = np.median(img[mask], axis=0)
    names = list(scenes.COLOURS)
    dist = [np.linalg.norm(colour - np.array(scenes.COLOURS[n])) for n in names]
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean() / h, xs.mean() / w
    cell = lambda v: int(np.clip(v * 3, 0, 2.999))  # noqa: E731
    fill = mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    shape = "square" if fill > 0.9 else ("circle" if fill > 0.65 else "triangle")
    return {"colour": names[int(np.argmin(dist))], "row": cell(cy), "col": cell(cx), "shape": shape,
            "fill": float(fill), "pixels": int(mask.sum())}


def score(found: dict | None, attrs: scenes.Attributes) -> dict:
    if found is None:
        return {"colour": False, "position": False, "shape": False}
    return {"colour": found["colour"] == attrs.colour, "position": (found["row"], found["col"]) == (attrs.row, attrs.col),
            "shape": found["shape"] == attrs.shape}


def grid(images: list[np.ndarray], columns: int, scale: int = 2) -> Image.Image:
    rows = [np.concatenate(images[i:i + columns] + [np.full_like(images[0], 255)] * (columns - len(images[i:i + columns])), 1)
            for i in range(0, len(images), columns)]
    g = np.concatenate(rows, 0)
    return Image.fromarray(g).resize((g.shape[1] * scale, g.shape[0] * scale), Image.Resampling.NEAREST)


def main(argv=None):
    import torch

    from dite.engine import load

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", choices=["sd3", "dit"])
    p.add_argument("--source", default=None, help="pipeline folder (default: the shipped demo)")
    p.add_argument("--n", type=int, default=100, help="held-out captions (sd3)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", default=None, help="write a PNG grid of the samples here")
    p.add_argument("--json", default=None, help="write the per-sample results here")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    pipe = load(args.source or f"demo-{args.model}")
    kwargs = {k: v for k, v in (("num_inference_steps", args.steps), ("guidance_scale", args.guidance)) if v is not None}
    t0 = time.time()
    if args.model == "sd3":
        cases = scenes.heldout_scenes(args.n)
        images = []
        for i in range(0, len(cases), 25):
            batch = cases[i:i + 25]
            out = pipe(prompt=[c.caption for c in batch], seed=args.seed + i, output_type="np", progress=False, **kwargs)
            images += [(im * 255).round().astype(np.uint8) for im in out.images]
        attrs = [c.attributes for c in cases]
        labels = [c.caption for c in cases]
    else:
        attrs, labels = [], []
        classes = list(range(scenes.NUM_CLASSES)) * 2
        out = pipe(class_labels=classes, seed=args.seed, output_type="np", progress=False, **kwargs)
        images = [(im * 255).round().astype(np.uint8) for im in out.images]
        for k in classes:
            shape, colour = divmod(k, len(scenes.COLOURS))
            attrs.append(scenes.Attributes(scenes.SHAPES[shape], scenes.COLOUR_NAMES[colour], "small", 1, 1))
            labels.append(scenes.class_name(k))
    wall = time.time() - t0
    results = []
    for image, a, label in zip(images, attrs, labels):
        found = analyse(image)
        results.append({"label": label, "found": found, **score(found, a)})
    keys = ("colour", "shape") if args.model == "dit" else ("colour", "position", "shape")
    acc = {k: float(np.mean([r[k] for r in results])) for k in keys}
    if args.model == "sd3":
        acc["colour_and_position"] = float(np.mean([r["colour"] and r["position"] for r in results]))
    print(json.dumps({"model": args.model, "samples": len(results), "accuracy": acc, "wall_s": round(wall, 1),
                      **kwargs}, indent=2))
    if args.grid:
        grid(images, 10).save(args.grid)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
