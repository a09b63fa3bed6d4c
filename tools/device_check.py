"""One prepared check for a session lent a CUDA GPU (at most ~8 minutes on one GPU).

    python tools/device_check.py                 # on the GPU: writes bench/device-<gpu>.md
    python tools/device_check.py --dry-run       # on a CPU, tiny sizes (the test suite runs this)

1. Parity: dite vs diffusers transformers with the same random weights (diffusers built from
   dite's config via `to_diffusers()`, dite filled from the diffusers state dict through its
   key map), DiT, SD3 and PixArt, in fp32 (max |diff| <= 1e-4) and bf16 (<= 5e-2), both
   relative to the output's largest magnitude where it exceeds 1, on the device.
2. Speed at SD3-medium and PixArt-XL sizes (random weights), 1024x1024, bf16, CFG batch 2:
   diffusers eager, dite eager, dite `compiled` (inductor), `compiled` with CUDA graphs
   (mode reduce-overhead), dite eager with ditcache+promptgate and with the best tuned spec
   (bench/tuned/demo-sd3-0.60.json's, as a spec: tuned files are tied to their model).
   s/step over 28 steps (median of 2 runs after a warm-up run), ratio to diffusers eager,
   peak memory. Not yet run on a GPU (no session so far was lent one).
--dry-run: CPU, tiny configs (32x32 pixels), 10 steps, compiled with the aot_eager backend
and no CUDA-graph row; the point is that the script never rots, not the numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TUNED = ROOT / "bench" / "tuned" / "demo-sd3-0.60.json"
RUNS = 2  # timed runs after the warm-up (the s/step is their median); 1 in a dry run


def configs(family: str, full: bool):
    """(dite config, latent side) at the release size (full) or tiny."""
    from dite.models.dit import DiTConfig
    from dite.models.mmdit import MMDiTConfig
    from dite.models.pixart import PixArtConfig

    if family == "sd3":
        return (MMDiTConfig(depth=24, num_heads=24, pos_embed_max_size=192), 128) if full else \
            (MMDiTConfig(depth=4, num_heads=2, head_dim=16, context_dim=32, pooled_dim=24, pos_embed_max_size=16,
                         sample_size=8), 4)
    if family == "pixart":
        return (PixArtConfig(micro_conditions=True), 128) if full else \
            (PixArtConfig(hidden_size=48, depth=4, num_heads=2, caption_channels=24, micro_conditions=True,
                          sample_size=8), 4)
    return DiTConfig(hidden_size=32, depth=2, num_heads=2, input_size=8, num_classes=10), 8


def pair(family: str, cfg, device, dtype):
    """(dite module, diffusers module) with the same random weights, on `device` in `dtype`."""
    from dite.engine.loading.weights import StateDictReader, build_module
    from dite.models import dit, mmdit, pixart

    if family == "sd3":
        from diffusers import SD3Transformer2DModel as Reference
        ours_cls, keymap = mmdit.MMDiT, mmdit.keymap(cfg, "diffusers")
        reference_config = cfg.to_diffusers()
    elif family == "pixart":
        from diffusers import PixArtTransformer2DModel as Reference
        ours_cls, keymap = pixart.PixArt, pixart.keymap(cfg, "diffusers")
        reference_config = cfg.to_diffusers()
    else:
        from diffusers import DiTTransformer2DModel as Reference
        ours_cls, keymap = dit.DiT, dit.keymap(cfg, "diffusers")
        reference_config = dict(num_attention_heads=cfg.num_heads, attention_head_dim=cfg.hidden_size // cfg.num_heads,
                                in_channels=4, out_channels=8, num_layers=cfg.depth, sample_size=cfg.input_size,
                                patch_size=cfg.patch_size, num_embeds_ada_norm=cfg.num_classes)
        # diffusers' DiT differs in two numeric details (freq_shift, the MLP norm's eps): its config says so
        cfg = dit.DiTConfig.from_diffusers(reference_config)
        keymap = dit.keymap(cfg, "diffusers")
    torch.manual_seed(0)
    reference_config = {k: v for k, v in reference_config.items() if not k.startswith("_")}
    with torch.device(device):
        reference = Reference.from_config(reference_config).to(dtype).eval()
        with torch.no_grad():
            for p in reference.parameters():
                p.normal_(0, 0.02)  # diffusers zero-initialises output layers: outputs would be 0
            if family == "dit":  # diffusers' DiT keeps a copy of one timestep embedder per block
                named = dict(reference.named_parameters())
                for key, value in named.items():
                    if ".norm1.emb." in key and not key.startswith("transformer_blocks.0."):
                        value.copy_(named["transformer_blocks.0." + key.split(".", 2)[2]])
    state = {k: v.detach().clone() for k, v in reference.state_dict().items()}  # dite gets its own copy
    ours = build_module(lambda: ours_cls(cfg), keymap[0], StateDictReader(state, "diffusers"), ignore=keymap[1],
                        dtype=dtype, device=device)
    return ours, reference


def inputs(family: str, cfg, side: int, device, dtype, text_tokens: int):
    """(x, timesteps, dite Conditioning, diffusers keywords) for a CFG batch of 2."""
    from dite.models.denoiser import Conditioning

    g = torch.Generator().manual_seed(1)
    channels = 16 if family == "sd3" else 4
    x = torch.randn(2, channels, side, side, generator=g).to(device, dtype)
    t = torch.tensor([999.0, 999.0], device=device)
    if family == "sd3":
        context = torch.randn(2, text_tokens, cfg.context_dim, generator=g).to(device, dtype)
        pooled = torch.randn(2, cfg.pooled_dim, generator=g).to(device, dtype)
        return x, t, Conditioning(context=context, pooled=pooled, cfg_row_order="uncond_first"), \
            dict(encoder_hidden_states=context, pooled_projections=pooled, timestep=t)
    if family == "pixart":
        context = torch.randn(2, text_tokens, cfg.caption_channels, generator=g).to(device, dtype)
        mask = torch.ones(2, text_tokens, dtype=torch.long, device=device)
        sizes = torch.tensor([[side * 8.0, side * 8.0, 1.0]] * 2, device=device, dtype=dtype)
        return x, t, Conditioning(context=context, context_mask=mask, pooled=sizes, cfg_row_order="uncond_first"), \
            dict(encoder_hidden_states=context, encoder_attention_mask=mask, timestep=t,
                 added_cond_kwargs={"resolution": sizes[:, :2], "aspect_ratio": sizes[:, 2:]})
    labels = torch.tensor([1, cfg.num_classes], device=device)
    return x, t, Conditioning(class_labels=labels, cfg_row_order="cond_first"), dict(timestep=t, class_labels=labels)


@torch.inference_mode()
def parity(device, dry_run: bool) -> list[dict]:
    rows = []
    for family in ("dit", "sd3", "pixart"):
        for dtype in (torch.float32, torch.bfloat16):
            cfg, side = configs(family, full=False)
            ours, reference = pair(family, cfg, device, dtype)
            x, t, cond, kwargs = inputs(family, cfg, side, device, dtype, text_tokens=7)
            got = ours(x, t, cond).float()
            expected = reference(x, return_dict=False, **kwargs)[0].float()
            if family == "dit":
                got, expected = got[:, :4], expected[:, :4]  # dite returns the learned sigma channels too
            diff = float((got - expected).abs().max())
            scale = float(expected.abs().max())
            limit = (1e-4 if dtype == torch.float32 else 5e-2) * max(scale, 1.0)
            rows.append({"family": family, "dtype": str(dtype).removeprefix("torch."), "max_diff": diff,
                         "scale": scale, "limit": limit, "ok": diff <= limit})
    return rows


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_reset(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak(device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


@torch.inference_mode()
def time_dite(ours, family, cond, x, steps, spec, executor, device) -> tuple[float, float | None]:
    """Median s/step of dite's sampling loop (runtime.sampling.denoise) over `steps` steps,
    after one warm-up call (which builds compiled graphs)."""
    from dite.accel import PlanContext, as_methods, build_plans, resolve
    from dite.engine.runtime.sampling import GenerationState, denoise
    from dite.schedulers import by_name

    scheduler = by_name("flow_euler" if family == "sd3" else "ddim")
    ctx = PlanContext(family, len(ours.blocks), steps, True, "device-check")
    plans = build_plans(resolve(as_methods(spec), ctx), ctx)
    channels = x.shape[1]

    def run():
        state = GenerationState(scheduler=scheduler.start(steps, device=device))
        sync(device)
        start = time.perf_counter()
        denoise(ours, scheduler, x[:1].clone(), cond, state, plans=plans, guidance_scale=4.0,
                prediction_channels=channels, progress=False, executor=executor)
        sync(device)
        return (time.perf_counter() - start) / steps

    return median_and_peak(run, device)


@torch.inference_mode()
def time_reference(reference, kwargs, x, steps, device) -> tuple[float, float | None]:
    """Median s/step of the diffusers transformer on the CFG batch (one forward a step)."""
    def run():
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            reference(x, return_dict=False, **kwargs)
        sync(device)
        return (time.perf_counter() - start) / steps

    return median_and_peak(run, device)


def median_and_peak(run, device) -> tuple[float, float | None]:
    """After a warm-up run: the median of RUNS runs' s/step, and the peak memory over them."""
    run()
    peak_reset(device)
    seconds = statistics.median(run() for _ in range(RUNS))
    return seconds, peak(device)


def portable_spec(tuned: dict, steps: int) -> str:
    """The tuned file's method for another model and step count: block ranges back to each
    method's default for the model's depth, a schedule's computed steps scaled from the file's
    step count to `steps` (the file itself refuses any other model: tuned files are tied to one)."""
    from dataclasses import replace

    from dite.accel import parse_spec
    from dite.accel.schedule import StepSchedule, format_steps, parse_steps

    methods = []
    for method in parse_spec(tuned["spec"]) if tuned["spec"] != "none" else []:
        if hasattr(method, "blocks"):
            method = replace(method, blocks=None)
        if isinstance(method, StepSchedule):
            def scaled(text: str, what: str, need_first: bool) -> set[int]:
                listed = parse_steps(method.name, text, tuned["steps"], what, need_first)
                return {round(i * (steps - 1) / (tuned["steps"] - 1)) for i in listed}

            run = scaled(method.run, "run", True)
            # order-2 steps must stay skipped ones; none left means order 1 throughout
            high = scaled(method.high, "high", False) - run if method.high else set()
            method = replace(method, run=format_steps(sorted(run)), high=format_steps(sorted(high)) if high else None,
                             order=method.order if high or not method.high else 1)
        methods.append(method.spec())
    return "+".join(methods)


def speed(device, dry_run: bool) -> list[dict]:
    from dite.engine.runtime.executors import make_executor

    dtype = torch.float32 if dry_run else torch.bfloat16
    global RUNS
    steps = 10 if dry_run else 28  # the tuned spec's warm-up (8 steps) needs at least that many
    tuned = portable_spec(json.loads(TUNED.read_text()), steps) if TUNED.exists() else None
    RUNS = 1 if dry_run else RUNS
    backend = {"backend": "aot_eager"} if dry_run else {}
    variants = [("dite eager", "", lambda: make_executor("eager")),
                ("dite compiled", "", lambda: make_executor("compiled", **backend))]
    if device.type == "cuda":
        variants.append(("dite compiled + CUDA graphs", "",
                         lambda: make_executor("compiled", mode="reduce-overhead")))
    variants.append(("dite eager ditcache+promptgate", "ditcache+promptgate", lambda: make_executor("eager")))
    if tuned:
        variants.append((f"dite eager tuned ({tuned})", tuned, lambda: make_executor("eager")))
    rows = []
    for family, tokens in (("sd3", 333), ("pixart", 120)):
        cfg, side = configs(family, full=not dry_run)
        ours, reference = pair(family, cfg, device, dtype)
        x, _, cond, kwargs = inputs(family, cfg, side, device, dtype, text_tokens=7 if dry_run else tokens)
        base, memory = time_reference(reference, kwargs, x, steps, device)
        rows.append({"model": family, "variant": "diffusers eager", "s_per_step": base, "ratio": 1.0,
                     "peak_gib": memory})
        del reference
        for name, spec, executor in variants:
            seconds, memory = time_dite(ours, family, cond, x, steps, spec or None, executor(), device)
            rows.append({"model": family, "variant": name, "s_per_step": seconds, "ratio": base / seconds,
                         "peak_gib": memory})
        del ours
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def markdown(device_name: str, parity_rows, speed_rows, meta) -> str:
    lines = [f"# Device check: {device_name}", "", f"`{meta['command']}`; torch {meta['torch']}, "
             f"diffusers {meta['diffusers']}; {meta['seconds']:.0f} s in all.", "", "## Parity (tiny models)", "",
             "| family | dtype | max abs diff | max abs output | limit | ok |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['family']} | {r['dtype']} | {r['max_diff']:.2e} | {r['scale']:.3g} | {r['limit']:.1e} | "
              f"{'yes' if r['ok'] else 'NO'} |" for r in parity_rows]
    lines += ["", "## Speed (random weights; s/step of a CFG batch of 2 over 28 steps (dry run: 10), median of 2 runs after a warm-up)", "",
              "| model | variant | s/step | x diffusers | peak GiB |", "|---|---|---|---|---|"]
    for r in speed_rows:
        memory = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "n/a (CPU)"
        lines.append(f"| {r['model']} | {r['variant']} | {r['s_per_step']:.4f} | {r['ratio']:.2f} | {memory} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: check the script runs")
    parser.add_argument("--out", default=str(ROOT / "bench"), help="folder for device-*.md and .json")
    args = parser.parse_args(argv)
    import diffusers

    diffusers.utils.logging.set_verbosity_error()  # its notes on casting with .to() are not ours
    start = time.perf_counter()
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("device_check: no CUDA GPU here; use --dry-run on a CPU", file=sys.stderr)
        return 2
    name = "dry-run-cpu" if args.dry_run else torch.cuda.get_device_name().replace(" ", "-").lower()
    parity_rows = parity(device, args.dry_run)
    speed_rows = speed(device, args.dry_run)
    meta = {"command": "python tools/device_check.py" + (" --dry-run" if args.dry_run else ""),
            "torch": torch.__version__, "diffusers": diffusers.__version__, "seconds": time.perf_counter() - start}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"device-{name}.md").write_text(markdown(name, parity_rows, speed_rows, meta))
    (out / f"device-{name}.json").write_text(json.dumps({"parity": parity_rows, "speed": speed_rows, **meta}, indent=1))
    print(out / f"device-{name}.md")
    return 0 if all(r["ok"] for r in parity_rows) else 1


if __name__ == "__main__":
    sys.exit(main())
