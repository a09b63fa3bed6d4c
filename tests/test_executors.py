"""Executors: eager is today's path; the compiled executor (aot_eager: Dynamo's real
fullgraph tracing without code generation) equals it, builds exactly the planned graphs
before the loop and never recompiles; one small inductor run."""

from __future__ import annotations

import pytest
import torch

from dite.accel import AttentionPolicy, BlockPlan, StepPlan
from dite.engine.errors import ConfigError
from dite.engine.runtime.executors import make_executor
from dite.engine.runtime.executors.compiled import RecompileError
from dite.models.mmdit import MMDiT, MMDiTConfig
from tiny_runtime import dit_cond, generate, planned_graphs, plans_for, randomized, sd3_cond


@pytest.fixture(scope="module")
def mmdit():
    cfg = MMDiTConfig(depth=6, num_heads=2, head_dim=8, in_channels=4, out_channels=4, pos_embed_max_size=8,
                      context_dim=8, pooled_dim=6, sample_size=4)
    return randomized(MMDiT(cfg))


def test_eager_executor_is_the_default_path(mmdit):
    plans = plans_for("ditcache+promptgate", mmdit, 8)
    a, _ = generate(mmdit, sd3_cond(), plans, 8)
    b, state = generate(mmdit, sd3_cond(), plans, 8, executor=make_executor("eager"))
    assert torch.equal(a, b) and state.executor["name"] == "eager"


@pytest.mark.slow
def test_compiled_sd3_every_step_kind_equals_eager(mmdit):
    """SD3 + DiTCache + PromptGate + ToDo: plain, record, apply steps on both batch sizes."""
    torch._dynamo.reset()
    plans = plans_for("ditcache+promptgate+todo", mmdit, 10)
    eager, _ = generate(mmdit, sd3_cond(), plans, 10)
    executor = make_executor("compiled", backend="aot_eager")
    storage = {}

    def watch(i, x, t, cond, plan, state):  # the delta buffers keep their storage once recorded
        for key, delta in state.deltas.deltas.items():
            storage.setdefault((key, delta["image"].shape[0]), set()).add(delta["image"].data_ptr())
        return plan

    out, state = generate(mmdit, sd3_cond(), plans, 10, executor=executor, hook=watch)
    assert (out - eager).abs().max().item() <= 1e-5
    stats = state.executor
    assert stats["graphs_built"] == stats["expected_graphs"] == stats["graphs"] == planned_graphs(mmdit, plans)
    assert sum(v for k, v in stats["hits"].items() if k.startswith("prepare")) == 10
    assert storage and all(len(ptrs) == 1 for ptrs in storage.values())
    # A second generation of the same shapes builds nothing and runs under fail_on_recompile.
    again, state2 = generate(mmdit, sd3_cond(), plans, 10, executor=executor)
    assert torch.equal(again, out) and state2.executor["graphs_built"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["deltacache", "schedule(run=0-3.5,order=2)", "schedule(run=0-3.5,order=2,high=4)"])
def test_compiled_dit_range_caches_equal_eager(dit, spec):
    torch._dynamo.reset()
    plans = plans_for(spec, dit, 8)
    eager, _ = generate(dit, dit_cond(), plans, 8, latent=(4, 8, 8), scheduler="ddim")
    out, state = generate(dit, dit_cond(), plans, 8, executor=make_executor("compiled", backend="aot_eager"),
                          latent=(4, 8, 8), scheduler="ddim")
    assert (out - eager).abs().max().item() <= 1e-5
    assert state.executor["graphs_built"] == planned_graphs(dit, plans)


def test_unplanned_shapes_and_broken_attention_chains_are_errors(dit):
    torch._dynamo.reset()
    executor = make_executor("compiled", backend="aot_eager")
    plans = [StepPlan()] * 2
    _, state = generate(dit, dit_cond(), plans, 2, executor=executor, latent=(4, 8, 8), scheduler="ddim")
    run = executor.begin(dit, plans, lambda: [])  # graphs exist; a batch of another size has none
    with pytest.raises(RecompileError, match="not built before the loop"):
        with torch.inference_mode():
            run.step(torch.zeros(4, 4, 8, 8), torch.zeros(4), dit_cond((1, 2)), plans[0], state)
    # fastattn plans run compiled (tests/test_attend.py); one that reuses what no earlier step
    # stored is refused before any graph is built.
    share = StepPlan(blocks=tuple(BlockPlan(AttentionPolicy(kind="share")) for _ in dit.blocks))
    with pytest.raises(ConfigError, match="reuses its stored output at step 0, but no earlier step"):
        executor.begin(dit, [share], lambda: [])
    with pytest.raises(ConfigError, match="unknown executor"):
        make_executor("jit")


@pytest.mark.slow
@pytest.mark.skipif(not __import__("shutil").which("g++"), reason="inductor on CPU needs a C++ compiler")
def test_inductor_on_cpu(dit):
    torch._dynamo.reset()
    plans = [StepPlan()] * 2
    eager, _ = generate(dit, dit_cond(), plans, 2, latent=(4, 8, 8), scheduler="ddim")
    out, state = generate(dit, dit_cond(), plans, 2, executor=make_executor("compiled"), latent=(4, 8, 8),
                          scheduler="ddim")
    assert state.executor["backend"] == "inductor" and state.executor["graphs_built"] == 3
    assert (out - eager).abs().max().item() <= 1e-4  # fused kernels reorder float sums
