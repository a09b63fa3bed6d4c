"""A block-range cache on an explicit set of computed steps.

DiTCache's schedule is one arithmetic rule (start, stride); the best set of steps to compute
under a budget is not: with a forecast, the early steps (where the image changes most) want
to run densely and the late ones can be spaced further and further apart. `schedule(run=…)`
takes the set itself, written as dot-separated steps and inclusive ranges
(`run=0-9.11.14.18.23`), so `dite tune` can search it step by step (greedy removal on the
calibration inputs) and store it in a tuned file as an ordinary spec.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

from dite.accel.methods import Method, PlanContext, StepDraft, _check_blocks, check_forecast
from dite.engine.errors import ConfigError
from dite.models.plan import RangeOp


def parse_steps(name: str, text: str, steps: int, what: str = "run", need_first: bool = True) -> tuple[int, ...]:
    """`0-9.11.14` -> (0, 1, ..., 9, 11, 14), checked against the call's step count (the
    setting `what`; `need_first`: step 0 must be listed)."""
    picked: set[int] = set()
    for item in str(text).split("."):
        a, sep, b = item.strip().partition("-")
        try:
            lo, hi = int(a), int(b) if sep else int(a)
        except ValueError:
            raise ConfigError(f"{name}: {what}={text!r} must list steps as dot-separated numbers and ranges, "
                              f"e.g. {what}=0-9.11.14") from None
        if lo > hi:
            raise ConfigError(f"{name}: {what}={text!r}: the range {lo}-{hi} runs backwards; write {hi}-{lo}")
        if not 0 <= lo <= hi < steps:
            raise ConfigError(f"{name}: {what}={text!r} names step {hi}, outside [0, {steps - 1}] for {steps} steps")
        picked.update(range(lo, hi + 1))
    if need_first and 0 not in picked:
        raise ConfigError(f"{name}: run={text!r} must include step 0 (a cached range needs a first record)")
    return tuple(sorted(picked))


def format_steps(steps) -> str:
    """The inverse of parse_steps, with runs of consecutive steps as ranges."""
    ordered, parts, i = sorted(set(steps)), [], 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ".".join(parts)


@dataclass(frozen=True)
class StepSchedule(Method):
    """Run the block range `blocks` (default: all but the first block) on the steps listed in
    `run`, recording its delta; on every other step apply the delta, forecast from the
    recorded history (`order`, in `coord`). Blocks outside the range always run.

    With a `threshold` the steps outside `run` are decided per sample at run time as the
    adaptive cache decides them (engine/runtime/adaptive.py; the relative L1 change of what
    the blocks before the range add, against the last step the sample ran it): a sample whose
    change exceeds the threshold runs the range there too. The listed steps always run. This
    spends a budget the fixed set leaves over (one step of the range is a coarse unit) where
    a sample needs it.

    With `order` 2 or 3 and `high` (steps, written as `run`), only the skipped steps listed in
    `high` forecast with the full order; the other skipped steps forecast with order 1 (the
    line through the newest two records) from the same history. A higher order pays where
    the delta's trajectory bends smoothly between records and costs where it does not (on
    demo-sd3, after the first dozen steps vs before them); `dite tune` picks the steps."""

    name: ClassVar[str] = "schedule"
    summary: ClassVar[str] = "block-range cache on an explicit set of computed steps, forecast between (dite tune)"
    edits: ClassVar[str] = "ranges"
    run: str = ""
    blocks: tuple[int, int] | None = None
    order: int = 1
    coord: str = "step"
    threshold: float | None = None
    high: str | None = None

    def resolved(self, ctx: PlanContext) -> "StepSchedule":
        if not self.run:
            raise ConfigError(f"{self.name}: give the computed steps, e.g. run=0-9.11.14 (dite tune finds them)")
        blocks = self.blocks or (1, ctx.depth)
        _check_blocks(self.name, blocks, ctx.depth)
        check_forecast(self.name, self.order, self.coord)
        if self.threshold is not None:
            if not math.isfinite(self.threshold) or self.threshold < 0:
                raise ConfigError(f"{self.name}: threshold={self.threshold!r} must be a finite number >= 0")
            if blocks[0] == 0:
                raise ConfigError(f"{self.name}: a threshold decides on what the blocks before the range add; "
                                  f"blocks={blocks[0]}:{blocks[1]} leaves none (start the range at 1 or later)")
        high = self.high
        if high is not None:
            if self.order < 2:
                raise ConfigError(f"{self.name}: high={high!r} lists the steps forecast with order 2 or 3, but "
                                  f"order={self.order}: give order=2 or 3, or leave high out")
            high = format_steps(parse_steps(self.name, high, ctx.steps, what="high", need_first=False))
        return replace(self, run=format_steps(parse_steps(self.name, self.run, ctx.steps)), blocks=blocks, high=high)

    def edit(self, drafts: list[StepDraft], ctx: PlanContext) -> None:
        running = set(parse_steps(self.name, self.run, ctx.steps))
        high = None if self.high is None else set(parse_steps(self.name, self.high, ctx.steps, "high", False))
        for i in range(ctx.steps):
            degree = None if high is None or i in high else 1
            if self.threshold is None:
                op = RangeOp(*self.blocks, "record" if i in running else "apply", order=self.order, coord=self.coord,
                             degree=degree)
            else:  # no cap on consecutive reuse: the listed steps bound it
                op = RangeOp(*self.blocks, "adaptive", order=self.order, coord=self.coord, threshold=self.threshold,
                             max_cached=ctx.steps, force=i in running, degree=degree)
            drafts[i].ranges.append(op)
