"""Per-call block-range deltas: what a cached range adds to its input (ranges with order 0;
forecasting ranges keep a DeltaHistory in runtime/adaptive.RangeState instead).

`DeltaStore` is this run-time store; `DeltaCache` is the Δ-DiT acceleration method
(accel/methods.py), whose plans, like DiTCache's, record into it and apply from it.

One DeltaStore lives in each call's GenerationState, never in a module, so two generations
never share one. Deltas are kept per batch row (each CFG branch has its own) and per
stream (MMDiT's image and text tokens), keyed by the block range that recorded them.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from dite.engine.errors import ConfigError
from dite.models.denoiser import Hidden


class DeltaStore:
    def __init__(self):
        self.deltas: dict[tuple[int, int], dict[str, torch.Tensor]] = {}

    def record(self, key: tuple[int, int], before: Hidden, after: Hidden, streams: tuple[str, ...]) -> None:
        self.store(key, {s: getattr(after, s) - getattr(before, s) for s in streams})

    def store(self, key: tuple[int, int], delta: dict[str, torch.Tensor], *, copy: bool = False) -> None:
        """Keep `delta` for `key`. With `copy`, copy it into the buffer `key` already has (the
        same storage from step to step; a fresh copy the first time or after PromptGate shrank
        the batch): graph executors never keep a graph's output itself, which a CUDA-graph or
        aclgraph replay overwrites."""
        old = self.deltas.get(key)
        if not copy:
            self.deltas[key] = delta
        elif old is not None and all(old[s].shape == t.shape for s, t in delta.items()):
            for s, t in delta.items():
                old[s].copy_(t)
        else:
            self.deltas[key] = {s: t.clone() for s, t in delta.items()}

    def get(self, key: tuple[int, int], rows: int) -> dict[str, torch.Tensor]:
        """The delta recorded for `key`, checked to have been recorded for a batch of `rows`."""
        if key not in self.deltas:
            raise ConfigError(f"blocks [{key[0]}, {key[1]}) are to be replaced by a cached delta, but no earlier "
                              "step recorded one: a plan must record a range before it applies it")
        delta = self.deltas[key]
        if next(iter(delta.values())).shape[0] != rows:
            raise ConfigError(f"the delta of blocks [{key[0]}, {key[1]}) has "
                              f"{next(iter(delta.values())).shape[0]} rows, the batch {rows}")
        return delta

    def apply(self, key: tuple[int, int], hidden: Hidden, streams: tuple[str, ...]) -> Hidden:
        delta = self.get(key, hidden.image.shape[0])
        return replace(hidden, **{s: getattr(hidden, s) + delta[s] for s in streams})

    def select_rows(self, rows: slice) -> None:
        """Keep only `rows` of every delta (the conditional rows when PromptGate closes)."""
        self.deltas = {key: {s: t[rows] for s, t in d.items()} for key, d in self.deltas.items()}

    def __len__(self) -> int:
        return len(self.deltas)
