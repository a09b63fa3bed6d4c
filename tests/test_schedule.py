"""schedule(run=...): the step list's syntax and refusals, its plans, its compute, and dite
tune's greedy search of it (tiny DiT, 6 steps). Compiled = eager: tests/test_executors.py."""

from __future__ import annotations

import pytest

from dite.accel import PlanContext, as_methods, build_plans, resolve
from dite.accel.schedule import format_steps, parse_steps
from dite.engine import load
from dite.engine.errors import ConfigError
from dite.engine.runtime import tune as tune_module
from dite.engine.runtime.tune_schedule import fill_budget, greedy_schedule, mix_orders, refine_schedule, schedule_spec
from dite.models.plan import RangeOp
from tiny import tiny_dit_pipeline

STEPS, LABELS = 6, [3, 7]


def test_step_lists_round_trip():
    assert parse_steps("s", "0-3.5.7-8", 10) == (0, 1, 2, 3, 5, 7, 8)
    assert format_steps([8, 0, 1, 2, 3, 5, 7]) == "0-3.5.7-8"
    assert format_steps([0]) == "0" and parse_steps("s", "0.0.1", 4) == (0, 1)


@pytest.mark.parametrize("run, message", [
    ("0-3.x", "dot-separated numbers"), ("0-12", r"step 12, outside \[0, 9\]"), ("1-5", "must include step 0"),
    ("0.3-2", "runs backwards; write 2-3"), ("", "give the computed steps"),
    ("0-3,threshold=-1", "threshold=-1.0 must be a finite number >= 0"),
    ("0-3,threshold=0.1,blocks=0:4", "leaves none"),
])
def test_bad_step_lists_are_refused(run, message):
    ctx = PlanContext("dit", 4, 10, False)
    with pytest.raises(ConfigError, match=message):
        resolve(as_methods(f"schedule(run={run})"), ctx)


def test_plans_record_on_listed_steps_and_forecast_between():
    ctx = PlanContext("dit", 4, 6, False)
    methods = resolve(as_methods("schedule(run=0-2.4,order=2)"), ctx)
    assert methods[0].spec() == "schedule(run=0-2.4,blocks=1:4,order=2,coord=step)"
    plans = build_plans(methods, ctx)
    ops = [p.ranges[0] for p in plans]
    assert [op.action for op in ops] == ["record", "record", "record", "apply", "record", "apply"]
    assert all((op.start, op.stop, op.order) == (1, 4, 2) for op in ops)


def test_a_threshold_decides_the_unlisted_steps_per_sample():
    ctx = PlanContext("dit", 4, 6, False)
    methods = resolve(as_methods("schedule(run=0-2.4,threshold=0.1)"), ctx)
    assert methods[0].spec() == "schedule(run=0-2.4,blocks=1:4,order=1,coord=step,threshold=0.1)"
    ops = [p.ranges[0] for p in build_plans(methods, ctx)]
    assert all(op.action == "adaptive" and op.threshold == 0.1 and op.max_cached == 6 for op in ops)
    assert [op.force for op in ops] == [True, True, True, False, True, False]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dit-schedule")
    tiny_dit_pipeline(folder, "ddim", num_layers=6)
    return load(folder)


def test_compute_fraction_counts_the_skipped_blocks(pipe):
    out = pipe(class_labels=LABELS, num_inference_steps=STEPS, accel="schedule(run=0-2.4)", output_type="np",
               progress=False)
    # 4 steps run all 6 blocks; 2 run block 0 only (both CFG rows alike).
    assert out.stats["compute_fraction"] == pytest.approx((4 * 6 + 2 * 1) / (6 * 6))


def tuner(pipe, budget):
    t = tune_module.Tuner(pipe, budget, steps=STEPS, class_labels=LABELS, screen=2, log=lambda line: None)
    t.references()
    return t


def test_greedy_takes_the_best_single_removal(pipe):
    # One removed step saves 5 of 6 blocks of 1 of 6 steps (0.139): a budget of 0.9 needs one.
    t = tuner(pipe, 0.9)
    found = greedy_schedule(t, 2, 1, (1, 6))
    every = {s: t.measure("static", schedule_spec(set(range(STEPS)) - {s}, (1, 6), 1), STEPS, 2)
             for s in range(1, STEPS)}
    best = max(every, key=lambda s: every[s].psnr)
    assert found.spec == every[best].spec and found.compute <= 0.9


def test_a_threshold_spends_the_budget_a_schedule_leaves(pipe):
    static = "schedule(run=0-2.4)"
    kw = dict(class_labels=LABELS, num_inference_steps=STEPS, output_type="np", progress=False)
    assert pipe(accel=static.replace(")", ",threshold=100)"), **kw).stats["compute_fraction"] == \
        pytest.approx(pipe(accel=static, **kw).stats["compute_fraction"])  # never exceeded: the fixed set
    assert pipe(accel=static.replace(")", ",threshold=0)"), **kw).stats["compute_fraction"] == 1.0  # always
    t = tuner(pipe, 0.85)
    filled = fill_budget(t, 2, "schedule(run=0-2.4,blocks=1:6,order=1)")
    assert filled is not None and 26 / 36 <= filled.compute <= 0.85 and "threshold=" in filled.spec


def test_greedy_fits_tight_budgets_and_refuses_impossible_ones(pipe):
    t = tuner(pipe, 0.45)
    found = greedy_schedule(t, 2, 1, (1, 6))
    assert found is not None and found.compute <= 0.45 and found.psnr > 0
    assert found.compute == pytest.approx(t.cost(found.spec))
    # Step 0 alone costs (6 + 5 * 1) / 36 = 0.306: below it nothing fits.
    assert greedy_schedule(tuner(pipe, 0.3), 2, 1, (1, 6)) is None


def test_moving_a_step_keeps_the_cost_and_never_loses_to_the_start(pipe):
    t = tuner(pipe, 0.8)
    start = t.measure("static", schedule_spec({0, 1, 4}, (1, 6), 1), STEPS, 2)
    moves = [{0, 2, 4}, {0, 1, 3}, {0, 1, 5}]  # every step but 0 to a free neighbour
    singles = [t.measure("static", schedule_spec(m, (1, 6), 1), STEPS, 2) for m in moves]
    found = refine_schedule(t, 2, start, 1, (1, 6), passes=1)
    assert found.compute == pytest.approx(start.compute)
    assert found.psnr == max([start.psnr] + [m.psnr for m in singles])
    # More passes only climb further from there, at the same cost.
    again = refine_schedule(t, 2, start, 1, (1, 6))
    assert again.psnr >= found.psnr and again.compute == pytest.approx(start.compute)


def test_high_lists_the_steps_forecast_at_the_full_order():
    ctx = PlanContext("dit", 6, 8, True, "m")
    methods = resolve(as_methods("schedule(run=0-2.5,order=2,high=4.6-7)"), ctx)
    assert methods[0].spec() == "schedule(run=0-2.5,blocks=1:6,order=2,coord=step,high=4.6-7)"
    assert [p.ranges[0].degree for p in build_plans(methods, ctx)] == [1, 1, 1, 1, None, 1, None, None]
    with pytest.raises(ConfigError, match="order=1: give order=2 or 3"):
        resolve(as_methods("schedule(run=0-2,high=4)"), ctx)
    with pytest.raises(ConfigError, match="high='9' names step 9, outside"):
        resolve(as_methods("schedule(run=0-2,order=2,high=9)"), ctx)
    with pytest.raises(ConfigError, match="forecast degree must be an integer in"):
        RangeOp(1, 6, "apply", order=1, degree=2)


def test_high_on_no_skipped_step_is_order_one_and_on_all_is_the_full_order(pipe):
    kw = dict(class_labels=LABELS, num_inference_steps=STEPS, output_type="np", progress=False)
    order1 = pipe(accel="schedule(run=0-1.4)", **kw).images
    order2 = pipe(accel="schedule(run=0-1.4,order=2)", **kw).images
    assert not (order1 == order2).all()
    assert (pipe(accel="schedule(run=0-1.4,order=2,high=0)", **kw).images == order1).all()
    assert (pipe(accel="schedule(run=0-1.4,order=2,high=2-3.5)", **kw).images == order2).all()
    # with a threshold (adaptive ops) the degree reaches the forecasts too
    t1 = pipe(accel="schedule(run=0-1.4,threshold=0.5)", **kw).images
    assert (pipe(accel="schedule(run=0-1.4,order=2,high=0,threshold=0.5)", **kw).images == t1).all()


def test_mixing_orders_keeps_the_cost_and_never_loses_to_order_one_or_the_best_single_step(pipe):
    t = tuner(pipe, 0.8)
    found = t.measure("static", schedule_spec({0, 1, 4}, (1, 6), 1), STEPS, 2)
    mixed = mix_orders(t, 2, found, (1, 6))
    assert mixed.compute == pytest.approx(found.compute)
    singles = [t.measure("static", f"schedule(run=0-1.4,blocks=1:6,order=2,high={s})", STEPS, 2) for s in (2, 3, 5)]
    assert mixed.psnr == max(mixed.psnr, found.psnr, *(m.psnr for m in singles))
    assert mixed is found or ("high=" in mixed.spec and "run=0-1.4" in mixed.spec)
