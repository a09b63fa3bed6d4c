"""One denoiser evaluation under a step plan: prepare, block segments, finalize.

The eager executor. Segments outside any cached range run as usual; a "record" segment runs
and stores its delta, an "apply" segment does not run and adds the stored delta (or, with a
forecast order, the delta extrapolated to this step); an "adaptive" segment decides per
sample (engine/runtime/adaptive.py). With no
ranges this is exactly `transformer(x, t, cond, plan)`.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from dite.engine.runtime.attention_cache import AttentionCache
from dite.engine.errors import ConfigError
from dite.engine.runtime.adaptive import RangeState, applied_delta, keep_delta, run_adaptive
from dite.engine.runtime.delta_store import DeltaStore
from dite.models.denoiser import Conditioning, Denoiser
from dite.models.plan import StepPlan


def run_step(transformer: Denoiser, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, plan: StepPlan,
             deltas: DeltaStore, attn_cache: AttentionCache | None = None,
             ranges: RangeState | None = None) -> torch.Tensor:
    """`deltas` holds the call's recorded range deltas; `ranges` is the call's state of
    forecasting and adaptive ranges (a plan with neither runs without it). What a range
    records and applies is decided in runtime/adaptive.py, for every executor alike."""
    hidden = transformer.prepare(x, t, cond)
    if attn_cache is not None:
        hidden = replace(hidden, attn_cache=attn_cache)
    prepared = hidden
    streams = transformer.streams
    for start, stop, action in plan.segments(len(transformer.blocks)):
        op = plan.range_at(start) if action != "compute" else None
        if op is not None and op.forecasts and ranges is None:
            raise ConfigError(f"blocks [{start}, {stop}) forecast or decide at run time, which needs the call's "
                              "range state: run the plan through the sampling loop")
        if action == "adaptive":
            hidden = run_adaptive(transformer, plan, op, hidden, prepared, ranges)
        elif action == "apply":
            delta = applied_delta(op, deltas, ranges, hidden.image.shape[0])
            hidden = replace(hidden, **{s: getattr(hidden, s) + delta[s] for s in streams})
        else:
            before = hidden
            hidden = transformer.run_blocks(hidden, plan, start, stop)
            if action == "record":
                keep_delta(op, deltas, ranges, {s: getattr(hidden, s) - getattr(before, s) for s in streams})
    return transformer.finalize(hidden)
