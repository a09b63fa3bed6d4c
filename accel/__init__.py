"""Training-free acceleration: methods turn their settings into per-step plans.

The plan types live in `dite.models.plan` (models read them without depending on any
method); they are re-exported here, where plans are built and composed.
"""

from dite.accel.build import as_methods, build_plans, resolve  # noqa: F401
from dite.accel.fastattn import FastAttn  # noqa: F401
from dite.accel.methods import (  # noqa: F401
    Adaptive,
    DeltaCache,
    DiTCache,
    Method,
    PlanContext,
    PromptGate,
    ToDo,
)
from dite.accel.registry import METHODS  # noqa: F401
from dite.accel.schedule import StepSchedule  # noqa: F401
from dite.accel.spec import parse_spec  # noqa: F401
from dite.models.plan import (  # noqa: F401
    FULL_ATTENTION,
    PLAIN_BLOCK,
    PLAIN_STEP,
    AttentionPolicy,
    BlockPlan,
    RangeOp,
    StepPlan,
)

__all__ = [
    "AttentionPolicy", "BlockPlan", "RangeOp", "StepPlan", "FULL_ATTENTION", "PLAIN_BLOCK", "PLAIN_STEP",
    "Method", "Adaptive", "DiTCache", "DeltaCache", "PromptGate", "ToDo", "FastAttn", "StepSchedule", "METHODS", "PlanContext",
    "as_methods", "build_plans", "resolve", "parse_spec",
]
