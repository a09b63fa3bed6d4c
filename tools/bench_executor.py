"""Compiled vs eager executor on a randomly initialised denoiser: compile time and per-step time.

    python tools/bench_executor.py --family dit --width 384 --depth 12 --heads 6 --latent 32 \
        --steps 8 --accel "" ditcache+promptgate --executors eager compiled:aot_eager compiled:inductor \
        --out bench/executor-dit-s

Each (accel, executor) runs one generation to build and warm its graphs (its compile time is
what out.stats reports) and then `--repeats` timed generations, interleaved across executors;
per-step time is the median generation's denoise time / steps, and `speedup` is eager's
per-step time over the executor's, same accel. Random weights: only time is measured, and
the maximum difference to eager's latents is shown as a check. Writes NAME.md and NAME.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from dite.accel import PlanContext, as_methods, build_plans, resolve
from dite.engine.runtime.executors import make_executor
from dite.engine.runtime.sampling import GenerationState, denoise
from dite.models.denoiser import Conditioning
from dite.models.dit import DiT, DiTConfig
from dite.models.mmdit import MMDiT, MMDiTConfig
from dite.schedulers import by_name


def build(args):
    torch.manual_seed(0)
    if args.family == "dit":
        model = DiT(DiTConfig(hidden_size=args.width, depth=args.depth, num_heads=args.heads,
                              input_size=args.latent))
        model.init_computed_buffers(torch.device("cpu"))
        cond = Conditioning(class_labels=torch.tensor([1, 1000]), cfg_row_order="cond_first")
        channels, scheduler = 4, "ddim"
    else:
        model = MMDiT(MMDiTConfig(depth=args.depth, num_heads=args.heads, head_dim=args.width // args.heads,
                                  pos_embed_max_size=args.latent, sample_size=args.latent))
        cond = Conditioning(context=torch.randn(2, args.text_tokens, 4096), pooled=torch.randn(2, 2048),
                            cfg_row_order="uncond_first")
        channels, scheduler = 16, "flow_euler"
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model.eval(), cond, channels, scheduler


def generate(model, cond, channels, scheduler, plans, executor):
    sched = by_name(scheduler)
    state = GenerationState(scheduler=sched.start(len(plans)))
    x = torch.randn(1, channels, model_latent(model), model_latent(model), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        start = time.perf_counter()
        out = denoise(model, sched, x, cond, state, guidance_scale=4.0, prediction_channels=channels,
                      plans=plans, progress=False, executor=executor)
        return out, time.perf_counter() - start, state.executor


def model_latent(model) -> int:
    cfg = model.config
    return cfg.input_size if hasattr(cfg, "input_size") else cfg.sample_size


def executor_for(spec: str):
    name, _, backend = spec.partition(":")
    return make_executor(name, **({"backend": backend} if backend else {}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=["dit", "sd3"], default="dit")
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--latent", type=int, default=32, help="latent side (DiT: 32 = 256 px)")
    p.add_argument("--text-tokens", type=int, default=77)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--accel", nargs="+", default=[""])
    p.add_argument("--executors", nargs="+", default=["eager", "compiled:aot_eager", "compiled:inductor"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="NAME: writes NAME.md and NAME.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, cond, channels, scheduler = build(args)
    rows = []
    for accel in args.accel:
        ctx = PlanContext(model.family, len(model.blocks), args.steps, True)
        plans = build_plans(resolve(as_methods(accel), ctx), ctx)
        executors = {spec: executor_for(spec) for spec in args.executors}
        first = {}
        for spec, ex in executors.items():  # build and warm (compile time), and the check latents
            out, wall, stats = generate(model, cond, channels, scheduler, plans, ex)
            first[spec] = (out, wall, stats)
        times = {spec: [] for spec in executors}
        for _ in range(args.repeats):  # interleaved, so load changes hit every executor alike
            for spec, ex in executors.items():
                times[spec].append(generate(model, cond, channels, scheduler, plans, ex)[1])
        eager_step = statistics.median(times[args.executors[0]]) / args.steps
        reference = first[args.executors[0]][0]
        for spec in executors:
            step = statistics.median(times[spec]) / args.steps
            stats = first[spec][2]
            rows.append({"accel": accel or "none", "executor": spec, "graphs": stats.get("graphs", 0),
                         "compile_s": stats.get("compile_seconds", 0.0),
                         "first_call_s": round(first[spec][1], 2), "step_ms": round(1000 * step, 1),
                         "speedup": round(eager_step / step, 3),
                         "max_abs_diff": float((first[spec][0] - reference).abs().max())})
            print(rows[-1], file=sys.stderr)
    title = (f"{args.family} width {args.width}, depth {args.depth}, {args.heads} heads, latent {args.latent}², "
             f"{args.steps} steps, CFG batch 2, fp32, {torch.get_num_threads()} threads, torch {torch.__version__}")
    cols = list(rows[0])
    table = [f"### {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    table += ["| " + " | ".join(f"{r[c]:.2e}" if c == "max_abs_diff" else str(r[c]) for c in cols) + " |"
              for r in rows]
    print("\n".join(table))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out + ".md").write_text("\n".join(table) + "\n")
        Path(args.out + ".json").write_text(json.dumps({"config": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
