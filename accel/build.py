"""Method settings + the call's context -> one StepPlan per step, composed and checked."""

from __future__ import annotations

from typing import Iterable

from dite.accel.methods import Method, PlanContext, StepDraft
from dite.accel.spec import parse_spec
from dite.engine.errors import ConfigError
from dite.models.plan import FULL_ATTENTION, PLAIN_BLOCK, PLAIN_STEP, BlockPlan, StepPlan

_WHAT = {"ranges": "cache block ranges", "cfg": "change the CFG batch", "attention": "set attention policies"}


def as_methods(accel: str | Method | Iterable[Method] | None) -> list[Method]:
    """A spec string, one method object, a list of them, or None/"" (no acceleration)."""
    if accel is None or (isinstance(accel, str) and accel.strip().lower() in ("", "none")):
        return []
    if isinstance(accel, str):
        return parse_spec(accel)
    if isinstance(accel, Method):
        return [accel]
    methods = list(accel)
    bad = [m for m in methods if not isinstance(m, Method)]
    if bad:
        raise ConfigError(f"accel takes a spec string or dite.accel method objects, got {bad[0]!r}")
    return methods


def resolve(methods: list[Method], ctx: PlanContext) -> list[Method]:
    """Defaults filled in for this call, each checked, and pairwise conflicts refused."""
    seen: dict[str, Method] = {}
    for m in methods:
        if m.edits in seen:
            other = seen[m.edits]
            same = "twice" if other.name == m.name else f"together with {other.name}"
            raise ConfigError(f"{m.name} given {same}: both {_WHAT[m.edits]}; choose one")
        seen[m.edits] = m
    return [m.resolved(ctx) for m in methods]


def build_plans(methods: list[Method], ctx: PlanContext) -> list[StepPlan]:
    """One plan per step; with no methods, the plain plan everywhere."""
    if not methods:
        return [PLAIN_STEP] * ctx.steps
    drafts = [StepDraft(ranges=[], attention=[None] * ctx.depth) for _ in range(ctx.steps)]
    for m in methods:
        m.edit(drafts, ctx)
    plans, interned = [], {}
    for d in drafts:
        blocks = ()
        if any(a is not None for a in d.attention):
            blocks = tuple(PLAIN_BLOCK if a is None or a == FULL_ATTENTION else BlockPlan(attention=a) for a in d.attention)
        plan = StepPlan(blocks=blocks, ranges=tuple(d.ranges), cfg_mode=d.cfg_mode)
        plan.segments(ctx.depth)  # checks every range against the depth now, not mid-run
        plans.append(interned.setdefault(plan, plan))  # equal plans are one object
    return plans
