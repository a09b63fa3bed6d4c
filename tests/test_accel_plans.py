"""Plan building: schedules, composition, counts against the reference, bad specs."""

from __future__ import annotations

import pytest

from dite.accel import DeltaCache, DiTCache, PlanContext, PromptGate, ToDo, as_methods, build_plans, parse_spec, resolve
from dite.engine.errors import ConfigError

SD3 = PlanContext("sd3", depth=24, steps=28, guided=True)


def plans_for(spec, ctx=SD3):
    return build_plans(resolve(as_methods(spec), ctx), ctx)


def row_block_evaluations(plans, depth=24):
    return sum((2 if p.cfg_mode == "both" else 1) * len(p.computed_blocks(depth)) for p in plans)


def actions(plans):
    return [p.ranges[0].action if p.ranges else "plain" for p in plans]


def test_reference_counts_on_sd3():
    assert row_block_evaluations(plans_for("")) == 1344
    assert row_block_evaluations(plans_for("ditcache")) == 984
    assert row_block_evaluations(plans_for("ditcache+promptgate")) == 872


def test_ditcache_reference_schedule():
    plans = plans_for("ditcache")
    acts = actions(plans)
    assert acts[:9] == ["plain"] * 9
    assert [i for i, a in enumerate(acts) if a == "apply"] == list(range(10, 27, 2))
    assert [i for i, a in enumerate(acts) if a == "record"] == list(range(9, 28, 2))
    assert {(p.ranges[0].start, p.ranges[0].stop) for p in plans if p.ranges} == {(1, 21)}
    # Three distinct plans (plain, record, apply): what a graph executor compiles.
    assert len(set(plans)) == 3


def test_ditcache_any_stride_is_explicit():
    acts = actions(plans_for("ditcache(stride=3,start_step=10)"))
    assert [i for i, a in enumerate(acts) if a == "record"] == [9, 12, 15, 18, 21, 24, 27]
    assert acts[10:12] == ["apply", "apply"]


def test_defaults_scale_with_depth_and_steps():
    (m,) = resolve([DiTCache()], PlanContext("pixart", 28, 20, True))
    assert m.blocks == (1, 24) and m.start_step == 7
    (g,) = resolve([PromptGate()], PlanContext("dit", 28, 50, True))
    assert g.step == 36
    (t,) = resolve([ToDo()], PlanContext("dit", 28, 50, True))
    assert t.blocks == (0, 14) and t.factor == 1.6


def test_deltacache_stages():
    ctx = PlanContext("pixart", 28, 20, True)
    (m,) = resolve([DeltaCache()], ctx)
    assert (m.interval, m.cached_blocks, m.boundary) == (2, 21, 12)
    plans = build_plans([m], ctx)
    for i, p in enumerate(plans):
        (r,) = p.ranges
        assert (r.start, r.stop) == ((7, 28) if i < 12 else (0, 21))
        assert r.action == ("record" if (i if i < 12 else i - 12) % 2 == 0 else "apply")
    # Paper's arithmetic: 10 full steps + 10 steps at 7 of 28 blocks -> 1.6x.
    assert row_block_evaluations(plans, 28) / 2 == 10 * 28 + 10 * 7


def test_deltacache_forces_a_compute_step_at_an_odd_boundary():
    ctx = PlanContext("pixart", 28, 20, True)
    plans = build_plans(resolve([DeltaCache(boundary=11)], ctx), ctx)
    # Counting from step 0, step 11 would reuse; it records the front range instead.
    assert [p.ranges[0].action for p in plans[9:13]] == ["apply", "record", "record", "apply"]
    assert plans[10].ranges[0].start == 7 and plans[11].ranges[0].start == 0


def test_promptgate_and_todo_plans():
    plans = plans_for("promptgate+todo")
    assert [p.cfg_mode for p in plans] == ["both"] * 20 + ["cond_only"] * 8
    policy = plans[0].block(0).attention
    assert policy.kv_factor == 1.6 and policy.kv_mode == "bilinear"
    assert plans[0].block(11).attention == policy and plans[0].block(12).attention.kv_factor == 1.0


def test_spec_round_trip_and_objects():
    methods = resolve(as_methods("ditcache(start_step=10,blocks=1:21)+todo(factor=2)"), SD3)
    assert methods == [DiTCache(blocks=(1, 21), start_step=10, stride=2), ToDo(factor=2.0, blocks=(0, 12))]
    again = parse_spec("+".join(m.spec() for m in methods))
    assert again == methods
    assert as_methods(DiTCache()) == [DiTCache()]
    assert as_methods([DiTCache(), ToDo()]) == [DiTCache(), ToDo()]
    assert as_methods(None) == as_methods("none") == []
    assert as_methods("Delta-Cache") == [DeltaCache()]


@pytest.mark.parametrize("spec,message", [
    ("warpdrive", "unknown accel method 'warpdrive'"),
    ("ditcache(blocks=1:30)", "not a range inside the model's 24 blocks"),
    ("ditcache(blocks=5)", "not a block range like 1:21"),
    ("ditcache(speed=2)", "no parameter 'speed'"),
    ("ditcache(start_step=0)", "start_step=0 must be in"),
    ("ditcache(stride=1)", "stride=1 must be an integer >= 2"),
    ("ditcache+deltacache", "both cache block ranges"),
    ("todo+todo", "given twice"),
    ("todo(factor=0.5)", "factor=0.5 must be >= 1"),
    ("todo(mode=cubic)", "mode='cubic'"),
    ("promptgate(step=28)", "step=28 must be in"),
    ("ditcache(", "unbalanced parentheses"),
    ("ditcache++todo", "empty method"),
])
def test_bad_specs_are_clear(spec, message):
    with pytest.raises(ConfigError, match=message):
        resolve(as_methods(spec), SD3)


def test_promptgate_needs_guidance():
    with pytest.raises(ConfigError, match="guidance_scale <= 1"):
        resolve(as_methods("promptgate"), PlanContext("sd3", 24, 28, guided=False))
