"""CPU wall time of one generation: 2 processes (one thread each, gloo) vs 1 process (one
thread), on the demo models. What it measures is how much of the step the split saves
against what the exchanges cost on this machine's loopback gloo, for small models; it
says nothing about GPUs (docs/parallel.md estimates those).

Per plan, two ranks are spawned once and load the model; then, `--reps` times in turn,
rank 0 generates alone while rank 1 waits at a barrier, and both generate under the plan.
The denoising time (out.timings["denoise"]) of rank 0 is kept; the table gives medians
and their ratio. Usage:

    nice -n 10 python tools/bench_parallel.py --reps 5 > bench_parallel.txt
"""

from __future__ import annotations

import argparse
import os
import statistics

CASES = [  # (model, plan, call)
    ("demo-dit", "cfg=2", {"class_labels": [1, 2], "num_inference_steps": 10}),
    ("demo-dit", "data=2", {"class_labels": [1, 2, 3, 4], "num_inference_steps": 10}),
    ("demo-dit", "cfg=2", {"class_labels": [1], "num_inference_steps": 10, "height": 256, "width": 256}),
    ("demo-dit", "data=2", {"class_labels": [1, 2], "num_inference_steps": 10, "height": 256, "width": 256}),
    ("demo-sd3", "cfg=2", {"prompt": ["a red cube on a table"], "num_inference_steps": 10}),
    ("demo-sd3", "ulysses=2", {"prompt": ["a red cube on a table"], "num_inference_steps": 10}),
    ("demo-sd3", "data=2", {"prompt": ["a red cube", "a blue ball"], "num_inference_steps": 10}),
]


def measure(rank: int, model: str, plan: str, call: dict, reps: int):
    import torch
    import torch.distributed as dist

    from dite.engine import load
    from dite.engine.parallel import disable, enable

    torch.set_num_threads(1)
    pipe = load(model)
    one, two = [], []
    for _ in range(reps + 1):  # the first round warms up and is dropped
        disable(pipe)
        if rank == 0:
            one.append(pipe(output_type="latent", progress=False, **call).timings["denoise"])
        dist.barrier()
        enable(pipe, plan)
        two.append(pipe(output_type="latent", progress=False, **call).timings["denoise"])
        dist.barrier()
    return one[1:], two[1:]


def main() -> None:
    from dite.engine.parallel import spawn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n")
    print("| model | plan | call | 1 process (s, median) | 2 processes (s, median) | speedup |")
    print("|---|---|---|---|---|---|")
    for model, plan, call in CASES:
        one, two = spawn(measure, 2, model, plan, call, args.reps, timeout_s=300)
        a, b = statistics.median(one), statistics.median(two)
        what = ", ".join(f"{k}={v}" for k, v in call.items())
        print(f"| {model} | {plan} | {what} | {a:.3f} | {b:.3f} | {a / b:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
