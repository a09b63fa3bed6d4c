"""Forecasting and adaptive block caches: exact forecasts of polynomial trajectories, the
dynamic cache's decisions counted with hooks, per-sample decisions in mixed batches, and the
compiled executor equal to eager with zero recompiles for every new method."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dite.accel import PlanContext, as_methods, resolve
from dite.engine.errors import ConfigError
from dite.engine.runtime.executors import make_executor
from dite.engine.runtime.sampling import GenerationState, denoise
from dite.models.denoiser import Conditioning, Denoiser, Hidden
from dite.models.mmdit import MMDiT, MMDiTConfig
from dite.schedulers import by_name
from tiny_runtime import RowCounter, plans_for, randomized, sd3_cond


class PowerBlock(nn.Module):
    """Adds c**power: a block whose delta is a known polynomial of the timestep."""

    def __init__(self, power: int):
        super().__init__()
        self.power = power

    def forward(self, hidden: Hidden, plan) -> Hidden:
        return hidden.with_image(hidden.image + hidden.c[:, None, :] ** self.power)


class PolynomialDenoiser(Denoiser):
    """x -> tokens; c = t / 1000; blocks 1-3 add c**power each, so the middle range's delta
    is a polynomial of degree `power` in t (and in the step index: flow Euler's unshifted
    timesteps are evenly spaced)."""

    family = "sd3"

    def __init__(self, power: int):
        super().__init__()
        self.blocks = nn.ModuleList([PowerBlock(1)] + [PowerBlock(power) for _ in range(3)] + [PowerBlock(1)])

    def prepare(self, x, t, cond) -> Hidden:
        b, ch, h, w = x.shape
        c = (t.float() / 1000)[:, None].expand(b, ch).contiguous()
        return Hidden(image=x.flatten(2).transpose(1, 2), c=c, grid=(h, w))

    def finalize(self, hidden: Hidden) -> torch.Tensor:
        b, n, ch = hidden.image.shape
        return hidden.image.transpose(1, 2).reshape(b, ch, *hidden.grid) * 0.01


def run(model, plans, steps, cond=None, batch=1, executor=None, seed=0, latent=(4, 4, 4), shift=3.0,
        row_scales=None):
    cond = cond if cond is not None else Conditioning(pooled=torch.zeros(batch, 1), cfg_row_order="none")
    sched = by_name("flow_euler", shift=shift)
    state = GenerationState(scheduler=sched.start(steps))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *latent, generator=g)
    if row_scales is not None:  # samples that differ enough to decide differently
        x = x * torch.tensor(row_scales)[:, None, None, None]
    with torch.inference_mode():
        out = denoise(model, sched, x, cond, state, guidance_scale=5.0, prediction_channels=latent[0],
                      plans=plans, progress=False, executor=executor)
    return out, state


@pytest.mark.parametrize("degree", [1, 2])
@pytest.mark.parametrize("coord, shift", [("step", 1.0), ("time", 1.0), ("time", 3.0)])
def test_forecast_of_order_k_reproduces_a_degree_k_trajectory(degree, coord, shift):
    """The delta is a polynomial in t: exact in the time coordinate on any schedule, in the
    step index where the timesteps are evenly spaced (shift 1)."""
    model = PolynomialDenoiser(degree).eval()
    steps = 10
    plain, _ = run(model, None, steps, shift=shift)
    spec = f"ditcache(blocks=1:4,start_step=4,order={degree},coord={coord})"
    exact, _ = run(model, plans_for(spec, model, steps, guided=False), steps, shift=shift)
    assert torch.allclose(exact, plain, atol=1e-6, rtol=0)
    lower, _ = run(model, plans_for(f"ditcache(blocks=1:4,start_step=4,order={degree - 1},coord={coord})", model,
                                    steps, guided=False), steps, shift=shift)
    assert (lower - plain).abs().max() > 1e-4  # the lower order misses: the test can fail


def test_step_coordinate_is_not_exact_on_a_shifted_schedule():
    model = PolynomialDenoiser(1).eval()
    plain, _ = run(model, None, 10, shift=3.0)
    by_step, _ = run(model, plans_for("ditcache(blocks=1:4,start_step=2,order=1,coord=step)", model, 10,
                                      guided=False), 10, shift=3.0)
    assert (by_step - plain).abs().max() > 1e-5


@pytest.fixture(scope="module")
def mmdit():
    cfg = MMDiTConfig(depth=6, num_heads=2, head_dim=8, in_channels=4, out_channels=4, pos_embed_max_size=8,
                      context_dim=8, pooled_dim=6, sample_size=4)
    return randomized(MMDiT(cfg))


def test_adaptive_decisions_are_what_the_blocks_ran(mmdit):
    steps = 10
    plans = plans_for("adaptive(front=1,back=1,threshold=1.0,warmup=2,max_cached=3)", mmdit, steps)
    counter = RowCounter(mmdit)
    try:
        _, state = run(mmdit, plans, steps, cond=sd3_cond(), latent=(4, 6, 4))
    finally:
        counter.close()
    decisions = state.ranges.decisions
    assert [d["step"] for d in decisions] == list(range(steps))
    assert all(d["ran"] == [True] for d in decisions[:2])  # warm-up
    skipped = [d["step"] for d in decisions if not d["ran"][0]]
    assert skipped, "no step reused: the threshold never let the cache work"
    # Consecutive reuse is capped.
    runs = "".join("r" if d["ran"][0] else "s" for d in decisions)
    assert "ssss" not in runs
    middle = 4  # blocks [1, 5) of 6
    expected = sum(2 * (2 + (middle if d["ran"][0] else 0)) for d in decisions)
    assert counter.rows == expected == sum(s.get("block_rows", s["rows"] * s["blocks"]) for s in state.steps_run)


def test_each_sample_decides_alone_in_a_mixed_batch(mmdit):
    """Three samples batched get the decisions and latents each gets alone."""
    steps, spec = 10, "adaptive(front=1,back=0,threshold=0.95,warmup=2,max_cached=2,order=1)"
    g = torch.Generator().manual_seed(7)
    contexts, pooled = torch.randn(3, 5, 8, generator=g), torch.randn(3, 6, generator=g)
    null_ctx, null_pooled = torch.randn(1, 5, 8, generator=g), torch.randn(1, 6, generator=g)

    def cond(rows):
        n = len(rows)
        return Conditioning(context=torch.cat([null_ctx.expand(n, -1, -1), contexts[rows]]),
                            pooled=torch.cat([null_pooled.expand(n, -1), pooled[rows]]), cfg_row_order="uncond_first")

    latents = torch.randn(3, 4, 6, 4, generator=g) * torch.tensor([1.0, 2.5, 0.3])[:, None, None, None]
    plans = plans_for(spec, mmdit, steps)

    def sample(rows):
        sched = by_name("flow_euler")
        state = GenerationState(scheduler=sched.start(steps))
        with torch.inference_mode():
            out = denoise(mmdit, sched, latents[rows], cond(rows), state, guidance_scale=5.0, prediction_channels=4,
                          plans=plans, progress=False)
        return out, [d["ran"] for d in state.ranges.decisions]

    batched, batched_decisions = sample([0, 1, 2])
    alone = [sample([k]) for k in range(3)]
    for k, (latent, decisions) in enumerate(alone):
        assert [d[k] for d in batched_decisions] == [d[0] for d in decisions]
        assert torch.allclose(batched[k], latent[0], atol=1e-5, rtol=0)
    per_step = {tuple(d) for d in batched_decisions}
    assert any(len(set(d)) > 1 for d in per_step), "no step mixed running and reusing samples: test is vacuous"


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["ditcache(order=1)", "deltacache(order=2)+promptgate",
                                  "adaptive(front=1,back=1,threshold=0.9,warmup=2,max_cached=2)",
                                  "adaptive(front=1,threshold=0.9,warmup=2,max_cached=2)+promptgate"])
def test_compiled_equals_eager_without_recompiles(mmdit, spec):
    steps, batch = 8, 2
    plans = plans_for(spec, mmdit, steps)
    g = torch.Generator().manual_seed(11)
    cond = Conditioning(context=torch.randn(2 * batch, 5, 8, generator=g), pooled=torch.randn(2 * batch, 6, generator=g),
                        cfg_row_order="uncond_first")
    shape = dict(cond=cond, batch=batch, latent=(4, 6, 4), row_scales=[1.0, 3.0])
    eager, eager_state = run(mmdit, plans, steps, **shape)
    executor = make_executor("compiled", backend="aot_eager")
    compiled, state = run(mmdit, plans, steps, executor=executor, **shape)
    assert torch.allclose(compiled, eager, atol=1e-5, rtol=0)
    assert state.ranges.decisions == eager_state.ranges.decisions
    if spec.startswith("adaptive"):  # the gathered-rows graphs ran, not only all-or-nothing steps
        assert any(len(set(d["ran"])) > 1 for d in state.ranges.decisions)
    assert state.executor["graphs_built"] == state.executor["expected_graphs"] > 0
    again, state2 = run(mmdit, plans, steps, executor=executor, **shape)
    assert state2.executor["graphs_built"] == 0 and torch.equal(again, compiled)


@pytest.mark.parametrize("spec, message", [
    ("adaptive(front=0)", "front >= 1"),
    ("adaptive(front=3,back=3)", "no middle blocks"),
    ("adaptive(max_cached=0)", "max_cached=0"),
    ("adaptive(threshold=nan)", "threshold=nan"),
    ("adaptive(threshold=-1)", "threshold=-1"),
    ("adaptive(order=5)", "order=5"),
    ("adaptive(coord=sigma)", "coord='sigma'"),
    ("adaptive(signal=x)", "signal='x'"),
    ("adaptive(warmup=0)", "warmup=0"),
    ("ditcache(order=-1)", "order=-1"),
    ("deltacache(coord=t)", "coord='t'"),
])
def test_bad_settings_are_refused(spec, message):
    ctx = PlanContext("sd3", 6, 10, True)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        resolve(as_methods(spec), ctx)


def test_adaptive_with_fastattn_is_refused_when_run(mmdit):
    from dite.accel import AttentionPolicy, BlockPlan, RangeOp, StepPlan

    share = BlockPlan(attention=AttentionPolicy(kind="share"))
    plan = StepPlan(blocks=(BlockPlan(),) + (share,) * 5, ranges=(RangeOp(1, 6, "adaptive"),))
    with pytest.raises(ConfigError, match="fastattn"):
        run(mmdit, [plan] * 2, 2, cond=sd3_cond(), latent=(4, 6, 4))


def test_stats_count_compute_and_flops_of_adaptive_steps(mmdit):
    from dite.engine.runtime.accounting import accel_stats

    steps = 8
    methods = resolve(as_methods("adaptive(front=1,threshold=0.95,warmup=2)"), PlanContext("sd3", 6, steps, True))
    plans = plans_for("adaptive(front=1,threshold=0.95,warmup=2)", mmdit, steps)
    _, state = run(mmdit, plans, steps, cond=sd3_cond(), latent=(4, 6, 4))
    stats = accel_stats(mmdit, methods, plans, state.steps_run, (1, 4, 6, 4), sd3_cond())
    ran = sum(d["ran"][0] for d in state.ranges.decisions)
    assert stats["compute_fraction"] == pytest.approx((steps + 5 * ran) / (6 * steps))
    # FLOPs: between the all-skip and the all-run plan, linear in the rows that ran.
    assert 1 / 6 < stats["flops_ratio"] < 1
    assert stats["flops_ratio"] == pytest.approx(stats["compute_fraction"], abs=0.03)


def test_a_kept_reference_size_is_used_only_for_that_very_reference():
    """decide keeps each reference's L1 size between the steps a sample skips; a reference
    replaced from outside (PromptGate's row drop, a parallel hand-over) is measured again."""
    from dite.engine.runtime.adaptive import RangeState, decide
    from dite.models.plan import RangeOp

    op = RangeOp(1, 4, "adaptive", order=1, threshold=0.1, max_cached=99)
    rs = RangeState(rows_per_sample=2, step=5)
    rs.references[op.key] = torch.full((2, 3, 4), 10.0)
    rs.streaks[op.key] = torch.zeros(2, dtype=torch.long)
    assert decide(rs, op, torch.full((2, 3, 4), 10.5)) == [False]  # 0.05 of the size: reuse
    assert decide(rs, op, torch.full((2, 3, 4), 12.0)) == [True]  # 0.2, with the kept size
    rs.references[op.key] = torch.full((2, 3, 4), 1.0)  # replaced: a kept size of 10 would say reuse
    assert decide(rs, op, torch.full((2, 3, 4), 1.5)) == [True]
    assert decide(rs, op, torch.full((2, 3, 4), 1.05)) == [False]
