"""The pieces a graph executor compiles, as plain functions of tensors.

A step is prepare -> block segments -> finalize. Each piece here is a closure over what is
fixed for it (the denoiser, the blocks' plans, the action, the token grid) and takes and
returns only tensors: the step index, the schedule and every cache decision stay in the
eager caller, and cached deltas and DiTFastAttn's per-layer attention state go in and come
out as explicit arguments and results, so nothing that changes between steps reaches a
compiled frame as a Python value. Boundary
tensors are made contiguous so that every call of a piece sees the same strides (and the
same compiled graph), whichever piece produced its input.
"""

from __future__ import annotations

from typing import Callable

import torch

from dite.models.attention import NO_STATE, AttentionState, reads
from dite.models.denoiser import Conditioning, Denoiser, Hidden
from dite.models.plan import AttentionPolicy, StepPlan

COND_FIELDS = Conditioning.FIELDS


def _contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


def cond_tensors(cond: Conditioning) -> tuple:
    return tuple(getattr(cond, f) for f in COND_FIELDS)


def prepare_unit(transformer: Denoiser, cfg_row_order: str) -> Callable:
    """(x, t, *cond tensors) -> (image, c, text, text_mask, grid)."""
    def prepare(x, t, *conds):
        hidden = transformer.prepare(x, t, Conditioning(*conds, cfg_row_order=cfg_row_order))
        return (_contiguous(hidden.image), _contiguous(hidden.c), _contiguous(hidden.text), hidden.text_mask,
                hidden.grid)

    return prepare


class SegmentAttention:
    """The attention store of one compiled segment (what `Hidden.attn_cache` is inside it):
    the stored state its layers read, passed in as explicit tensors ({block: AttentionState}),
    and what they store, collected to be returned as explicit results. Made and consumed
    inside the traced frame, so the graph itself is a pure function of tensors."""

    def __init__(self, inputs: dict[int, AttentionState]):
        self.inputs = inputs
        self.outputs: dict[int, AttentionState] = {}

    def load(self, layer: int, policy: AttentionPolicy, rows: int) -> AttentionState:
        return self.inputs[layer] if reads(policy) else NO_STATE

    def save(self, layer: int, state: AttentionState) -> None:
        self.outputs[layer] = state


def attention_reads(plan: StepPlan, start: int, stop: int) -> list[int]:
    """The blocks of [start, stop) whose policy reads stored attention state."""
    return [i for i in range(start, stop) if reads(plan.block(i).attention)]


def segment_unit(transformer: Denoiser, plan: StepPlan, start: int, stop: int, action: str,
                 grid: tuple[int, int]) -> Callable:
    """(image, c, text, text_mask, attention, *deltas) -> (*streams[, *new deltas], stored).

    compute: the blocks' new streams. record: the same plus out - in per stream (what the
    eager DeltaStore records). apply: in + the given deltas, no block runs. `attention`
    ({block: AttentionState}) is what the blocks' policies read (attention_reads), `stored`
    (the same kind of dict) what they store; both {} for an apply piece."""
    streams = transformer.streams

    def segment(image, c, text, text_mask, attention, *deltas):
        store = SegmentAttention(attention)
        hidden = Hidden(image=image, c=c, grid=grid, text=text, text_mask=text_mask, attn_cache=store)
        if action == "apply":
            return tuple(getattr(hidden, s) + d for s, d in zip(streams, deltas)) + (store.outputs,)
        out = transformer.run_blocks(hidden, plan, start, stop)
        new = tuple(getattr(out, s).contiguous() for s in streams)
        if action == "record":
            return new + tuple(n - getattr(hidden, s) for n, s in zip(new, streams)) + (store.outputs,)
        return new + (store.outputs,)

    return segment


def finalize_unit(transformer: Denoiser, grid: tuple[int, int]) -> Callable:
    """(image, c) -> the denoiser's output."""
    def finalize(image, c):
        return transformer.finalize(Hidden(image=image, c=c, grid=grid))

    return finalize


def signature(*tensors) -> tuple:
    """What a compiled graph is specialised on, per tensor (dynamic=False)."""
    return tuple(None if t is None else (tuple(t.shape), t.dtype, t.device.type, t.stride()) for t in tensors)
