"""Method settings + the call's context -> one StepPlan per step, composed and checked."""

from __future__ import annotations

from dataclasses import replace
from typing import Iterable

from dite.accel.methods import Method, PlanContext, StepDraft
from dite.accel.spec import parse_spec
from dite.accel.tuned import expand_tuned
from dite.engine.errors import ConfigError
from dite.models.plan import FULL_ATTENTION, PLAIN_BLOCK, PLAIN_STEP, BlockPlan, StepPlan

_WHAT = {"ranges": "cache block ranges", "cfg": "change the CFG batch", "kv": "downsample keys/values",
         "kernel": "choose attention kernels per layer"}


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
    """Defaults filled in for this call, each checked, and pairwise conflicts refused
    (a tuned(file=...) is first replaced by the methods its file stores)."""
    methods = expand_tuned(methods, ctx)
    seen: dict[str, Method] = {}
    for m in methods:
        if m.edits in seen:
            other = seen[m.edits]
            same = "twice" if other.name == m.name else f"together with {other.name}"
            raise ConfigError(f"{m.name} given {same}: both {_WHAT[m.edits]}; choose one")
        seen[m.edits] = m
    return [m.resolved(ctx) for m in methods]


def _runs(draft: StepDraft, block: int) -> bool:
    return not any(r.action == "apply" and r.start <= block < r.stop for r in draft.ranges)


def link_attention_caches(drafts: list[StepDraft], ctx: PlanContext) -> None:
    """Make each computing step store what later steps of the same layer reuse.

    Walks each layer over the steps where it really runs (a block skipped by a cached
    range neither computes nor consumes), so the chain is right under DiTCache/Δ-Cache: a
    WA-RS step takes the residual of the layer's last full step, an AST step the output of
    its last computed step. CFG sharing is dropped on cond-only steps (PromptGate), where
    there is no second half to share with.
    """
    for block in range(ctx.depth):
        last_full = last_computed = None
        for i, draft in enumerate(drafts):
            policy = draft.attention[block]
            if policy is None or not _runs(draft, block):
                if policy is None and _runs(draft, block):
                    last_full = last_computed = i
                continue
            if policy.cfg_share and draft.cfg_mode == "cond_only":
                policy = replace(policy, cfg_share=None)
            if policy.kind == "window":
                if last_full is None:
                    raise ConfigError(f"block {block} uses window attention at step {i} before any full step of it "
                                      "has run: it has no residual to add")
                source = drafts[last_full].attention[block] or FULL_ATTENTION
                drafts[last_full].attention[block] = replace(source, store_residual=True, window=policy.window)
            elif policy.kind == "share":
                if last_computed is None:
                    raise ConfigError(f"block {block} shares its attention output at step {i} before it has computed one")
                source = drafts[last_computed].attention[block] or FULL_ATTENTION
                drafts[last_computed].attention[block] = replace(source, store_output=True)
            draft.attention[block] = policy
            if policy.kind != "share":
                last_computed = i
            if policy.kind == "full":
                last_full = i


def build_plans(methods: list[Method], ctx: PlanContext) -> list[StepPlan]:
    """One plan per step; with no methods, the plain plan everywhere."""
    if not methods:
        return [PLAIN_STEP] * ctx.steps
    drafts = [StepDraft(ranges=[], attention=[None] * ctx.depth) for _ in range(ctx.steps)]
    for m in methods:
        m.edit(drafts, ctx)
    link_attention_caches(drafts, ctx)
    plans, interned = [], {}
    for d in drafts:
        blocks = ()
        if any(a is not None for a in d.attention):
            blocks = tuple(PLAIN_BLOCK if a is None or a == FULL_ATTENTION else BlockPlan(attention=a) for a in d.attention)
        plan = StepPlan(blocks=blocks, ranges=tuple(d.ranges), cfg_mode=d.cfg_mode)
        plan.segments(ctx.depth)  # checks every range against the depth now, not mid-run
        plans.append(interned.setdefault(plan, plan))  # equal plans are one object
    return plans
