"""The kernels behind `attention()`: PyTorch SDPA, an explicit math reference, and Ascend's
fused attention. All take [batch, heads, tokens, head_dim] q, k, v, a boolean mask where
True means "attend" (or None), an additive float bias (or None) and the q·k scale, and
return [batch, heads, q_tokens, head_dim]; they agree wherever they can run.

A leaf module (imports only torch): models reach it through models/attention.py. torch_npu
is looked up only when the "npu" kernel runs, never at import.
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F

def _scale(q: torch.Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale


def sdpa(q, k, v, mask, bias, scale):
    if bias is not None:
        # SDPA takes one mask: fold the boolean mask into the bias with the dtype's most
        # negative value (as transformers does), so padded keys get no weight.
        bias = bias.to(q.dtype)
        mask = bias if mask is None else torch.where(mask, bias, torch.finfo(q.dtype).min)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def math_reference(q, k, v, mask, bias, scale):
    """softmax(q·kᵀ·scale + bias, masked keys at -inf)·v, in the inputs' dtype, spelt out:
    the reference the fused kernels are checked against."""
    scores = torch.matmul(q, k.transpose(-2, -1)) * _scale(q, scale)
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def npu_fusion(q, k, v, mask, bias, scale):
    """torch_npu.npu_fusion_attention in layout BNSD (our [B, heads, S, d]). Its mask is
    inverted against ours (True = masked out there) and must cover [B, 1, Sq, Skv]; its
    `scale` has no default of 1/sqrt(d), so it is always passed."""
    torch_npu = sys.modules.get("torch_npu")
    if torch_npu is None:
        raise RuntimeError("attention backend 'npu' needs torch_npu imported (load(..., device='npu') does it)")
    if bias is not None:
        # The fused op's `pse` is a positional-encoding input with its own layout rules;
        # nothing in dite's denoisers needs a bias (only T5 does), so it stays on SDPA.
        return sdpa(q, k, v, mask, bias, scale)
    atten_mask = None
    if mask is not None:
        b, _, sq, _ = q.shape
        atten_mask = torch.logical_not(mask.expand(mask.shape[0] if mask.shape[0] == b else b, 1, sq, k.shape[2]))
    return torch_npu.npu_fusion_attention(q, k, v, q.shape[1], "BNSD", atten_mask=atten_mask,
                                          scale=_scale(q, scale))[0]


KERNELS = {"sdpa": sdpa, "math": math_reference, "npu": npu_fusion}
