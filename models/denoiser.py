"""The denoiser protocol shared by MMDiT, PixArt and DiT.

Every denoiser is `prepare(x, t, cond) -> Hidden`, then `blocks` (an nn.ModuleList whose
members are `block(hidden, block_plan) -> Hidden`), then `finalize(hidden) -> output`.
Acceleration is written once against this protocol: a method may run a block range, skip
it, or change how attention computes, without knowing the family.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import nn

from dite.models.plan import PLAIN_STEP, StepPlan


@dataclass(frozen=True)
class Hidden:
    """The state that flows between blocks.

    image: [B, N, D] image tokens. text: [B, T, D_text] text tokens (MMDiT's second stream,
    PixArt's cross-attention context) or None. c: [B, D] modulation vector.
    grid: (h, w) of the image token grid. text_mask: [B, T] bool (True = real token) or None.
    attn_cache: the call's per-layer attention cache (DiTFastAttn's stored outputs and
    residuals), set by the step runner; attention layers read and write it by block index.
    """

    image: torch.Tensor
    c: torch.Tensor
    grid: tuple[int, int]
    text: torch.Tensor | None = None
    text_mask: torch.Tensor | None = None
    attn_cache: Any = None

    def with_image(self, image: torch.Tensor) -> "Hidden":
        return replace(self, image=image)


class Denoiser(nn.Module):
    """Base class: forward is prepare -> every block under the plan -> finalize."""

    blocks: nn.ModuleList
    # The Hidden fields that blocks change (a cached block range stores one delta per
    # stream). PixArt's text is a constant cross-attention context, so not a stream.
    streams: tuple[str, ...] = ("image",)

    def prepare(self, x: torch.Tensor, t: torch.Tensor, cond) -> Hidden:  # pragma: no cover
        raise TypeError(f"{type(self).__name__} must define prepare()")

    def finalize(self, hidden: Hidden) -> torch.Tensor:  # pragma: no cover
        raise TypeError(f"{type(self).__name__} must define finalize()")

    def run_blocks(self, hidden: Hidden, plan: StepPlan, start: int = 0, stop: int | None = None) -> Hidden:
        """Run blocks [start, stop) under `plan` (a block planned `skip` passes `hidden` on)."""
        stop = len(self.blocks) if stop is None else stop
        for index in range(start, stop):
            block_plan = plan.block(index)
            if not block_plan.skip:
                hidden = self.blocks[index](hidden, block_plan)
        return hidden

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond, plan: StepPlan = PLAIN_STEP) -> torch.Tensor:
        return self.finalize(self.run_blocks(self.prepare(x, t, cond), plan))


CFG_ROW_ORDERS = ("cond_first", "uncond_first", "none")


@dataclass(frozen=True)
class Conditioning:
    """Everything a denoiser is conditioned on besides x and t, for the whole batch.

    With classifier-free guidance the batch holds the conditional and the unconditional rows
    one after the other; `cfg_row_order` says which half comes first ("cond_first" for DiT,
    "uncond_first" for SD3 and PixArt, "none" without guidance), so nothing slices a batch by
    assuming an order.
    """

    # The conditioning tensors, in field order: everything but cfg_row_order.
    FIELDS: ClassVar[tuple[str, ...]] = ("class_labels", "context", "context_mask", "pooled")

    class_labels: torch.Tensor | None = None
    context: torch.Tensor | None = None
    context_mask: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    cfg_row_order: str = "none"

    def __post_init__(self):
        if self.cfg_row_order not in CFG_ROW_ORDERS:
            raise ValueError(f"cfg_row_order must be one of {CFG_ROW_ORDERS}, got {self.cfg_row_order!r}")

    @property
    def guided(self) -> bool:
        return self.cfg_row_order != "none"

    def cond_rows(self, rows: int) -> slice:
        """The conditional rows of a guided batch of `rows` rows."""
        if not self.guided or rows % 2:
            raise ValueError(f"no conditional half in a batch of {rows} rows with cfg_row_order {self.cfg_row_order!r}")
        half = rows // 2
        return slice(0, half) if self.cfg_row_order == "cond_first" else slice(half, rows)

    def conditional_only(self) -> "Conditioning":
        """The conditioning of the conditional rows alone, unguided (PromptGate's steps)."""
        present = [getattr(self, f) for f in self.FIELDS if getattr(self, f) is not None]
        if not present:
            raise ValueError("empty conditioning")
        rows = self.cond_rows(present[0].shape[0])
        return Conditioning(**{f: None if getattr(self, f) is None else getattr(self, f)[rows] for f in self.FIELDS},
                            cfg_row_order="none")
