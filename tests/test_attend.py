"""attend(): one pure attention function for every policy, its state passed in and out
explicitly; DiTFastAttn plans through the compiled executor (aot_eager) equal eager, build
exactly the planned graphs before the loop, never recompile and sync the host zero times
per step."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from dite.engine.errors import ConfigError
from dite.engine.runtime.attention_cache import AttentionCache
from dite.engine.runtime.executors import make_executor
from dite.engine.runtime.executors.compiled import CompiledRun
from dite.models.attention import NO_STATE, AttentionState, attend, reads, writes
from dite.models.denoiser import Hidden
from dite.models.dit import DiT, DiTConfig
from dite.models.layers import SelfAttention
from dite.models.mmdit import JointBlock, MMDiT, MMDiTConfig
from dite.models.plan import AttentionPolicy, BlockPlan, RangeOp, StepPlan
from tiny_runtime import dit_cond, generate, planned_graphs, plans_for, randomized, sd3_cond

STORE_ALL = AttentionPolicy(store_residual=True, window=2, store_output=True)


@pytest.fixture
def attn():
    torch.manual_seed(0)
    return SelfAttention(16, 2).eval()


def test_attend_takes_and_returns_the_state_explicitly(attn):
    """The pure path and the cached forward are the same computation, bit for bit."""
    x1, x2 = torch.randn(2, 12, 16), torch.randn(2, 12, 16)
    out1, stored = attn.attend(x1, STORE_ALL)
    assert stored.residual.shape == (2, 2, 12, 8) and torch.equal(stored.output, out1)
    window = AttentionPolicy(kind="window", window=2)
    out2, nothing = attn.attend(x2, window, state=AttentionState(residual=stored.residual))
    assert nothing == NO_STATE
    cache = AttentionCache()
    assert torch.equal(attn(x1, STORE_ALL, None, cache, 7), out1)
    assert torch.equal(cache.residuals[7], stored.residual) and torch.equal(attn(x2, window, None, cache, 7), out2)
    shared, _ = attn.attend(x2, AttentionPolicy(kind="share"), state=AttentionState(output=out1))
    assert shared is out1
    with pytest.raises(ConfigError, match="reuses a stored residual, but this forward has no attention cache"):
        attn(x2, window)


def test_attend_projects_only_what_the_policy_needs():
    calls = []

    def qkv(rows):
        calls.append(rows)
        return tuple(torch.randn(4, 2, 6, 8)[rows] for _ in range(3))

    out, _ = attend(qkv, AttentionPolicy(kind="share"), AttentionState(output=torch.ones(4, 6, 16)), rows=4,
                    project=lambda o: pytest.fail("AST projects nothing"))
    assert calls == [] and out.shape == (4, 6, 16)
    out, stored = attend(qkv, AttentionPolicy(cfg_share="uncond_first", store_residual=True, window=1,
                                              store_output=True), rows=4, project=lambda o: o.sum(1))
    assert calls == [slice(2, 4)]  # ASC: the conditional half only, copied to both halves
    assert torch.equal(out[:2], out[2:]) and stored.residual.shape[0] == 4 and stored.output is out
    assert reads(AttentionPolicy(kind="window")) == ("residual",) and writes(STORE_ALL) == ("residual", "output")
    assert writes(AttentionPolicy(kind="share", store_output=True)) == ()


def test_joint_attention_state_holds_both_streams():
    torch.manual_seed(0)
    cfg = MMDiTConfig(depth=2, num_heads=2, head_dim=8, in_channels=4, out_channels=4, pos_embed_max_size=8,
                      context_dim=8, pooled_dim=6)
    for index in (0, 1):  # 1 is the pre-only last block: no text output
        block = JointBlock(cfg, index).eval()
        cache = AttentionCache()
        h = Hidden(image=torch.randn(2, 12, 16), text=torch.randn(2, 5, 16), c=torch.randn(2, 16), grid=(3, 4),
                   attn_cache=cache)
        full = block(h, BlockPlan(STORE_ALL))
        image, text = cache.outputs[index]
        assert image.shape == (2, 12, 16) and (text is None) == (index == 1)
        assert cache.residuals[index].shape == (2, 2, 12, 8)  # image queries only
        cache.select_rows(slice(1, 2))
        assert cache.outputs[index][0].shape[0] == 1
        shared = block(Hidden(image=h.image[1:], text=h.text[1:], c=h.c[1:], grid=(3, 4), attn_cache=cache),
                       BlockPlan(AttentionPolicy(kind="share")))
        assert torch.allclose(shared.image, full.image[1:], atol=1e-6)


# ---------------------------------------------------------------- compiled executor

def fastattn_plans(model, tmp_path, steps, window, layers, extra=""):
    (tmp_path / "plan.json").write_text(json.dumps({"format": "dite-fastattn-plan/1", "steps": steps,
                                                    "window": window, "layers": layers}))
    return plans_for(f"fastattn(plan={tmp_path / 'plan.json'}){extra}", model, steps)


F, FA, W, WA, S = ("full_attn", "full_attn+cfg_attn_share", "residual_window_attn",
                   "residual_window_attn+cfg_attn_share", "output_share")


@contextlib.contextmanager
def count_host_syncs(monkeypatch):
    """Every Python-level read of a tensor's values on the host (what blocks on a device
    until its queue drains) made while active; graphs themselves cannot hold one
    (fullgraph)."""
    syncs = []
    with monkeypatch.context() as m:
        for name in ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__"):
            real = getattr(torch.Tensor, name)
            m.setattr(torch.Tensor, name, lambda self, *a, _real=real, _name=name, **k: syncs.append(_name) or
                      _real(self, *a, **k))
        yield syncs


def compiled_equals_eager(model, cond, plans, steps, monkeypatch, **kw):
    with count_host_syncs(monkeypatch) as probe:  # the counter sees what it must
        bool(torch.ones(1)), torch.ones(1).tolist()
    assert probe == ["__bool__", "tolist"]
    eager, _ = generate(model, cond, plans, steps, **kw)
    executor = make_executor("compiled", backend="aot_eager")
    per_step, storage = [], {}
    real_step = CompiledRun.step

    def step(self, x, t, cond, plan, state):
        with count_host_syncs(monkeypatch) as syncs:
            out = real_step(self, x, t, cond, plan, state)
        per_step.append(len(syncs))
        for key, value in state.attention.residuals.items():  # buffers keep their storage
            storage.setdefault((key, value.shape[0]), set()).add(value.data_ptr())
        return out

    monkeypatch.setattr(CompiledRun, "step", step)
    out, state = generate(model, cond, plans, steps, executor=executor, **kw)
    assert (out - eager).abs().max().item() <= 1e-5
    stats = state.executor
    assert stats["graphs_built"] == stats["expected_graphs"] == planned_graphs(model, plans)
    # Host syncs per step of the compiled executor under a fastattn plan: zero.
    assert per_step == [0] * steps
    assert storage and all(len(ptrs) == 1 for ptrs in storage.values())
    again, state2 = generate(model, cond, plans, steps, executor=executor, **kw)
    assert torch.equal(again, out) and state2.executor["graphs_built"] == 0
    return state


def kinds(plans):
    return {(p.kind, bool(p.cfg_share)) for plan in plans for p in (b.attention for b in plan.blocks)}


@pytest.mark.slow
def test_compiled_dit_fastattn_with_promptgate_equals_eager(tmp_path, monkeypatch):
    torch._dynamo.reset()
    model = randomized(DiT(DiTConfig(hidden_size=16, depth=4, num_heads=2, num_classes=10, input_size=8)), seed=1)
    model.init_computed_buffers(torch.device("cpu"))
    layers = [[F, W, WA, S, FA, W], [F, S, FA, W, S, F], [F, FA, S, WA, W, S], [F] * 6]
    plans = fastattn_plans(model, tmp_path, 6, 2, layers, "+promptgate(step=4)")
    assert {("window", False), ("window", True), ("share", False), ("full", True)} <= kinds(plans)
    state = compiled_equals_eager(model, dit_cond(), plans, 6, monkeypatch, latent=(4, 8, 8), scheduler="ddim")
    assert sum(s["rows"] for s in state.steps_run) == 4 * 2 + 2 * 1


@pytest.mark.slow
def test_compiled_sd3_fastattn_with_ditcache_and_promptgate_equals_eager(tmp_path, monkeypatch):
    """Joint attention (two output streams, a pre-only last block), uncond_first rows, a
    cached range that skips some layers' steps, and the gate halving the stored state."""
    torch._dynamo.reset()
    cfg = MMDiTConfig(depth=6, num_heads=2, head_dim=8, in_channels=4, out_channels=4, pos_embed_max_size=8,
                      context_dim=8, pooled_dim=6, sample_size=4)
    model = randomized(MMDiT(cfg))
    row = [F, WA, S, W, FA, S, W, F]
    layers = [row, [F, S, FA, W, S, WA, S, F], row, [F, F, FA, S, S, W, W, S], row, [F, W, S, WA, FA, S, W, S]]
    plans = fastattn_plans(model, tmp_path, 8, 1, layers, "+ditcache(blocks=2:4,start_step=3)+promptgate(step=6)")
    assert any(r.action == "apply" for p in plans for r in p.ranges)
    compiled_equals_eager(model, sd3_cond(), plans, 8, monkeypatch)


def test_compiled_refuses_fastattn_inside_an_adaptive_range():
    model = randomized(DiT(DiTConfig(hidden_size=16, depth=4, num_heads=2, num_classes=10, input_size=8)))
    blocks = (BlockPlan(), BlockPlan(AttentionPolicy(store_output=True)), BlockPlan(), BlockPlan())
    plan = StepPlan(blocks=blocks, ranges=(RangeOp(1, 3, "adaptive"),))
    with pytest.raises(ConfigError, match="adaptive cache gathers the rows"):
        make_executor("compiled", backend="aot_eager").begin(model, [plan], lambda: [])
