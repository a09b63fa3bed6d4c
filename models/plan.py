"""Step-plan types: the vocabulary that denoisers read.

A plan says, for one denoising step, how each block and each attention layer runs. Plans are
frozen dataclasses built before the sampling loop (by `dite.accel`, which re-exports these
types); models only read them and never import an acceleration method. Two steps with equal
plans run the same code path with the same shapes, which is what lets a graph executor
compile one static graph per distinct plan.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AttentionPolicy:
    """How one attention layer computes for one step. "full" is exact attention."""

    kind: str = "full"


FULL_ATTENTION = AttentionPolicy()


@dataclass(frozen=True)
class BlockPlan:
    """What one block does in one step: the policy of its attention layer(s)."""

    attention: AttentionPolicy = FULL_ATTENTION


PLAIN_BLOCK = BlockPlan()


@dataclass(frozen=True)
class StepPlan:
    """The plan of one denoising step.

    `blocks` holds one BlockPlan per block, or is empty for "every block plain".
    `cfg_mode` is "both" (conditional and unconditional rows batched) or "cond_only".
    """

    blocks: tuple[BlockPlan, ...] = ()
    cfg_mode: str = "both"

    def block(self, index: int) -> BlockPlan:
        return self.blocks[index] if self.blocks else PLAIN_BLOCK


PLAIN_STEP = StepPlan()
