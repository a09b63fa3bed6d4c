"""DiTFastAttn: band attention, each policy by hand, plan linking, calibration, plan files."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from dite.accel import PlanContext, as_methods, build_plans, resolve
from dite.engine.runtime.attention_cache import AttentionCache
from dite.accel.methods import StepDraft
from dite.accel.build import link_attention_caches
from dite.engine import load
from dite.engine.runtime.calibrate import calibrate, quantize, relative_loss
from dite.engine.errors import ConfigError
from dite.models.window_attention import band_pairs, window_attention
from dite.models.layers import SelfAttention, merge_heads, split_heads
from dite.models.plan import AttentionPolicy, RangeOp
from tiny import tiny_dit_pipeline


@pytest.mark.parametrize("n,w", [(1, 0), (7, 2), (130, 5), (300, 40), (64, 100)])
def test_window_equals_masked_full_attention(n, w):
    g = torch.Generator().manual_seed(n)
    q, k, v, gk, gv = (torch.randn(2, 3, m, 8, generator=g) for m in (n, n, n, 4, 4))
    i = torch.arange(n)
    band = (i[:, None] - i[None, :]).abs() <= w
    assert torch.allclose(window_attention(q, k, v, w), F.scaled_dot_product_attention(q, k, v, attn_mask=band),
                          atol=1e-6)
    mask = torch.cat([band, torch.ones(n, 4, dtype=torch.bool)], 1)
    ref = F.scaled_dot_product_attention(q, torch.cat([k, gk], 2), torch.cat([v, gv], 2), attn_mask=mask)
    assert torch.allclose(window_attention(q, k, v, w, gk, gv), ref, atol=1e-6)


def test_window_flops_are_the_band():
    with FlopCounterMode(display=False) as counter:
        window_attention(*(torch.empty(1, 2, 100, 8, device="meta") for _ in range(3)), 10)
    assert counter.get_total_flops() == 4 * 2 * 8 * band_pairs(100, 10)
    assert band_pairs(100, 10) == int(((torch.arange(100)[:, None] - torch.arange(100)).abs() <= 10).sum())


@pytest.fixture
def attn():
    torch.manual_seed(0)
    return SelfAttention(16, 2).eval()


def by_hand(attn, x, w=None):
    q, k, v = (split_heads(t, 2) for t in attn.qkv(x).chunk(3, dim=-1))
    full = F.scaled_dot_product_attention(q, k, v)
    if w is None:
        return full, None
    return full, window_attention(q, k, v, w)


def test_residual_window_and_share_by_hand(attn):
    cache = AttentionCache()
    x1, x2 = torch.randn(2, 12, 16), torch.randn(2, 12, 16)
    out1 = attn(x1, AttentionPolicy(store_residual=True, window=2, store_output=True), None, cache, 0)
    full1, win1 = by_hand(attn, x1, 2)
    assert torch.allclose(cache.residuals[0], full1 - win1, atol=1e-6)
    assert torch.equal(cache.outputs[0], out1)
    out2 = attn(x2, AttentionPolicy(kind="window", window=2), None, cache, 0)
    _, win2 = by_hand(attn, x2, 2)
    assert torch.allclose(out2, attn.proj(merge_heads(win2 + full1 - win1)), atol=1e-6)
    assert torch.equal(attn(x2, AttentionPolicy(kind="share"), None, cache, 0), out1)


@pytest.mark.parametrize("layout", ["cond_first", "uncond_first"])
def test_cfg_share_copies_the_conditional_half(attn, layout):
    x = torch.randn(4, 12, 16)
    cond = slice(0, 2) if layout == "cond_first" else slice(2, 4)
    out = attn(x, AttentionPolicy(cfg_share=layout), None, AttentionCache(), 0)
    expected = attn(x[cond])
    assert torch.allclose(out[:2], expected, atol=1e-6) and torch.allclose(out[2:], expected, atol=1e-6)


def test_share_keeps_the_current_gate():
    """AST replaces the attention output only: the block's gate of this step still applies."""
    from dite.models.denoiser import Hidden
    from dite.models.dit import DiTBlock, DiTConfig
    from dite.models.plan import BlockPlan

    torch.manual_seed(0)
    block = DiTBlock(DiTConfig(hidden_size=16, depth=1, num_heads=2, num_classes=4, input_size=4), 0).eval()
    cache = AttentionCache()
    x, c1, c2 = torch.randn(1, 4, 16), torch.randn(1, 16), torch.randn(1, 16)
    block(Hidden(image=x, c=c1, grid=(2, 2), attn_cache=cache), BlockPlan(AttentionPolicy(store_output=True)))
    shared = block(Hidden(image=x, c=c2, grid=(2, 2), attn_cache=cache), BlockPlan(AttentionPolicy(kind="share")))
    mods = block.adaLN_modulation(c2).chunk(6, dim=1)
    h = x + mods[2].unsqueeze(1) * cache.outputs[0]
    from dite.models.layers import modulate
    h = h + mods[5].unsqueeze(1) * block.mlp(modulate(block.norm2(h), mods[3], mods[4]))
    assert torch.allclose(shared.image, h, atol=1e-6)


def drafts(policies, ranges=None):
    return [StepDraft(ranges=list(ranges[i]) if ranges else [], attention=[p]) for i, p in enumerate(policies)]


def test_linking_stores_what_later_steps_use():
    ctx = PlanContext("dit", 1, 4, True)
    d = drafts([None, AttentionPolicy(kind="window", window=3), AttentionPolicy(kind="share"), None])
    link_attention_caches(d, ctx)
    assert d[0].attention[0].store_residual and d[0].attention[0].window == 3
    assert d[1].attention[0].store_output and not d[0].attention[0].store_output
    with pytest.raises(ConfigError, match="before any full step"):
        link_attention_caches(drafts([AttentionPolicy(kind="window", window=1)]), PlanContext("dit", 1, 1, True))


def test_linking_skips_steps_a_cached_range_did_not_run():
    ctx = PlanContext("dit", 1, 3, True)
    skip = [RangeOp(0, 1, "apply")]
    d = drafts([None, None, AttentionPolicy(kind="window", window=1)], ranges=[[], skip, []])
    link_attention_caches(d, ctx)
    assert d[0].attention[0].store_residual  # step 1 did not run block 0: step 0's residual is used


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fastattn-dit")
    tiny_dit_pipeline(folder, "ddim", num_layers=3, sample_size=8)
    return load(folder)


def run(pipe, accel=None, steps=4):
    return pipe(class_labels=[3, 5], num_inference_steps=steps, output_type="np", progress=False, accel=accel)


def test_calibration_threshold_extremes_and_plan_file(pipe, tmp_path):
    strict = calibrate(pipe, tmp_path / "strict.json", steps=4, threshold=0.0, window=4, n_calib=2, progress=False)
    assert {label for layer in strict["layers"] for label in layer} == {"full_attn"}
    loose = calibrate(pipe, tmp_path / "loose.json", steps=4, threshold=1e9, window=4, n_calib=2, progress=False)
    for layer in loose["layers"]:
        assert layer == ["full_attn"] + ["output_share"] * 3  # step 0 is never compressed
    data = json.loads((tmp_path / "loose.json").read_text())
    assert data["layers"] == loose["layers"] and data["model_id"] == pipe.model_id and data["steps"] == 4
    plain, shared = run(pipe), run(pipe, accel=f"fastattn(plan={tmp_path / 'loose.json'})")
    assert plain.stats["flops_ratio"] == plain.stats["attention_flops_ratio"] == 1.0
    # output_share on 3 of 4 steps: no attention at all there (projections included).
    assert shared.stats["attention_flops_ratio"] == pytest.approx(0.25)
    assert shared.stats["flops_ratio"] < 1.0
    assert (run(pipe, accel=f"fastattn(plan={tmp_path / 'strict.json'})").images == plain.images).all()


def test_plan_is_refused_for_other_steps_or_models(pipe, tmp_path, monkeypatch):
    calibrate(pipe, tmp_path / "p.json", steps=4, threshold=0.05, window=4, n_calib=1, progress=False)
    with pytest.raises(ConfigError, match="calibrated for 4 steps, this call runs 5"):
        run(pipe, accel=f"fastattn(plan={tmp_path / 'p.json'})", steps=5)
    monkeypatch.setitem(pipe.__dict__, "_model_id", "another")
    with pytest.raises(ConfigError, match="calibrated on another model"):
        run(pipe, accel=f"fastattn(plan={tmp_path / 'p.json'})")
    with pytest.raises(ConfigError, match="make one with `dite calibrate`"):
        resolve(as_methods("fastattn(plan=/nonexistent.json)"), PlanContext("dit", 3, 4, True))


def test_todo_and_window_never_share_a_layer(tmp_path):
    plan = {"format": "dite-fastattn-plan/1", "steps": 2, "window": 1, "layers": [["full_attn", "residual_window_attn"]]}
    (tmp_path / "p.json").write_text(json.dumps(plan))
    ctx = PlanContext("dit", 1, 2, True)
    with pytest.raises(ConfigError, match="cannot share a layer"):
        build_plans(resolve(as_methods(f"fastattn(plan={tmp_path / 'p.json'})+todo"), ctx), ctx)


def test_cfg_share_falls_back_on_promptgate_steps(tmp_path):
    plan = {"format": "dite-fastattn-plan/1", "steps": 3, "window": 1, "layers": [["full_attn"] + ["full_attn+cfg_attn_share"] * 2]}
    (tmp_path / "p.json").write_text(json.dumps(plan))
    ctx = PlanContext("dit", 1, 3, True)
    plans = build_plans(resolve(as_methods(f"fastattn(plan={tmp_path / 'p.json'})+promptgate(step=2)"), ctx), ctx)
    assert plans[1].block(0).attention.cfg_share == "cond_first" and plans[2].block(0).attention.cfg_share is None


def test_quantize_merges_towards_exact():
    chosen = [["full_attn"] * 2, ["output_share", "full_attn"], ["output_share", "output_share"],
              ["output_share", "output_share"], ["residual_window_attn", "output_share"]]
    q = quantize(chosen, 2)
    assert len({tuple(s) for s in q}) <= 2
    rank = {"full_attn": 0, "residual_window_attn": 2, "output_share": 4}
    assert all(rank[a] <= rank[b] for new, old in zip(q, chosen) for a, b in zip(new, old))


def test_relative_loss_uses_the_signed_maximum():
    # Both negative: the signed max is -1, the ratio -1 / (-1 + 1e-6), and its absolute value
    # (taken after the division, as the reference does) is 1; a magnitude max would give 0.5.
    # More cases, worked out by hand: tests/test_calibration_loss.py.
    assert float(relative_loss(torch.tensor([-2.0]), torch.tensor([-1.0]))) == pytest.approx(1.0, rel=1e-5)
    assert relative_loss(torch.tensor([2.0]), torch.tensor([1.0])) == pytest.approx(0.5)


def test_cli_calibrate_then_generate(pipe, tmp_path, capsys):
    from dite.engine.cli import main

    folder = pipe.source
    plan = tmp_path / "plan.json"
    assert main(["calibrate", "--model", folder, "--steps", "3", "--window", "4", "--threshold", "0.2",
                 "--calib", "1", "--max-signatures", "2", "-o", str(plan)]) == 0
    assert "distinct step plans" in capsys.readouterr().err
    assert json.loads(plan.read_text())["signatures"] <= 2
    assert main(["generate", "--model", folder, "--class-label", "1", "--steps", "3", "--quiet",
                 "--accel", f"fastattn(plan={plan})", "-o", str(tmp_path / "x.png")]) == 0
    assert main(["generate", "--model", folder, "--class-label", "1", "--steps", "4", "--quiet",
                 "--accel", f"fastattn(plan={plan})", "-o", str(tmp_path / "y.png")]) == 2
    assert "calibrated for 3 steps" in capsys.readouterr().err
    assert main(["calibrate", "--model", folder, "--steps", "2", "--window", "4", "--class-label", "5",
                 "--class-label", "2", "-o", str(plan)]) == 0
    assert json.loads(plan.read_text())["calibration"]["class_labels"] == [5, 2]
    assert main(["calibrate", "--model", folder, "--steps", "2", "--window", "4", "--prompt", "a cat",
                 "-o", str(plan)]) == 2
    assert "--class-label" in capsys.readouterr().err


def test_joint_attention_window_plus_residual_reproduces_full_on_the_same_input():
    """SD3: image queries see the band and every text key; with the residual of a full step
    on the same input, WA-RS gives back the full result (text queries are always full)."""
    from dite.models.denoiser import Hidden
    from dite.models.mmdit import JointBlock, MMDiTConfig
    from dite.models.plan import BlockPlan

    torch.manual_seed(0)
    cfg = MMDiTConfig(depth=2, num_heads=2, head_dim=8, in_channels=4, out_channels=4, pos_embed_max_size=8,
                      context_dim=8, pooled_dim=6)
    for index in (0, 1):  # 1 is the pre-only last block
        block = JointBlock(cfg, index).eval()
        cache = AttentionCache()
        h = Hidden(image=torch.randn(2, 12, 16), text=torch.randn(2, 5, 16), c=torch.randn(2, 16), grid=(3, 4),
                   attn_cache=cache)
        full = block(h, BlockPlan(AttentionPolicy(store_residual=True, window=2, store_output=True)))
        windowed = block(h, BlockPlan(AttentionPolicy(kind="window", window=2)))
        shared = block(h, BlockPlan(AttentionPolicy(kind="share")))
        assert torch.allclose(windowed.image, full.image, atol=1e-5) and torch.allclose(windowed.text, full.text, atol=1e-5)
        assert torch.equal(shared.image, full.image) and torch.equal(shared.text, full.text)
        asc = block(h, BlockPlan(AttentionPolicy(cfg_share="uncond_first")))
        # Both halves got the conditional (second) row's attention; with equal rows it is exact.
        h2 = Hidden(image=h.image[1:].expand(2, -1, -1), text=h.text[1:].expand(2, -1, -1), c=h.c[1:].expand(2, -1),
                    grid=(3, 4), attn_cache=cache)
        assert torch.allclose(block(h2, BlockPlan(AttentionPolicy(cfg_share="uncond_first"))).image,
                              block(h2, BlockPlan()).image, atol=1e-6)
        assert asc.image.shape == full.image.shape


def test_sd3_calibration_extremes(sd3, tmp_path):
    _, folder = sd3
    pipe = load(folder)
    kw = dict(steps=3, window=2, n_calib=1, progress=False, height=32, width=32)
    strict = calibrate(pipe, tmp_path / "s.json", threshold=0.0, **kw)
    assert {label for layer in strict["layers"] for label in layer} == {"full_attn"}
    loose = calibrate(pipe, tmp_path / "l.json", threshold=1e9, **kw)
    assert all(layer == ["full_attn", "output_share", "output_share"] for layer in loose["layers"])
    out = pipe(prompt="a red circle", num_inference_steps=3, height=32, width=32, output_type="np", progress=False,
               accel=f"fastattn(plan={tmp_path / 'l.json'})")
    assert out.stats["attention_flops_ratio"] == pytest.approx(1 / 3)


def test_pixart_calibration_runs_and_plan_loads(tmp_path):
    from tiny_pixart import tiny_pixart_pipeline

    _, folder = tiny_pixart_pipeline(tmp_path)
    pipe = load(folder)
    kw = dict(steps=3, window=2, n_calib=1, progress=False, height=16, width=16)
    loose = calibrate(pipe, tmp_path / "p.json", threshold=1e9, **kw)
    assert all(layer == ["full_attn", "output_share", "output_share"] for layer in loose["layers"])
    out = pipe(prompt="a red circle", num_inference_steps=3, height=16, width=16, output_type="np", progress=False,
               use_resolution_binning=False, accel=f"fastattn(plan={tmp_path / 'p.json'})")
    assert out.stats["attention_flops_ratio"] < 1.0
