"""The fidelity harness: accuracy of generated demo scenes, and fidelity to the plain image,
for a list of accel specs against the fewer-steps baseline at the same FLOPs.

    python tools/eval_quality.py --model demo-sd3 --prompts 100 \
        --accel ditcache promptgate ditcache+promptgate todo deltacache --out bench/quality-demo-sd3
    python tools/eval_quality.py --model demo-dit --prompts 54 --accel ditcache deltacache --out bench/quality-demo-dit

Prompts are held-out captions of the demo dataset (tools/demo_scenes.py: never seen in
training); a class-conditional model gets their class (shape x colour). Each image is read
by tools/scene_checker.py and scored on what was asked: colour and position (text models;
the headline "accuracy" needs both right), shape and size too (reported separately). PSNR
and SSIM are against the plain run's image of the same seed.

Second-generation demos (`--scenes v2`, the default for the v2 demo names): held-out scenes
of tools/demo_scenes_v2.py (one to three objects, relations, counts) generated at 128 px and
read by tools/scene_checker_v2.py; the headline "accuracy" is its per-kind `correct` (single:
colour in the asked cell; relation: the relation holds; count: exactly n of the colour),
"accuracy_strict" adds shape, `acc_<kind>` is the headline per kind and the attribute
columns are the checker's (count, colour, shape, position, size, relation); NAME.md adds a
kind x attribute table of the plain run and NAME.json the scenes' captions.

    python tools/eval_quality.py --model demo-pixart --scenes v2 --prompts 200 --samples --out bench/quality-demo-pixart

Every method is shown next to the plain model run with proportionally fewer steps at the
same denoiser FLOPs (`steps = round(T * flops_ratio)`): a method is only worth having if it
beats simply sampling with fewer steps. Writes NAME.md, NAME.json and NAME.png (accuracy and
PSNR against FLOPs), and with --samples NAME-samples.png, a grid of the plain images.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

from bench import psnr  # noqa: E402  (one PSNR for both tools)
import demo_scenes_v2 as scenes_v2  # noqa: E402
import scene_checker_v2 as checker_v2  # noqa: E402
from demo_scenes import heldout_scenes  # noqa: E402
from scene_checker import detect, score  # noqa: E402

from dite.engine.runtime.calibrate import ssim_loss  # noqa: E402

V2_DEMOS = scenes_v2.DEMOS  # names whose default --scenes is v2
V2_COLUMNS = ["method", "steps", "flops_ratio", "attn_flops_ratio", "wall_ratio", "accuracy", "accuracy_strict",
              "acc_single", "acc_relation", "acc_count", *checker_v2.ATTRIBUTES, "psnr_db", "ssim"]


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    ta, tb = (torch.from_numpy(x).permute(0, 3, 1, 2).float() for x in (a, b))
    return float(1 - ssim_loss(ta, tb))


def is_v2(scenes) -> bool:
    return bool(scenes) and isinstance(scenes[0], scenes_v2.Scene)


def image_options(pipe, scenes) -> dict:
    """Call keywords for the scenes' picture size: v2 scenes are 128 px whatever the model's
    default, and PixArt's resolution bins (tables for an 8x-down VAE) would generate a
    4x-down model at another size and resize."""
    if not is_v2(scenes):
        return {}
    options = {"height": scenes_v2.IMAGE_SIZE, "width": scenes_v2.IMAGE_SIZE}
    if pipe.family == "pixart":
        options["use_resolution_binning"] = False
    return options


def generate(pipe, scenes, args, steps: int | None, accel: str | None):
    """Images [N, H, W, 3] in [0, 1], the stats of the first batch, and the denoise seconds."""
    images, stats, seconds = [], None, 0.0
    for start in range(0, len(scenes), args.batch):
        chunk = scenes[start:start + args.batch]
        kw = dict(seed=args.seed + start, output_type="np", progress=False, accel=accel, **image_options(pipe, scenes))
        if steps is not None:
            kw["num_inference_steps"] = steps
        if args.guidance is not None:
            kw["guidance_scale"] = args.guidance
        if pipe.family == "dit":
            out = pipe(class_labels=[s.attributes.class_id for s in chunk], **kw)
        else:
            out = pipe(prompt=[s.caption for s in chunk], **kw)
        images.append(out.images)
        stats = stats or out.stats
        seconds += out.timings["denoise"]
    return np.concatenate(images), stats, seconds


def short(method: str) -> str:
    """A method name for tables and plots: plan files by their stem, not their path."""
    return re.sub(r"plan=([^,)]*/)?([^,)/]+?)(\.json)?(?=[,)])", r"plan=\2", method)


def evaluate(images, scenes, family: str) -> dict[str, float]:
    if is_v2(scenes):
        return evaluate_v2(images, scenes)
    checks = [score(detect(img), sc.attributes) for img, sc in zip(images, scenes)]
    asked = ("colour", "shape") if family == "dit" else ("colour", "position")
    out = {k: float(np.mean([c[k] for c in checks])) for k in ("colour", "shape", "position", "size")}
    out["accuracy"] = float(np.mean([all(c[k] for k in asked) for c in checks]))
    return out


def evaluate_v2(images, scenes) -> dict:
    """The v2 checker's headline (overall, strict, per kind), its attributes over all scenes,
    and its whole kind x attribute summary under "by_kind"."""
    summary = checker_v2.summarize([checker_v2.score(checker_v2.detect_all(img), sc)
                                    for img, sc in zip(images, scenes)], scenes)
    out = {"accuracy": summary["all"]["correct"], "accuracy_strict": summary["all"]["correct_strict"]}
    out.update({f"acc_{kind}": summary[kind]["correct"] for kind in scenes_v2.KINDS})
    out.update({key: summary["all"][key] for key in checker_v2.ATTRIBUTES})
    out["by_kind"] = summary
    return out


def row(name, images, stats, seconds, plain_images, scenes, family, steps, base_seconds):
    r = {"method": name, "steps": steps, "flops_ratio": stats["flops_ratio"],
         "attn_flops_ratio": stats["attention_flops_ratio"], "wall_ratio": seconds / base_seconds,
         **evaluate(images, scenes, family)}
    r["psnr_db"] = psnr(images, plain_images)
    r["ssim"] = ssim(images, plain_images)
    return r


def measure(pipe, scenes, args, specs, fewer_steps: bool = True) -> tuple[list[dict], np.ndarray]:
    """Rows for the plain run, each accel spec and (if asked) the fewer-steps baselines, and
    the plain images [N, H, W, 3]."""
    images, stats, seconds = generate(pipe, scenes, args, args.steps, None)
    steps = args.steps or len(stats["steps"])
    rows = [row("plain", images, stats, seconds, images, scenes, pipe.family, steps, seconds)]
    fewer = set()
    for spec in specs:
        start = time.perf_counter()
        imgs, st, sec = generate(pipe, scenes, args, args.steps, spec)
        rows.append(row(spec, imgs, st, sec, images, scenes, pipe.family, steps, seconds))
        fewer.add(max(1, round(steps * st["flops_ratio"])))
        print(f"{spec}: {time.perf_counter() - start:.1f}s", file=sys.stderr)
    for n in sorted(fewer - {steps}) if fewer_steps else ():
        imgs, st, sec = generate(pipe, scenes, args, n, None)
        rows.append(row(f"fewer steps ({n})", imgs, st, sec, images, scenes, pipe.family, n, seconds))
        rows[-1]["flops_ratio"] = rows[-1]["attn_flops_ratio"] = n / steps  # same plan every step
    return rows, images


# Slack between a recorded measurement and its floor: one prompt's worth of accuracy and 1 dB of
# PSNR, so float differences between CPUs cannot fail the test but a broken method (a wrong
# cache, a dropped gate: many dB, many prompts) does.
PSNR_SLACK_DB = 1.0


def record_floors(path: Path, args, rows: list[dict]) -> None:
    """Write this run's settings and floors as the regression tests' entry for args.model."""
    entry = {
        "prompts": args.prompts, "seed": args.seed, "steps": args.steps, "guidance": args.guidance,
        "batch": args.batch, "accuracy": rows[0]["accuracy"],
        "accuracy_floor": max(0.0, rows[0]["accuracy"] - 1.0 / args.prompts),
        "psnr_db": {r["method"]: r["psnr_db"] for r in rows[1:]},
        "psnr_floor_db": {r["method"]: r["psnr_db"] - PSNR_SLACK_DB for r in rows[1:]},
    }
    if getattr(args, "scenes", "v1") == "v2":  # tests/test_demo_fidelity.py then draws demo_scenes_v2's held-out scenes
        entry["scenes"] = "v2"
    floors = json.loads(path.read_text()) if path.exists() else {}
    floors[args.model] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(floors, indent=2, sort_keys=True) + "\n")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo-sd3")
    p.add_argument("--scenes", choices=["auto", "v1", "v2"], default="auto",
                   help="held-out scenes of tools/demo_scenes.py (v1) or demo_scenes_v2.py (v2); auto: v2 for "
                        + ", ".join(V2_DEMOS) + ", else v1")
    p.add_argument("--prompts", type=int, default=100, help="held-out captions (classes for a DiT)")
    p.add_argument("--accel", nargs="*", default=["ditcache", "promptgate", "ditcache+promptgate", "todo", "deltacache"])
    p.add_argument("--steps", type=int, default=None, help="default: the model's")
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=25)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="bench/quality")
    p.add_argument("--samples", action="store_true", help="also write a grid of the plain images")
    p.add_argument("--record-floors", metavar="FILE", default=None,
                   help="record this run's accuracy and PSNR floors for the regression tests (JSON, one entry per model)")
    args = p.parse_args(argv)
    if args.scenes == "auto":
        args.scenes = "v2" if args.model in V2_DEMOS else "v1"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)

    from dite.engine import load

    pipe = load(args.model, device=args.device)
    if args.scenes == "v2" and pipe.family == "dit":
        print(f"eval_quality: --scenes v2 needs a text-to-image model (SD3 or PixArt); {args.model} is "
              "class-conditional: use --scenes v1", file=sys.stderr)
        return 2
    scenes = (scenes_v2.heldout_scenes if args.scenes == "v2" else heldout_scenes)(args.prompts, seed=args.seed)
    rows, images = measure(pipe, scenes, args, args.accel, fewer_steps=not args.record_floors)
    if args.record_floors:
        record_floors(Path(args.record_floors), args, rows)
    print(write_report(Path(args.out), args, rows, images, scenes))
    return 0


def cell(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else "—" if value is None else str(value)


def write_report(out: Path, args, rows: list[dict], images: np.ndarray, scenes) -> str:
    """NAME.md (returned), NAME.json, NAME.png and with --samples NAME-samples.png."""
    out.parent.mkdir(parents=True, exist_ok=True)
    v2 = is_v2(scenes)
    cols = V2_COLUMNS if v2 else ["method", "steps", "flops_ratio", "attn_flops_ratio", "wall_ratio", "accuracy",
                                  "colour", "shape", "position", "size", "psnr_db", "ssim"]
    what = "held-out v2 scenes" if v2 else "held-out prompts"
    title = f"{args.model}, {len(scenes)} {what}, {rows[0]['steps']} steps, seed {args.seed}"
    lines = [f"### {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [cell(r.get(c, "—")) for c in cols]
        lines.append("| " + " | ".join([short(cells[0])] + cells[1:]) + " |")
    report = {"title": title, "rows": rows}
    if v2:
        lines += by_kind_table(rows[0]["by_kind"])
        report["scenes"] = [{"kind": sc.kind, "caption": sc.caption} for sc in scenes]
    table = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(table)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    plot(rows, out.with_suffix(".png"), title)
    if args.samples:
        sample_grid(images).save(out.with_name(out.name + "-samples.png"))
    return table


def by_kind_table(summary: dict) -> list[str]:
    """The plain run's checker summary as markdown lines: one row per kind (and all)."""
    cols = ["n", "correct", "correct_strict", *checker_v2.ATTRIBUTES]
    lines = ["", "plain, per kind (— where the kind asks no such thing):", "",
             "| kind | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    lines += [f"| {kind} | " + " | ".join(cell(row[c]) for c in cols) + " |" for kind, row in summary.items()]
    return lines


def sample_grid(images: np.ndarray, columns: int = 10):
    """The images [N, H, W, 3] in [0, 1] as one PIL image, `columns` wide, white-padded."""
    from PIL import Image

    n, h, w, _ = images.shape
    rows = -(-n // columns)
    canvas = np.ones((rows * h, columns * w, 3), dtype=np.float32)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        canvas[r * h:(r + 1) * h, c * w:(c + 1) * w] = image
    return Image.fromarray((canvas * 255).round().astype(np.uint8))


def plot(rows, path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: install matplotlib (pip install 'dite[bench]')", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    baseline = sorted((r for r in rows if r["method"].startswith("fewer steps") or r["method"] == "plain"),
                      key=lambda r: r["flops_ratio"])
    for ax, key, label in ((axes[0], "accuracy", "accuracy"), (axes[1], "psnr_db", "PSNR vs plain (dB, capped 60)")):
        values = lambda rs: [min(r.get(key, 0.0), 60.0) for r in rs]  # noqa: E731
        ax.plot([r["flops_ratio"] for r in baseline], values(baseline), "k--o", label="fewer steps")
        for r in rows:
            if r in baseline:
                continue
            ax.scatter(r["flops_ratio"], values([r])[0])
            ax.annotate(short(r["method"]), (r["flops_ratio"], values([r])[0]), fontsize=7)
        ax.set_xlabel("denoiser FLOPs / plain")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
