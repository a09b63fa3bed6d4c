"""Where the wall time of an accelerated call goes, against plain, in one interleaved run.

    python tools/bench_wall.py --model demo-sd3 --prompts 6 --threads 1 \
        --dite 'tuned(file=bench/tuned/demo-sd3-0.50.json)' 'tuned(file=bench/tuned/demo-sd3-0.60.json)'

Every prompt (held-out, the same prompts and latents as tools/bench_peers.py) runs plain and
each spec, interleaved with the order rotated per prompt, `--repeats` times. Each call is
split into stages by wall clock:

- encode / decode: the pipeline's own `out.timings` (text encoders and noise; the VAE);
- blocks: time inside `transformer.run_blocks` (the transformer blocks, what `compute` counts);
- model step: the denoiser's `prepare` + `finalize` (patch/time/text embedding, final layer),
  run once per step whatever the plan;
- loop rest: the rest of the denoising loop: guidance, the scheduler step, the NaN watch,
  and dite's own cache bookkeeping (recording deltas, forecasting, plans);

and reported as medians over calls in milliseconds, with the wall ratio (median over prompts
of call time / the same prompt's plain call time), the block-time ratio and the compute
fraction (block evaluations / plain over all calls, from `out.stats`). `ideal` is the wall ratio if only
the blocks shrank and every other stage cost what it costs plain: the floor a block cache
can reach without making the fixed stages cheaper. Timers are `time.perf_counter` around
Python calls (a few microseconds each), present in the plain runs alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

TOOLS = Path(__file__).resolve().parent
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))

from bench_peers import V2_DEMOS, latent_shape, make_prompts, model_folder, uptime  # noqa: E402

from dite.engine.loading.hub import DEMO_FAMILIES  # noqa: E402

STAGES = ("encode", "blocks", "model_step", "loop_rest", "decode", "total")


class StageClock:
    """Wraps the denoiser's run_blocks / prepare / finalize (instance attributes, removed by
    close) and adds up the wall time spent inside each during a call."""

    def __init__(self, transformer):
        self.transformer = transformer
        self.spent = {"blocks": 0.0, "model_step": 0.0}
        for name, stage in (("run_blocks", "blocks"), ("prepare", "model_step"), ("finalize", "model_step")):
            setattr(transformer, name, self._timed(getattr(transformer, name), stage))

    def _timed(self, fn, stage):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.spent[stage] += time.perf_counter() - start
        return wrapper

    def take(self) -> dict[str, float]:
        out = dict(self.spent)
        self.spent = {k: 0.0 for k in self.spent}
        return out

    def close(self) -> None:
        for name in ("run_blocks", "prepare", "finalize"):
            self.transformer.__dict__.pop(name, None)


def one_call(pipe, clock: StageClock, prompt, spec: str | None) -> dict:
    clock.take()
    start = time.perf_counter()
    out = pipe(prompt=[prompt.text], latents=prompt.latents.clone(), seed=0, output_type="np", progress=False,
               accel=spec)
    total = time.perf_counter() - start
    inner = clock.take()
    t = out.timings
    stats = out.stats or {}
    return {"encode": t.get("encode", 0.0), "decode": t.get("decode", 0.0), "blocks": inner["blocks"],
            "model_step": inner["model_step"],
            "loop_rest": t.get("denoise", 0.0) - inner["blocks"] - inner["model_step"], "total": total,
            "compute": stats.get("compute_fraction", 1.0)}


def summarize(calls: list[dict], plain_calls: list[dict]) -> dict:
    med = {s: statistics.median(c[s] for c in calls) * 1e3 for s in STAGES}
    plain = {s: statistics.median(c[s] for c in plain_calls) * 1e3 for s in STAGES}
    compute = statistics.fmean(c["compute"] for c in calls)  # = total block evaluations / plain's
    fixed = plain["total"] - plain["blocks"]
    return {"ms": med, "compute": compute,
            "wall_ratio": statistics.median(c["total"] / p["total"] for c, p in zip(calls, plain_calls)),
            "block_ratio": statistics.median(c["blocks"] / p["blocks"] for c, p in zip(calls, plain_calls)),
            "ideal": (fixed + compute * plain["blocks"]) / plain["total"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo-sd3", choices=sorted(k for k, v in DEMO_FAMILIES.items() if v == "sd3"))
    p.add_argument("--prompts", type=int, default=6, help="held-out prompts (bench_peers' prompts and latents)")
    p.add_argument("--repeats", type=int, default=1, help="rounds over the prompts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dite", nargs="+", required=True, metavar="SPEC")
    p.add_argument("--out", default=None, help="also write the table to this .md file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from dite.engine import load

    folder = model_folder(args.model)
    pipe = load(args.model, device="cpu")
    prompts = make_prompts("sd3", args.prompts, args.seed, latent_shape(folder, "sd3"), args.model in V2_DEMOS)
    clock = StageClock(pipe.transformer)
    load_start = uptime()
    specs = [None] + list(args.dite)
    for spec in specs:  # warm-up
        one_call(pipe, clock, prompts[0], spec)
    calls = {spec: [] for spec in specs}
    k = 0
    for _ in range(args.repeats):
        for prompt in prompts:
            order = specs[k % len(specs):] + specs[:k % len(specs)]
            k += 1
            for spec in order:
                calls[spec].append(one_call(pipe, clock, prompt, spec))
    clock.close()
    lines = [f"uptime at start: `{load_start}`; at end: `{uptime()}`; torch threads {torch.get_num_threads()}; "
             f"{len(prompts)} prompts x {args.repeats} rounds, interleaved", "",
             "| setting | compute | wall_ratio | ideal | block_ratio | " + " | ".join(f"{s} ms" for s in STAGES) + " |",
             "|---|" + "---|" * (4 + len(STAGES))]
    for spec in specs:
        s = summarize(calls[spec], calls[None])
        lines.append(f"| {spec or 'plain'} | {s['compute']:.3f} | {s['wall_ratio']:.3f} | {s['ideal']:.3f} | "
                     f"{s['block_ratio']:.3f} | " + " | ".join(f"{s['ms'][st]:.1f}" for st in STAGES) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
