"""Memory and speed of fp8 weight storage (engine/memory/fp8.py) against bf16 weights.

    nice -n 10 python tools/bench_fp8.py [--depth 8] [--latent 32] [--repeats 5]

A random DiT-XL-width denoiser (1152 wide, `--depth` blocks) in bf16, and the same with its
linear weights stored as float8_e4m3fn: the bytes of all parameters, and the seconds of one
CFG-batch forward (batch 2, `--latent`² latents), runs interleaved, medians of `--repeats`,
in one process. Speed is the cost of upcasting each layer's weight as it runs.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from types import SimpleNamespace

import torch


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    from dite.engine.memory.fp8 import store_fp8
    from dite.models.denoiser import Conditioning
    from dite.models.dit import DiT, DiTConfig

    torch.manual_seed(0)
    model = DiT(DiTConfig(hidden_size=1152, depth=args.depth, num_heads=16, input_size=args.latent))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model = model.to(torch.bfloat16).eval()
    model.init_computed_buffers(torch.device("cpu"))
    fp8 = copy.deepcopy(model)
    store_fp8(SimpleNamespace(transformer=fp8, text=None, vae=torch.nn.Module()))
    x = torch.randn(2, 4, args.latent, args.latent).bfloat16()
    t = torch.tensor([500.0, 500.0])
    cond = Conditioning(class_labels=torch.tensor([1, 1000]), cfg_row_order="cond_first")
    models = {"bf16 weights": model, "fp8 storage": fp8}
    times = {name: [] for name in models}
    with torch.inference_mode():
        for m in models.values():
            m(x, t, cond)
        for _ in range(args.repeats):
            for name, m in models.items():
                start = time.perf_counter()
                m(x, t, cond)
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["bf16 weights"])
    print(f"DiT 1152 wide, {args.depth} blocks, latents {args.latent}x{args.latent}, batch 2, "
          f"{torch.get_num_threads()} threads")
    for name, m in models.items():
        size = sum(p.numel() * p.element_size() for p in m.parameters())
        seconds = statistics.median(times[name])
        print(f"  {name:13s} parameters {size / 2**20:7.1f} MiB, forward {seconds:.3f} s ({seconds / base:.2f}x)")


if __name__ == "__main__":
    main()
