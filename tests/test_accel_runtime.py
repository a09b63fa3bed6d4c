"""Plans at run time: what the blocks really run, cached steps by hand, PromptGate, ToDo."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dite.accel import RangeOp, StepPlan
from dite.engine.runtime.delta_store import DeltaStore
from dite.engine.runtime.sampling import apply_guidance, batch_for_cfg
from tiny_runtime import RowCounter, dit_cond, plans_for, randomized, sample, sd3_cond
from dite.engine.runtime.step import run_step
from dite.models.denoiser import Conditioning
from dite.models.dit import DiT, DiTConfig
from dite.models.layers import SelfAttention, downsample_tokens, merge_heads, split_heads
from dite.models.mmdit import MMDiT, MMDiTConfig
from dite.models.plan import AttentionPolicy
from dite.schedulers import by_name


@pytest.fixture(scope="module")
def mmdit():
    """SD3-medium's depth (24 joint blocks), tiny width."""
    cfg = MMDiTConfig(depth=24, num_heads=2, head_dim=8, in_channels=4, out_channels=4, pos_embed_max_size=8,
                      context_dim=8, pooled_dim=6, sample_size=4)
    return randomized(MMDiT(cfg))


@pytest.fixture(scope="module")
def dit():
    cfg = DiTConfig(hidden_size=16, depth=6, num_heads=2, num_classes=10, input_size=8)
    model = randomized(DiT(cfg), seed=1)
    model.init_computed_buffers(torch.device("cpu"))
    return model


def test_record_only_plans_and_factor_one_are_bit_identical(mmdit):
    plain, _ = sample(mmdit, sd3_cond(), None, 6)
    recording = [StepPlan(ranges=(RangeOp(1, 21, "record"),))] * 6
    assert torch.equal(sample(mmdit, sd3_cond(), recording, 6)[0], plain)
    assert torch.equal(sample(mmdit, sd3_cond(), plans_for("todo(factor=1)", mmdit, 6), 6)[0], plain)


@pytest.mark.parametrize("spec,expected", [("", 1344), ("ditcache", 984), ("ditcache+promptgate", 872)])
def test_block_evaluations_equal_the_plan(mmdit, spec, expected):
    counter = RowCounter(mmdit)
    try:
        _, state = sample(mmdit, sd3_cond(), plans_for(spec, mmdit, 28), 28)
    finally:
        counter.close()
    assert counter.rows == expected
    assert sum(s["rows"] * s["blocks"] for s in state.steps_run) == expected


def test_cached_step_reproduces_by_hand(mmdit):
    cond = sd3_cond()
    g = torch.Generator().manual_seed(5)
    x1, x2 = torch.randn(2, 4, 6, 4, generator=g), torch.randn(2, 4, 6, 4, generator=g)
    t1, t2 = torch.full((2,), 700.0), torch.full((2,), 650.0)
    cache = DeltaStore()
    run_step(mmdit, x1, t1, cond, StepPlan(ranges=(RangeOp(1, 21, "record"),)), cache)
    out = run_step(mmdit, x2, t2, cond, StepPlan(ranges=(RangeOp(1, 21, "apply"),)), cache)

    plan = StepPlan()
    h = mmdit.run_blocks(mmdit.prepare(x1, t1, cond), plan, 0, 1)
    h_end = mmdit.run_blocks(h, plan, 1, 21)
    delta_image, delta_text = h_end.image - h.image, h_end.text - h.text
    assert torch.equal(cache.deltas[(1, 21)]["image"], delta_image)
    assert torch.equal(cache.deltas[(1, 21)]["text"], delta_text)
    h2 = mmdit.run_blocks(mmdit.prepare(x2, t2, cond), plan, 0, 1)
    h2 = h2.__class__(image=h2.image + delta_image, text=h2.text + delta_text, c=h2.c, grid=h2.grid)
    expected = mmdit.finalize(mmdit.run_blocks(h2, plan, 21, 24))
    assert torch.equal(out, expected)


def manual_gated_loop(model, cond, steps, gate, latent, scale=5.0):
    """Guided steps before `gate`, then the conditional rows alone with no guidance."""
    sched = by_name("flow_euler")
    st = sched.start(steps)
    x = torch.randn(1, *latent, generator=torch.Generator().manual_seed(0))
    cond_only = cond.conditional_only()
    for i in range(steps):
        t = st.timesteps[i]
        if i < gate:
            out = model(batch_for_cfg(x, cond.cfg_row_order), t.expand(2), cond)
            out = apply_guidance(out, cond.cfg_row_order, scale, 4)
        else:
            out = model(x, t.expand(1), cond_only)
        x = sched.step(out[:, :4], i, x, st)
    return x


@pytest.mark.parametrize("family", ["sd3", "dit"])
def test_promptgate_steps_are_cond_only_unguided(mmdit, dit, family):
    model, cond, latent = (mmdit, sd3_cond(), (4, 6, 4)) if family == "sd3" else (dit, dit_cond(), (4, 8, 8))
    out, state = sample(model, cond, plans_for("promptgate(step=3)", model, 6), 6, latent=latent)
    assert [s["rows"] for s in state.steps_run] == [2, 2, 2, 1, 1, 1]
    assert torch.equal(out, manual_gated_loop(model, cond, 6, 3, latent))


@pytest.mark.parametrize("layout,kept", [("uncond_first", 1.0), ("cond_first", 0.0)])
def test_gate_slices_caches_to_the_conditional_rows(layout, kept):
    cond = Conditioning(class_labels=torch.tensor([0, 1]), cfg_row_order=layout)
    cache = DeltaStore()
    before = torch.zeros(2, 3, 4)
    after = torch.stack([torch.zeros(3, 4), torch.ones(3, 4)])  # row 0 -> delta 0, row 1 -> delta 1
    from dite.models.denoiser import Hidden
    cache.record((1, 3), Hidden(image=before, c=torch.zeros(2, 4), grid=(1, 3)),
                 Hidden(image=after, c=torch.zeros(2, 4), grid=(1, 3)), ("image",))
    cache.select_rows(cond.cond_rows(2))
    assert cache.deltas[(1, 3)]["image"].shape[0] == 1
    assert torch.all(cache.deltas[(1, 3)]["image"] == kept)
    assert cond.conditional_only().class_labels.tolist() == [1 if layout == "uncond_first" else 0]


def test_cache_and_gate_together_on_both_layouts(mmdit, dit):
    for model, cond, latent in ((mmdit, sd3_cond(), (4, 6, 4)), (dit, dit_cond(), (4, 8, 8))):
        plain, _ = sample(model, cond, None, 10, latent=latent)
        out, state = sample(model, cond, plans_for("ditcache+promptgate", model, 10), 10, latent=latent)
        assert out.shape == plain.shape and torch.isfinite(out).all()
        assert [s["rows"] for s in state.steps_run][-3:] == [1, 1, 1]


@pytest.mark.parametrize("grid", [(4, 4), (3, 5), (6, 4)])
def test_todo_kv_source_is_an_interpolated_grid(grid):
    h, w = grid
    x = torch.randn(2, h * w, 16, generator=torch.Generator().manual_seed(1))
    image = x.transpose(1, 2).reshape(2, 16, h, w)
    expected = F.interpolate(image, size=(int(h / 1.6), int(w / 1.6)), mode="bilinear", align_corners=False)
    assert torch.equal(downsample_tokens(x, grid, 1.6, "bilinear"), expected.flatten(2).transpose(1, 2))


def test_todo_self_attention_by_hand():
    torch.manual_seed(0)
    attn = SelfAttention(16, 2).eval()
    x, grid = torch.randn(2, 15, 16), (3, 5)
    policy = AttentionPolicy(kv_factor=2.0)
    q, _, _ = attn.qkv(x).chunk(3, dim=-1)
    _, k, v = attn.qkv(downsample_tokens(x, grid, 2.0, "bilinear")).chunk(3, dim=-1)
    ref = attn.proj(merge_heads(F.scaled_dot_product_attention(*(split_heads(t, 2) for t in (q, k, v)))))
    assert torch.allclose(attn(x, policy, grid), ref, atol=1e-6)


def test_todo_on_mmdit_shrinks_image_keys_only(mmdit, monkeypatch):
    import dite.models.attention as attention_module  # MMDiT's attention runs through its attend()

    seen = []
    real = attention_module.attention

    def spy(q, k, v, **kw):
        seen.append((q.shape[2], k.shape[2]))
        return real(q, k, v, **kw)

    monkeypatch.setattr(attention_module, "attention", spy)
    plans = plans_for("todo(blocks=0:2,factor=2)", mmdit, 1)
    x = torch.randn(2, 4, 6, 4)  # grid 3 x 2 tokens: keys from int(3/2) x int(2/2) = 1 x 1
    run_step(mmdit, x, torch.full((2,), 500.0), sd3_cond(), plans[0], DeltaStore())
    assert seen[:2] == [(6 + 5, 1 + 5)] * 2  # queries all 6 image + 5 text; keys 1 image + 5 text
    assert seen[2] == (11, 11)
