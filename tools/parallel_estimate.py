"""Estimate compute vs communication per denoising step of parallel generation on H100s.

For each plan (cfg x ulysses) it runs dite's own parallel code path for ONE rank on the
meta device: the ShardedDenoiser and the Ulysses hook of engine/parallel, with a
stand-in for the process group that returns tensors of the right shapes and counts what
this rank would send (engine/parallel/accounting.py's rules). FLOPs come from
torch.utils.flop_counter on that same run, so the replicated text stream, the split
attention and the band-local layers are counted as they execute.

Time model (stated, not measured): compute = FLOPs / 800 TFLOP/s (bf16, the issue's
measured figure, assumed at every GEMM size); communication = bytes / 450 GB/s (NVLink,
one direction) + ALPHA per collective (latency, an assumption), with no overlap of the
two. Speedup = one-GPU step time / the plan's step time. Usage:

    python tools/parallel_estimate.py > table.md
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from dite.engine.parallel.accounting import Traffic, tensor_bytes
from dite.engine.parallel.comm import Group
from dite.engine.parallel.ulysses import ShardedDenoiser, Ulysses
from dite.models.attention import SEQUENCE_PARALLEL
from dite.models.denoiser import Conditioning
from dite.models.mmdit import MMDiT, MMDiTConfig
from dite.models.pixart import PixArt, PixArtConfig

FLOPS = 800e12
LINK = 450e9
ALPHA = 25e-6  # seconds per collective: an assumption (small-message NCCL latency order)
ITEM = 2  # bf16


class CountingComm:
    """What a rank of a group of equal ranks receives (same shapes as it sends), counted."""

    def __init__(self):
        self.traffic = Traffic()

    def all_to_all(self, chunks, group):
        self.traffic.add("all_to_all", sum(tensor_bytes(c) for j, c in enumerate(chunks) if j != group.index))
        return [torch.empty_like(c) for c in chunks]

    def all_gather(self, t, group):
        self.traffic.add("all_gather", tensor_bytes(t) * (group.size - 1))
        return [torch.empty_like(t) for _ in range(group.size)]


def models():
    """(name, model, latents shape of one row, conditioning of `rows` rows)."""
    sd3 = MMDiTConfig(depth=24, num_heads=24, head_dim=64, pos_embed_max_size=192)  # SD3-medium
    sigma = PixArtConfig(pixart_version="sigma", sample_size=256, interpolation_scale=4.0)  # PixArt-Σ 2K
    return [
        ("SD3-medium 1024² (4096 image + 333 text tokens), 28 steps", MMDiT, sd3, (16, 128, 128), 28,
         lambda rows: Conditioning(context=torch.empty(rows, 333, 4096), pooled=torch.empty(rows, 2048))),
        ("PixArt-Σ 2048² (16384 image tokens, 300 caption tokens), 20 steps", PixArt, sigma, (4, 256, 256), 20,
         lambda rows: Conditioning(context=torch.empty(rows, 300, 4096),
                                   context_mask=torch.ones(rows, 300, dtype=torch.bool))),
    ]


def one_rank(cls, config, latent, cond_of, cfg: int, ulysses: int) -> tuple[float, int, int]:
    """(FLOPs, bytes sent, collectives) of one step on one rank of the plan."""
    rows = 2 // cfg
    with torch.device("meta"):
        model = cls(config).to(torch.bfloat16)
        x, t = torch.empty(rows, *latent, dtype=torch.bfloat16), torch.empty(rows)
        cond = cond_of(rows)
        cond = Conditioning(**{f: (v.to(torch.bfloat16) if v is not None and v.is_floating_point() else v)
                               for f in Conditioning.FIELDS for v in [getattr(cond, f)]})
    comm = CountingComm()
    runner = model
    token = None
    if ulysses > 1:
        hook = Ulysses(comm, Group("ulysses", None, ulysses, 0, tuple(range(ulysses))))
        runner, token = ShardedDenoiser(model, hook), SEQUENCE_PARALLEL.set(hook)
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            out = runner.finalize(runner.run_blocks(runner.prepare(x, t, cond), _plain()))
    finally:
        if token is not None:
            SEQUENCE_PARALLEL.reset(token)
    if cfg > 1:  # the prediction rows to the other branch's rank
        comm.traffic.add("all_gather", tensor_bytes(out) * (cfg - 1))
    sent, calls = comm.traffic.current()
    return counter.get_total_flops(), sent, calls


def _plain():
    from dite.models.plan import PLAIN_STEP

    return PLAIN_STEP


PLANS = {1: [(1, 1)], 2: [(2, 1), (1, 2)], 4: [(2, 2), (1, 4)], 8: [(2, 4), (1, 8)]}


def main() -> None:
    for name, cls, config, latent, steps, cond_of in models():
        base_flops, _, _ = one_rank(cls, config, latent, cond_of, 1, 1)
        base = base_flops / FLOPS
        print(f"\n### {name}\n")
        print(f"One GPU: {base_flops / 1e12:.1f} TFLOP per step (CFG: 2 rows) = {base * 1e3:.1f} ms; "
              f"{steps} steps = {base * steps:.2f} s.\n")
        print("| GPUs | plan | TFLOP / rank / step | compute ms | sent MB / rank / step | collectives | "
              "transfer ms | latency ms | step ms | speedup | comm share |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for gpus, plans in PLANS.items():
            for cfg, uly in plans:
                flops, sent, calls = one_rank(cls, config, latent, cond_of, cfg, uly)
                compute, transfer, latency = flops / FLOPS, sent / LINK, calls * ALPHA
                step = compute + transfer + latency
                label = ",".join(f"{k}={v}" for k, v in (("cfg", cfg), ("ulysses", uly)) if v > 1) or "none"
                print(f"| {gpus} | {label} | {flops / 1e12:.2f} | {compute * 1e3:.2f} | {sent / 1e6:.1f} | {calls} | "
                      f"{transfer * 1e3:.2f} | {latency * 1e3:.2f} | {step * 1e3:.2f} | {base / step:.2f}x | "
                      f"{(transfer + latency) / step:.0%} |")


if __name__ == "__main__":
    main()
