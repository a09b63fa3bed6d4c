"""One denoiser evaluation under a step plan: prepare, block segments, finalize.

The eager executor. Segments outside any cached range run as usual; a "record" segment runs
and stores its delta, an "apply" segment does not run and adds the stored delta. With no
ranges this is exactly `transformer(x, t, cond, plan)`.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from dite.accel.attention_cache import AttentionCache
from dite.accel.cache import DeltaCache
from dite.models.denoiser import Conditioning, Denoiser
from dite.models.plan import StepPlan


def run_step(transformer: Denoiser, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, plan: StepPlan,
             cache: DeltaCache, attn_cache: AttentionCache | None = None) -> torch.Tensor:
    hidden = transformer.prepare(x, t, cond)
    if attn_cache is not None:
        hidden = replace(hidden, attn_cache=attn_cache)
    streams = transformer.streams
    for start, stop, action in plan.segments(len(transformer.blocks)):
        if action == "apply":
            hidden = cache.apply((start, stop), hidden, streams)
            continue
        before = hidden
        hidden = transformer.run_blocks(hidden, plan, start, stop)
        if action == "record":
            cache.record((start, stop), before, hidden, streams)
    return transformer.finalize(hidden)
