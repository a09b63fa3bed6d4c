"""What the rank freed by PromptGate does: it joins the conditional rank's sequence
parallelism for the remaining steps.

Under cfg=2 x ulysses=U, from the gate step on only the conditional branch is computed.
The freed ranks (the unconditional branch's U ranks) and the conditional ones form one
Ulysses group of 2U ranks: conditional rank u keeps the first half of its band of token
rows and of its heads (sub-band and head share 2u of 2U), the freed rank paired with it
(same data and ulysses index) takes the second half (2u + 1). At the gate the
conditional rank hands over that half of every per-call cache that later steps read:

- DiTCache / Δ-Cache deltas (DeltaStore): the image stream [b, n, D] splits by tokens;
  MMDiT's text stream is replicated on every rank, so it is copied;
- DiTFastAttn's stored state (AttentionCache): residuals [b, H/U, N, d] split by heads,
  stored outputs (projected, [b, n, D]) by tokens, their text part copied.

- forecasting and adaptive ranges (RangeState): each range's DeltaHistory ring buffers
  [K, b, n, D] split by tokens (dim 2) for the image stream, MMDiT's text stream copied,
  coordinates, heads and counts copied; the adaptive cache's references [b, n, D] and its
  signal history (the image stream's band) split by tokens, its streaks copied. From then
  on its per-sample sums are all-reduced over the joined group (executor.py).

Where the grid rows or heads do not split 2U ways the freed ranks stay idle and receive
the prediction by broadcast (`ParallelRun.join` is False; out.stats says which).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dite.engine.parallel.accounting import tensor_bytes
from dite.engine.parallel.faults import collective_failed
from dite.engine.runtime.forecast import DeltaHistory, _Range


def _half(t: torch.Tensor, part: int) -> torch.Tensor:
    return t.chunk(2, dim=1)[part].clone()  # a copy: the other half's memory is freed


def _split_output(value, part: int):
    if isinstance(value, tuple):  # MMDiT: (image, text or None); the text is replicated
        return (None if value[0] is None else _half(value[0], part),) + tuple(value[1:])
    return _half(value, part)


def _history_half(history: DeltaHistory | None, part: int, token_streams) -> DeltaHistory | None:
    """A copy of `history` with the `part` half of the tokens of `token_streams` ([K, b, n, D]:
    dim 2), the other streams and the ring bookkeeping copied whole."""
    if history is None:
        return None
    half = DeltaHistory(history.order)
    half.batch = history.batch
    for key, e in history._ranges.items():
        values = {s: (buf.chunk(2, dim=2)[part].clone() if s in token_streams else buf.clone())
                  for s, buf in e.values.items()}
        half._ranges[key] = _Range(values, e.coords.clone(), e.head.clone(), e.count.clone(), e.complete)
    return half


def ranges_half(ranges, part: int) -> dict:
    """The `part` half of the forecasting / adaptive ranges' per-call state."""
    return {"history": _history_half(ranges.history, part, ("image",)),
            "signals": _history_half(ranges.signals, part, ("signal",)),
            "references": {k: _half(v, part) for k, v in ranges.references.items()},
            "streaks": {k: v.clone() for k, v in ranges.streaks.items()}}


def cache_half(state, part: int) -> dict:
    """The `part` (0 or 1) half of the per-call caches, as plain data."""
    return {
        "deltas": {key: {s: (_half(t, part) if s == "image" else t) for s, t in d.items()}
                   for key, d in state.deltas.deltas.items()},
        "residuals": {k: _half(v, part) for k, v in state.attention.residuals.items()},
        "outputs": {k: _split_output(v, part) for k, v in state.attention.outputs.items()},
        "ranges": ranges_half(state.ranges, part),
    }


def install(state, half: dict) -> None:
    state.deltas.deltas = half["deltas"]
    state.attention.residuals = half["residuals"]
    state.attention.outputs = half["outputs"]
    for name, value in half["ranges"].items():
        setattr(state.ranges, name, value)


def _bytes(half: dict) -> int:
    total = 0
    for d in half["deltas"].values():
        total += sum(tensor_bytes(t) for t in d.values())
    total += sum(tensor_bytes(t) for t in half["residuals"].values())
    for v in half["outputs"].values():
        total += sum(tensor_bytes(t) for t in (v if isinstance(v, tuple) else (v,)) if t is not None)
    ranges = half["ranges"]
    for history in (ranges["history"], ranges["signals"]):
        for e in (history._ranges.values() if history is not None else ()):
            total += sum(tensor_bytes(t) for t in (*e.values.values(), e.coords, e.head, e.count))
    total += sum(tensor_bytes(t) for t in (*ranges["references"].values(), *ranges["streaks"].values()))
    return total


def hand_over(state, ctx, cond_index: int) -> None:
    """At the gate: the conditional rank of each cfg pair keeps half its caches and sends
    the other half to the freed rank, which installs it."""
    comm, group = ctx.comm, ctx.cfg
    giving = group.index == cond_index
    payload = [cache_half(state, 1) if giving else None]
    if giving:
        install(state, cache_half(state, 0))
    try:
        dist.broadcast_object_list(payload, src=group.ranks[cond_index], group=group.handle)
    except Exception as exc:  # noqa: BLE001
        raise collective_failed("broadcast_object_list", group, comm.rank, exc) from None
    comm.count("broadcast_object", _bytes(payload[0]) * (group.size - 1) if giving else 0)
    if not giving:
        install(state, payload[0])
