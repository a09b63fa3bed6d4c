"""Attention kernels: SDPA, the explicit math reference and (through a stand-in torch_npu)
Ascend's fused attention give the same result; the kernel travels in the step plan."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from dite.models import attention_kernels as attention_backends
from dite.models.attention import attention
from dite.engine.errors import ConfigError
from dite.engine.runtime.executors import make_executor
from dite.models.plan import AttentionPolicy
from tiny_runtime import dit_cond, generate, plans_for


def qkv(b=2, h=3, n=5, m=7, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, n, d, generator=g), torch.randn(b, h, m, d, generator=g),
            torch.randn(b, h, m, d, generator=g))


def padding_mask(b=2, m=7):
    keep = torch.ones(b, 1, 1, m, dtype=torch.bool)
    keep[0, ..., 4:] = False  # row 0 has 4 real keys, as a padded T5 / PixArt caption
    return keep


@pytest.mark.parametrize("case", ["plain", "padding", "full_mask", "scale", "bias", "t5"])
def test_math_reference_equals_sdpa(case):
    q, k, v = qkv()
    kwargs = {}
    if case == "padding":
        kwargs["mask"] = padding_mask()
    if case == "full_mask":
        kwargs["mask"] = torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(1)) > 0.3
        kwargs["mask"][..., 0] = True  # every query keeps a key
    if case == "scale":
        kwargs["scale"] = 0.7
    if case in ("bias", "t5"):
        kwargs["bias"] = torch.randn(1, 3, 5, 7, generator=torch.Generator().manual_seed(2))
    if case == "t5":  # T5: relative bias, padding mask, no 1/sqrt(d) scaling
        kwargs.update(mask=padding_mask(), scale=1.0)
    sdpa = attention(q, k, v, **kwargs)
    math = attention(q, k, v, policy=AttentionPolicy(backend="math"), **kwargs)
    assert (sdpa - math).abs().max().item() <= 1e-5


def fake_torch_npu(calls):
    """A stand-in for torch_npu.npu_fusion_attention written with SDPA: BNSD layout only and
    Ascend's mask polarity (True = masked out)."""
    def npu_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None,
                             atten_mask=None, scale=1.0, keep_prob=1.0, **rest):
        calls.append({"head_num": head_num, "layout": input_layout, "scale": scale,
                      "mask": None if atten_mask is None else atten_mask.clone()})
        assert input_layout == "BNSD" and head_num == query.shape[1]
        keep = None if atten_mask is None else ~atten_mask
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=keep, scale=scale)
        return (out, None, None, None, 0, 0, 0)

    return types.SimpleNamespace(npu_fusion_attention=npu_fusion_attention)


def test_npu_fusion_attention_wrapper_passes_layout_heads_scale_and_inverted_mask(monkeypatch):
    calls = []
    monkeypatch.setitem(__import__("sys").modules, "torch_npu", fake_torch_npu(calls))
    q, k, v = qkv()
    npu = AttentionPolicy(backend="npu")
    assert torch.allclose(attention(q, k, v, policy=npu), attention(q, k, v), atol=1e-6)
    assert calls[-1]["scale"] == pytest.approx(8 ** -0.5) and calls[-1]["head_num"] == 3  # explicit 1/sqrt(d)
    keep = padding_mask()
    assert torch.allclose(attention(q, k, v, policy=npu, mask=keep), attention(q, k, v, mask=keep), atol=1e-6)
    sent = calls[-1]["mask"]
    assert sent.shape == (2, 1, 5, 7) and torch.equal(sent, ~keep.expand(2, 1, 5, 7))
    assert torch.allclose(attention(q, k, v, policy=npu, scale=1.0), attention(q, k, v, scale=1.0), atol=1e-6)


def test_npu_kernel_without_torch_npu_is_clear():
    q, k, v = qkv()
    with pytest.raises(RuntimeError, match="needs torch_npu"):
        attention(q, k, v, policy=AttentionPolicy(backend="npu"))


def test_executor_writes_the_kernel_into_every_block(dit, monkeypatch):
    used = []
    math = attention_backends.KERNELS["math"]
    monkeypatch.setitem(attention_backends.KERNELS, "math", lambda *a: used.append(1) or math(*a))
    plans = plans_for("ditcache+promptgate", dit, 6)
    sdpa, _ = generate(dit, dit_cond(), plans, 6, latent=(4, 8, 8), scheduler="ddim")
    out, state = generate(dit, dit_cond(), plans, 6, executor=make_executor("eager", attention="math"),
                          latent=(4, 8, 8), scheduler="ddim")
    # Per call the kernels agree to ~1e-6 (above); six guided steps (x5) accumulate that.
    assert (out - sdpa).abs().max().item() <= 1e-4
    computed = sum(len(p.computed_blocks(len(dit.blocks))) for p in plans)
    assert len(used) == computed and state.executor["attention"] == "math"
    with pytest.raises(ConfigError, match="unknown attention backend"):
        make_executor("eager", attention="flash")
    with pytest.raises(ConfigError, match="attention backend"):
        AttentionPolicy(backend="flash")
