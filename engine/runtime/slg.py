"""Skip-layer guidance (SLG, SD3.5): a guided step inside the window gets one more forward
pass of the conditional rows with some blocks skipped, and moves the guided prediction away
from it:

    guided + skip_layer_guidance_scale * (cond - cond_with_blocks_skipped)

as diffusers' StableDiffusion3Pipeline does (skip_guidance_layers, ..._scale, ..._start,
..._stop, same defaults). A step i of n runs it when n * start < i < n * stop (strict, as
diffusers), and only when the step is guided (CFG batch): without CFG there is no
conditional branch to take apart, so an unguided call is refused up front, and a PromptGate
cond-only step has none either (SLG stops with the unconditional branch).

The skipped blocks are identities for the extra pass (BlockPlan.skip, read by the block
loop); the extra pass runs its own plain plan, so a main pass under block caches or
attention sharing does not change it: it is always computed in full, from the step's own
latents.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from dite.engine.errors import InputError
from dite.models.denoiser import Conditioning, Denoiser
from dite.models.plan import PLAIN_BLOCK, BlockPlan, StepPlan

DEFAULT_SCALE, DEFAULT_START, DEFAULT_STOP = 2.8, 0.01, 0.2  # diffusers' defaults (SD3.5-medium's)
SKIPPED_BLOCK = BlockPlan(skip=True)


@dataclass(frozen=True)
class SkipLayerGuidance:
    layers: tuple[int, ...]
    scale: float = DEFAULT_SCALE
    start: float = DEFAULT_START
    stop: float = DEFAULT_STOP

    @classmethod
    def check(cls, layers, scale, start, stop, *, depth: int | None) -> "SkipLayerGuidance | None":
        """The call's SLG settings, each checked (None: no skip_guidance_layers, no SLG);
        `depth` None (the model not loaded yet) checks the indices are block indices at all."""
        if layers is None:
            return None
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or not layers:
            raise InputError(f"skip_guidance_layers must be a non-empty list of block indices, got {layers!r}")
        for layer in layers:
            if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
                raise InputError(f"skip_guidance_layers: {layer!r} is not a block index (0, 1, ...); "
                                 "SD3.5-medium's usual choice is [7, 8, 9]")
            if depth is not None and layer >= depth:
                raise InputError(f"skip_guidance_layers: {layer!r} is not a block of this model (blocks 0 to "
                                 f"{depth - 1}); SD3.5-medium's usual choice is [7, 8, 9]")
        if len(set(layers)) != len(layers):
            raise InputError(f"skip_guidance_layers lists a block twice: {list(layers)}")
        if depth is not None and len(layers) == depth:
            raise InputError(f"skip_guidance_layers skips all {depth} blocks; leave some to run")
        for name, value in (("skip_layer_guidance_scale", scale), ("skip_layer_guidance_start", start),
                            ("skip_layer_guidance_stop", stop)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InputError(f"{name} must be a finite number, got {value!r}")
        if not 0 <= start < stop <= 1:
            raise InputError(f"skip_layer_guidance_start {start} and _stop {stop} must satisfy "
                             "0 <= start < stop <= 1 (shares of the schedule)")
        return cls(tuple(layers), float(scale), float(start), float(stop))

    def active(self, step: int, steps: int) -> bool:
        """Whether step `step` of `steps` is in the window (diffusers' strict comparisons)."""
        return steps * self.start < step < steps * self.stop

    def plan(self, depth: int) -> StepPlan:
        """The extra pass's plan: the listed blocks skipped, every other block plain."""
        return StepPlan(blocks=tuple(SKIPPED_BLOCK if i in self.layers else PLAIN_BLOCK for i in range(depth)))

    def recorded(self) -> dict[str, Any]:
        """What an image's parameters record (diffusers' argument names)."""
        return {"skip_guidance_layers": list(self.layers), "skip_layer_guidance_scale": self.scale,
                "skip_layer_guidance_start": self.start, "skip_layer_guidance_stop": self.stop}

    def guide(self, transformer: Denoiser, guided: torch.Tensor, out: torch.Tensor, model_in: torch.Tensor,
              t: torch.Tensor, cond: Conditioning, channels: int) -> torch.Tensor:
        """`guided` (after CFG) plus scale x (cond - cond with the blocks skipped), on the
        first `channels` channels; `out`/`model_in`/`t` are the step's guided batch."""
        rows = cond.cond_rows(out.shape[0])
        skipped = transformer(model_in[rows], t[rows], cond.conditional_only(),
                              self.plan(len(transformer.blocks)))
        push = self.scale * (out[rows, :channels] - skipped[:, :channels])
        if guided.shape[1] == channels:
            return guided + push
        return torch.cat([guided[:, :channels] + push, guided[:, channels:]], dim=1)
