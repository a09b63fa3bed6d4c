"""Attention dispatch: the one function every model calls for attention.

A leaf module (imports only torch and the kernels) so models can use it without depending
on the rest of the engine. Models hand over q, k, v already split into heads and an
attention policy from the step plan. The kernel is the policy's `backend` (SDPA by
default; "math" and Ascend's "npu" in engine/attention_backends.py): executors write the
backend a pipeline was loaded with into every block's policy, so the choice travels with
the plan into compiled frames instead of living in process-wide state. Attention outside
the denoiser's blocks (text encoders, VAE) passes no policy and runs SDPA.
"""

from __future__ import annotations

import torch

from dite.models.attention_kernels import KERNELS
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
    return KERNELS[policy.backend](q, k, v, mask, bias, scale)
