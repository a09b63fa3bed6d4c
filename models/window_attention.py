"""Band ("sliding window") attention: query n sees keys m with |n - m| <= w, plus optional
global keys every query sees (SD3's text tokens beside the image band).

DiTFastAttn's window is 1-D in raster token order (flash-attn local attention with
window_size=(w, w)), so a band of +-w tokens, not a 2-D square. No N x N mask is built:
queries are cut into chunks of C, each chunk attends to the C + 2w keys around it (keys
padded by w at both ends, padding masked), so cost and memory grow with N * (C + 2w).

It is a torch custom op so that FLOP counting (on the meta device) books the band's real
cost — exactly the in-band (query, key) pairs, edges included — rather than the chunked
kernel's work, and so graph compilers see one opaque call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula


def _chunk(n: int, w: int) -> int:
    # A chunk of at least w keeps the padding overhead <= 3x the band; 128 keeps the number
    # of chunks (and Python-free batched work) reasonable for small windows.
    return min(n, max(w, 128))


def band_pairs(n: int, w: int) -> int:
    """Number of (query, key) pairs with |n - m| <= w inside [0, n)."""
    w = min(w, n - 1)
    return n * (2 * w + 1) - w * (w + 1)


def _band_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: int, gk: torch.Tensor | None,
                    gv: torch.Tensor | None) -> torch.Tensor:
    b, h, n, d = q.shape
    c = _chunk(n, w)
    chunks = -(-n // c)
    pad_q = chunks * c - n
    q = F.pad(q, (0, 0, 0, pad_q)).reshape(b, h, chunks, c, d)
    # Keys/values padded so that chunk j's window is rows [j*c, j*c + c + 2w) of the padded
    # tensor: as_strided views, no copy per chunk.
    kp = F.pad(k, (0, 0, w, w + pad_q)).contiguous()
    vp = F.pad(v, (0, 0, w, w + pad_q)).contiguous()
    span = c + 2 * w
    stride = kp.stride()
    shape = (b, h, chunks, span, d)
    strides = (stride[0], stride[1], c * stride[2], stride[2], stride[3])
    kw = kp.as_strided(shape, strides)
    vw = vp.as_strided(shape, strides)
    query = torch.arange(chunks * c, device=q.device).reshape(chunks, c, 1)
    key = (torch.arange(chunks, device=q.device).reshape(chunks, 1, 1) * c
           + torch.arange(span, device=q.device).reshape(1, 1, span) - w)
    mask = ((query - key).abs() <= w) & (key >= 0) & (key < n)
    if gk is not None:
        g = gk.shape[2]
        kw = torch.cat([kw, gk.unsqueeze(2).expand(b, h, chunks, g, d)], dim=3)
        vw = torch.cat([vw, gv.unsqueeze(2).expand(b, h, chunks, g, d)], dim=3)
        mask = torch.cat([mask, mask.new_ones(chunks, c, g)], dim=2)
    out = F.scaled_dot_product_attention(q, kw, vw, attn_mask=mask)
    # Contiguous, as the fake below says: graph compilers plan later views on its strides.
    return out.reshape(b, h, chunks * c, d)[:, :, :n].contiguous()


@torch.library.custom_op("dite::window_attention", mutates_args=())
def _window_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: int, gk: torch.Tensor | None,
               gv: torch.Tensor | None) -> torch.Tensor:
    return _band_attention(q, k, v, w, gk, gv)


@_window_op.register_fake
def _(q, k, v, w, gk, gv):
    return q.new_empty(q.shape)  # contiguous like the real output, whatever q's strides


@register_flop_formula(torch.ops.dite.window_attention)
def _window_flops(q_shape, k_shape, v_shape, w, gk_shape, gv_shape, *args, out_shape=None, **kwargs) -> int:
    b, h, n, d = q_shape
    pairs = band_pairs(n, w) + (n * gk_shape[2] if gk_shape is not None else 0)
    return 2 * 2 * b * h * d * pairs  # q.k and p.v, a multiply-add each


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: int,
                     global_k: torch.Tensor | None = None, global_v: torch.Tensor | None = None) -> torch.Tensor:
    """[B, H, N, d] queries attend to keys within +-w positions (and to every global key)."""
    if w < 0:
        raise ValueError(f"window half-width must be >= 0, got {w}")
    return _window_op(q, k, v, int(w), global_k, global_v)
