"""Per-call attention state for DiTFastAttn: each layer's last projected output (for output
sharing) and its last full-minus-window residual (for WA-RS), keyed by block index.

Lives in the call's GenerationState. `writes` is switched off during calibration, whose
trial forwards must not disturb what the real forward of the step will leave behind.
"""

from __future__ import annotations

import torch

from dite.engine.errors import ConfigError


class AttentionCache:
    def __init__(self):
        self.outputs: dict[object, torch.Tensor] = {}
        self.residuals: dict[object, torch.Tensor] = {}
        self.writes = True

    def _get(self, store: dict, layer, what: str, rows: int) -> torch.Tensor:
        if layer not in store:
            raise ConfigError(f"attention layer {layer} needs its stored {what}, but no earlier step of it stored "
                              "one: the plan must compute this layer fully before reusing it")
        value = store[layer]
        if value.shape[0] != rows:
            raise ConfigError(f"attention layer {layer}: stored {what} has {value.shape[0]} rows, the batch {rows}")
        return value

    def output(self, layer, rows: int) -> torch.Tensor:
        return self._get(self.outputs, layer, "output", rows)

    def residual(self, layer, rows: int) -> torch.Tensor:
        return self._get(self.residuals, layer, "residual", rows)

    def has(self, what: str, block: int) -> bool:
        """Whether block `block` stored an output / residual (keys are the block index, or
        (index, stream) for MMDiT's two streams)."""
        store = self.outputs if what == "output" else self.residuals
        return any(k == block or (isinstance(k, tuple) and k[0] == block) for k in store)

    def store_output(self, layer, value: torch.Tensor) -> None:
        if self.writes:
            self.outputs[layer] = value

    def store_residual(self, layer, value: torch.Tensor) -> None:
        if self.writes:
            self.residuals[layer] = value

    def select_rows(self, rows: slice) -> None:
        self.outputs = {k: v[rows] for k, v in self.outputs.items()}
        self.residuals = {k: v[rows] for k, v in self.residuals.items()}

    def snapshot(self) -> tuple[dict, dict]:
        return dict(self.outputs), dict(self.residuals)

    def restore(self, snapshot: tuple[dict, dict]) -> None:
        self.outputs, self.residuals = dict(snapshot[0]), dict(snapshot[1])
