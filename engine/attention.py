"""Attention dispatch: the one function every model calls for attention.

A leaf module (imports only torch) so models can use it without depending on the rest of
the engine. Models hand over q, k, v already split into heads and an attention policy from
the step plan; the backend is chosen here, per device. Today the backend is PyTorch SDPA
(CPU and CUDA); the Ascend fused op and the windowed kernels plug in here later.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dite.models.plan import AttentionPolicy, FULL_ATTENTION


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    policy: AttentionPolicy = FULL_ATTENTION,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention on [batch, heads, tokens, head_dim] tensors.

    `mask` is a boolean [batch, 1 or heads, q_tokens or 1, kv_tokens] tensor where True
    means "attend", or None. `bias` is a float tensor broadcastable to the scores and added
    to them before the softmax (T5's relative position bias). `scale` multiplies q·k
    (default 1/sqrt(head_dim); T5 uses 1). Returns [batch, heads, q_tokens, head_dim].
    """
    if policy.kind != "full":
        raise ValueError(f"attention() computes full attention; policy {policy.kind!r} is run by the attention "
                         "module (window attention in engine/window_attention.py, sharing from the cache)")
    if bias is not None:
        # SDPA takes one mask: fold the boolean mask into the bias with the dtype's most
        # negative value (as transformers does), so padded keys get no weight.
        bias = bias.to(q.dtype)
        mask = bias if mask is None else torch.where(mask, bias, torch.finfo(q.dtype).min)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
