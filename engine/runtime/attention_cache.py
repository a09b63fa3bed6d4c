"""Per-call attention state for DiTFastAttn: each layer's last projected output (for output
sharing) and its last full-minus-window residual (for WA-RS), keyed by block index.

Lives in the call's GenerationState and is the store behind `Hidden.attn_cache`: a block
asks it for what its policy reads (`load`) before calling models.attention.attend, and hands
it what the policy stored (`save`). The compiled executor reads the same entries as explicit
graph inputs and copies the graphs' stored tensors back in (`save(..., copy=True)`).
`writes` is switched off during calibration, whose trial forwards must not disturb what the
real forward of the step will leave behind.
"""

from __future__ import annotations

import torch

from dite.engine.errors import ConfigError
from dite.models.attention import NO_STATE, AttentionState, map_tensors, reads, tensors
from dite.models.plan import AttentionPolicy


class AttentionCache:
    def __init__(self):
        # An output is a tensor, or one per token stream (MMDiT's (image, text or None)).
        self.outputs: dict[object, torch.Tensor | tuple] = {}
        self.residuals: dict[object, torch.Tensor] = {}
        self.writes = True

    def _get(self, store: dict, layer, what: str, rows: int):
        if layer not in store:
            raise ConfigError(f"attention layer {layer} needs its stored {what}, but no earlier step of it stored "
                              "one: the plan must compute this layer fully before reusing it")
        value = store[layer]
        stored = tensors(value)[0].shape[0]
        if stored != rows:
            raise ConfigError(f"attention layer {layer}: stored {what} has {stored} rows, the batch {rows}")
        return value

    def output(self, layer, rows: int):
        return self._get(self.outputs, layer, "output", rows)

    def residual(self, layer, rows: int) -> torch.Tensor:
        return self._get(self.residuals, layer, "residual", rows)

    def holds(self, layer, policy: AttentionPolicy, rows: int) -> bool:
        """Whether everything `policy` reads of `layer` is stored, for a batch of `rows`."""
        stores = {"residual": self.residuals, "output": self.outputs}
        return all(layer in stores[f] and tensors(stores[f][layer])[0].shape[0] == rows for f in reads(policy))

    def load(self, layer, policy: AttentionPolicy, rows: int) -> AttentionState:
        """What `policy` reads of `layer` (models.attention.reads), checked against the batch."""
        what = reads(policy)
        if not what:
            return NO_STATE
        return AttentionState(residual=self.residual(layer, rows) if "residual" in what else None,
                              output=self.output(layer, rows) if "output" in what else None)

    def save(self, layer, state: AttentionState, *, copy: bool = False) -> None:
        """Keep what a step of `layer` stored. `copy`: copy it into this layer's buffers (the
        same storage from step to step; fresh ones the first time or after PromptGate shrank
        the batch), as graph executors must: a graph replay may overwrite its outputs."""
        if not self.writes:
            return
        for store, value in ((self.residuals, state.residual), (self.outputs, state.output)):
            if value is None:
                continue
            old = store.get(layer) if copy else None
            if old is not None and _same_layout(old, value):
                for dst, src in zip(tensors(old), tensors(value)):
                    dst.copy_(src)
            else:
                store[layer] = map_tensors(torch.clone, value) if copy else value

    def has(self, what: str, block: int) -> bool:
        """Whether block `block` stored an output / residual (keys are the block index)."""
        store = self.outputs if what == "output" else self.residuals
        return any(k == block or (isinstance(k, tuple) and k[0] == block) for k in store)

    def store_output(self, layer, value) -> None:
        self.save(layer, AttentionState(output=value))

    def store_residual(self, layer, value: torch.Tensor) -> None:
        self.save(layer, AttentionState(residual=value))

    def select_rows(self, rows: slice) -> None:
        self.outputs = {k: map_tensors(lambda t: t[rows], v) for k, v in self.outputs.items()}
        self.residuals = {k: v[rows] for k, v in self.residuals.items()}

    def snapshot(self) -> tuple[dict, dict]:
        return dict(self.outputs), dict(self.residuals)

    def restore(self, snapshot: tuple[dict, dict]) -> None:
        self.outputs, self.residuals = dict(snapshot[0]), dict(snapshot[1])


def _same_layout(old, new) -> bool:
    if isinstance(old, tuple) != isinstance(new, tuple):
        return False
    if isinstance(old, tuple) and [t is None for t in old] != [t is None for t in new]:
        return False
    return all(a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
               for a, b in zip(tensors(old), tensors(new)))
