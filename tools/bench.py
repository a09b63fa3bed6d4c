"""Benchmark acceleration specs against the plain run of the same model, in one process.

    # wall time, FLOPs, memory, fidelity on a real (or demo / random) model:
    python tools/bench.py --model random-dit/DiT-S-8.pt --vae random-dit/vae --class-label 207 \
        --steps 20 --accel ditcache ditcache+promptgate todo --repeats 3 --out bench/dit-s

    # FLOPs only, full-size configs on the meta device (no weights, no memory):
    python tools/bench.py --preset sd3-medium --steps 28 --size 1024x1024 \
        --accel "" ditcache ditcache+promptgate ditcache+promptgate+todo --out bench/sd3-medium-flops

Runs are interleaved (plain, A, B, plain, A, B, ...) so a noisy machine slows every spec
alike; each number is the median over repeats and every ratio is against the plain run of
the same round. Fidelity is PSNR and max |diff| of the image against the plain image of
the same seed. With diffusers installed and a diffusers folder as --model, the same
plain config in diffusers is one more row. Writes NAME.md, NAME.json and NAME.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dite.accel import PlanContext, as_methods, build_plans, resolve
from dite.engine.runtime.accounting import step_flops
from dite.models.denoiser import Conditioning

PRESETS = {
    # family, denoiser builder, latent channels, VAE factor, default size, default steps
    "sd3-medium": ("sd3", 16, 8, 1024, 28),
    "sd3.5-large": ("sd3", 16, 8, 1024, 28),
    "dit-xl-2-256": ("dit", 4, 8, 256, 50),
    "dit-xl-2-512": ("dit", 4, 8, 512, 50),
    "pixart-xl-2-1024": ("pixart", 4, 8, 1024, 20),
}


def preset_denoiser(name: str, t5_tokens: int):
    """(meta denoiser, conditioning with CFG rows for one image) of a released config."""
    with torch.device("meta"):
        if name.startswith("sd3"):
            from dite.models.mmdit import MMDiT, MMDiTConfig

            cfg = (MMDiTConfig(depth=24, num_heads=24, pos_embed_max_size=192) if name == "sd3-medium"
                   else MMDiTConfig(depth=38, num_heads=38, pos_embed_max_size=192, qk_norm=True))
            model = MMDiT(cfg).to(torch.float16)
            cond = Conditioning(context=torch.empty(2, 77 + t5_tokens, 4096), pooled=torch.empty(2, 2048),
                                cfg_row_order="uncond_first")
            return model, cond
        if name.startswith("pixart"):
            from dite.models.pixart import PixArt, PixArtConfig

            # PixArt-α-XL-2-1024-MS: micro-conditions, T5 length 120 (the --max-sequence-length is SD3's)
            model = PixArt(PixArtConfig(micro_conditions=True)).to(torch.float16)
            cond = Conditioning(context=torch.empty(2, 120, 4096), context_mask=torch.ones(2, 120, dtype=torch.bool),
                                pooled=torch.empty(2, 3), cfg_row_order="uncond_first")
            return model, cond
        from dite.models.dit import DiT, DiTConfig

        cfg = DiTConfig.preset("DiT-XL/2-512" if name.endswith("512") else "DiT-XL/2")
        return DiT(cfg).to(torch.float16), Conditioning(class_labels=torch.zeros(2, dtype=torch.long),
                                                        cfg_row_order="cond_first")


PATTERNS = {
    # Uniform DiTFastAttn plans for FLOP tables of full-size configs (no weights to calibrate
    # on): every layer, every step after the first, one method.
    "window": "residual_window_attn",
    "window+asc": "residual_window_attn+cfg_attn_share",
    "asc": "full_attn+cfg_attn_share",
    "share-alternate": None,  # output_share on every other step
}


def pattern_plan(pattern: str, depth: int, steps: int, window: int, folder: Path) -> str:
    """Write a uniform plan file for `pattern`; returns the accel spec that loads it."""
    from dite.accel.fastattn import write_plan

    def label(step: int) -> str:
        if step == 0:
            return "full_attn"
        if pattern == "share-alternate":
            return "output_share" if step % 2 else "full_attn"
        return PATTERNS[pattern]

    path = folder / f"fastattn-{pattern}-{steps}.json"
    write_plan(path, [[label(s) for s in range(steps)] for _ in range(depth)],
               {"model": "uniform pattern", "model_id": "", "steps": steps, "window": window, "pattern": pattern})
    return f"fastattn(plan={path})"


def flops_rows(args) -> list[dict]:
    family, channels, factor, size, steps = PRESETS[args.preset]
    steps = args.steps or steps
    w, h = args.size or (size, size)
    model, cond = preset_denoiser(args.preset, args.max_sequence_length)
    depth = len(model.blocks)
    ctx = PlanContext(family, depth, steps, True)
    tokens = (h // factor // model.config.patch_size) * (w // factor // model.config.patch_size)
    folder = Path(args.out).parent / "plans"
    folder.mkdir(parents=True, exist_ok=True)
    specs = list(args.accel) + [pattern_plan(p, depth, steps, tokens // 8, folder) for p in args.fastattn_pattern]
    names = list(args.accel) + [f"fastattn {p}, w=N/8={tokens // 8}" for p in args.fastattn_pattern]
    rows, plain = [], None
    for name, spec in zip(names, specs):
        methods = resolve(as_methods(spec), ctx)
        plans = build_plans(methods, ctx)
        per_step = step_flops(model, plans, (1, channels, h // factor, w // factor), cond)
        flops, attention = sum(s["total"] for s in per_step), sum(s["attention"] for s in per_step)
        evaluations = sum((2 if p.cfg_mode == "both" else 1) * len(p.computed_blocks(depth)) for p in plans)
        plain = plain or (flops, attention)
        rows.append({"accel": name or "none", "resolved": "+".join(m.spec() for m in methods) or "none",
                     "tflops": flops / 1e12, "flops_ratio": flops / plain[0],
                     "attention_flops_ratio": attention / plain[1],
                     "block_evaluations": evaluations, "speedup_bound": plain[0] / flops})
    return rows


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def call(pipe, spec, args, latents):
    kw = dict(num_inference_steps=args.steps, latents=latents.clone(), output_type="np", progress=False,
              accel=spec or None)
    if args.size:
        kw["width"], kw["height"] = args.size
    if args.guidance is not None:
        kw["guidance_scale"] = args.guidance
    if pipe.family == "dit":
        return pipe(class_labels=[int(args.class_label)], **kw)
    return pipe(prompt=args.prompt, max_sequence_length=args.max_sequence_length, **kw)


def diffusers_runner(args, pipe):
    """A function running the plain config in diffusers, or None when it cannot run here
    (diffusers missing, or the model is not a diffusers folder)."""
    try:
        import diffusers
    except ImportError:
        return None
    if not args.model or not Path(args.model, "model_index.json").is_file():
        return None
    ref = diffusers.DiffusionPipeline.from_pretrained(args.model, dtype=pipe.dtype).to(args.device)
    ref.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=args.steps, output_type="np")
    if args.guidance is not None:
        kw["guidance_scale"] = args.guidance
    if args.size:
        kw["width"], kw["height"] = args.size

    def run(latents):
        if pipe.family == "dit":  # DiTPipeline takes no latents: same wall work, other noise
            return ref(class_labels=[int(args.class_label)], generator=torch.Generator().manual_seed(args.seed),
                       num_inference_steps=args.steps, output_type="np",
                       **({"guidance_scale": args.guidance} if args.guidance is not None else {})).images, False
        return ref(prompt=args.prompt, latents=latents.clone(), max_sequence_length=args.max_sequence_length,
                   **kw).images, True
    return run


def wall_rows(args) -> list[dict]:
    from dite.engine import load

    pipe = load(args.model, device=args.device, dtype=args.dtype, vae=args.vae)
    size = args.size or (None, None)
    h, w = pipe.latent_size(size[1], size[0], getattr(pipe.transformer.config, "sample_size", None)
                            or pipe.transformer.config.input_size)
    latents = torch.randn(1, pipe.transformer.config.in_channels, h, w,
                          generator=torch.Generator().manual_seed(args.seed)).to(args.device, pipe.dtype)
    specs = [s for s in args.accel if s not in ("", "none")]
    specs.insert(0, "")
    reference = diffusers_runner(args, pipe) if args.diffusers else None
    names = specs + (["diffusers"] if reference else [])
    times = {s: [] for s in names}
    peaks, images, stats = {}, {}, {}
    call(pipe, "", args, latents)  # warm-up: allocator, oneDNN kernels, lazy tables
    for _ in range(args.repeats):
        for name in names:
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            if name == "diffusers":
                images[name], comparable = reference(latents)
                times[name].append(time.perf_counter() - start)
            else:
                out = call(pipe, name, args, latents)
                times[name].append(out.timings["denoise"])
                images[name], stats[name] = out.images, out.stats
            if torch.cuda.is_available():
                peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated())
    base = statistics.median(times[""])
    rows = []
    for name in names:
        wall = statistics.median(times[name])
        same_noise = name != "diffusers" or comparable
        row = {"accel": name or "none", "resolved": stats[name]["accel"] if name in stats else "diffusers, plain",
               "flops_ratio": stats[name]["flops_ratio"] if name in stats else None,
               "block_evaluations": stats[name]["block_evaluations"] if name in stats else None,
               "denoise_s": wall, "wall_ratio": wall / base,
               "peak_mem_gb": peaks[name] / 2**30 if name in peaks else None,
               "psnr_db": psnr(images[name], images[""]) if same_noise else None,
               "max_abs_diff": float(np.abs(images[name] - images[""]).max()) if same_noise else None}
        rows.append(row)
    return rows


def markdown(rows: list[dict], title: str) -> str:
    cols = [c for c in ("accel", "resolved", "tflops", "flops_ratio", "attention_flops_ratio", "speedup_bound", "block_evaluations",
                        "denoise_s", "wall_ratio", "peak_mem_gb", "psnr_db", "max_abs_diff") if c in rows[0]]
    lines = [f"### {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r[c]
            cells.append("—" if v is None else f"{v:.3f}" if isinstance(v, float) else f"`{v}`" if c == "resolved" else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: install matplotlib (pip install 'dite[bench]')", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    y = "psnr_db" if "psnr_db" in rows[0] else "speedup_bound"
    for r in rows:
        if r.get(y) is None or r.get("flops_ratio") is None:
            continue
        value = min(r[y], 60.0) if y == "psnr_db" else r[y]  # identical images have infinite PSNR
        ax.scatter(r["flops_ratio"], value)
        ax.annotate(r["accel"], (r["flops_ratio"], value), fontsize=7)
    ax.set_xlabel("denoiser FLOPs / plain")
    ax.set_ylabel("PSNR vs plain (dB, capped at 60)" if y == "psnr_db" else "FLOPs speed-up bound")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def _size(text: str) -> tuple[int, int]:
    w, h = text.lower().split("x")
    return int(w), int(h)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="anything dite.engine.load takes")
    src.add_argument("--preset", choices=sorted(PRESETS), help="FLOPs only, full-size config on the meta device")
    p.add_argument("--accel", nargs="+", default=["", "ditcache", "ditcache+promptgate", "todo"],
                   help='specs to compare; "" is the plain run')
    p.add_argument("--fastattn-pattern", nargs="*", default=[], choices=sorted(PATTERNS),
                   help="presets: add rows for uniform DiTFastAttn plans (window w = N/8 as in the reference)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--size", type=_size, default=None, metavar="WxH")
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--prompt", default="a red circle at the top left")
    p.add_argument("--class-label", default="0")
    p.add_argument("--max-sequence-length", type=int, default=256)
    p.add_argument("--vae", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--no-diffusers", dest="diffusers", action="store_false",
                   help="skip the diffusers baseline row (run when diffusers is installed and --model is a folder)")
    p.add_argument("--out", default="bench/result", help="path stem of the .md, .json and .png written")
    args = p.parse_args(argv)

    if args.preset:
        rows = flops_rows(args)
        title = f"{args.preset}, {args.steps or PRESETS[args.preset][4]} steps, FLOPs on meta"
    else:
        if args.steps is None:
            args.steps = 20
        rows = wall_rows(args)
        title = f"{args.model}, {args.steps} steps, {args.device} {args.dtype}, median of {args.repeats}"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table = markdown(rows, title)
    out.with_suffix(".md").write_text(table)
    env = {"torch": torch.__version__, "device": args.device, "threads": torch.get_num_threads(),
           "argv": sys.argv[1:] if argv is None else argv}
    out.with_suffix(".json").write_text(json.dumps({"title": title, "env": env, "rows": rows}, indent=2))
    plot(rows, out.with_suffix(".png"), title)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
