"""Training-free acceleration: methods turn their settings into per-step plans.

The plan types live in `dite.models.plan` (models read them without depending on any
method); they are re-exported here, where plans are built and composed.
"""

from dite.models.plan import (  # noqa: F401
    FULL_ATTENTION,
    PLAIN_BLOCK,
    PLAIN_STEP,
    AttentionPolicy,
    BlockPlan,
    StepPlan,
)

__all__ = ["AttentionPolicy", "BlockPlan", "StepPlan", "FULL_ATTENTION", "PLAIN_BLOCK", "PLAIN_STEP"]
