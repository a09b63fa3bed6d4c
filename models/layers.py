"""Layers shared by the three denoiser families (SD3 MMDiT, PixArt, DiT).

Parameter names follow the original releases (facebookresearch/DiT, PixArt, SD3's mmdit):
`x_embedder.proj`, `t_embedder.mlp.{0,2}`, `attn.qkv`, `attn.proj`, `mlp.fc1/fc2`, so
that an original checkpoint maps onto these modules one to one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# cond_half lives with attend() in models/attention.py and is re-exported here.
from dite.models.attention import NO_STATE, AttentionState, attend, cond_half, load_state, save_state  # noqa: F401
from dite.models.attention import sequence_parallel
from dite.models.plan import FULL_ATTENTION, AttentionPolicy


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation: x * (1 + scale) + shift, with [B, D] shift/scale over [B, N, D] x."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_sinusoid(
    t: torch.Tensor, dim: int = 256, *, max_period: float = 10000.0, freq_shift: float = 0.0
) -> torch.Tensor:
    """Sinusoidal timestep features laid out [cos | sin], in float32.

    Frequencies are exp(-ln(max_period) * i / (dim/2 - freq_shift)). The original DiT,
    PixArt and SD3 use freq_shift 0; diffusers' DiT embedder uses 1 (divisor 127 for 256
    channels), which a model loaded from a diffusers folder must reproduce.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    args = t.reshape(-1, 1).float() * freqs.unsqueeze(0)
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


def sincos_pos_embed_2d(
    dim: int,
    grid_h: int,
    grid_w: int,
    *,
    base_size: int | None = None,
    interpolation_scale: float = 1.0,
) -> torch.Tensor:
    """Fixed 2-D sin-cos position embeddings, [grid_h * grid_w, dim], float32.

    Tokens are in row-major order. The first half of the channels encodes the column
    coordinate, the second half the row, each as [sin | cos] (the MAE / DiT layout).
    Coordinates are arange(n) / (n / base_size) / interpolation_scale, computed in float32
    as the references do; the sinusoid itself is computed in float64.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos position embeddings need dim divisible by 4, got {dim}")

    def coords(n: int) -> torch.Tensor:
        grid = torch.arange(n, dtype=torch.float32)
        if base_size is not None:
            grid = grid / (n / base_size)
        return grid / interpolation_scale

    rows, cols = torch.meshgrid(coords(grid_h), coords(grid_w), indexing="ij")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)

    def embed(pos: torch.Tensor) -> torch.Tensor:
        out = torch.outer(pos.reshape(-1).double(), omega)
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    return torch.cat([embed(cols), embed(rows)], dim=1).float()


class PatchEmbed(nn.Module):
    """Latent [B, C, H, W] -> tokens [B, (H/p)(W/p), D] by a strided convolution."""

    def __init__(self, in_channels: int, dim: int, patch_size: int, bias: bool = True):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(x)
        grid = (x.shape[-2], x.shape[-1])
        return x.flatten(2).transpose(1, 2), grid


def unpatchify(x: torch.Tensor, grid: tuple[int, int], patch_size: int, channels: int) -> torch.Tensor:
    """Tokens [B, h*w, p*p*C] (per-token layout p, q, c) -> image [B, C, h*p, w*p]."""
    h, w = grid
    p = patch_size
    x = x.reshape(x.shape[0], h, w, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(x.shape[0], channels, h * p, w * p)


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> [B, D]: sinusoid features then a two-layer SiLU MLP."""

    def __init__(self, dim: int, frequency_dim: int = 256, freq_shift: float = 0.0):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.freq_shift = freq_shift
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = timestep_sinusoid(t, self.frequency_dim, freq_shift=self.freq_shift)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class Embedding(nn.Embedding):
    """nn.Embedding whose meta weight is left uninitialised. Key maps and loaders build models
    under torch.device("meta"); there nn.Embedding's normal_ init runs through a decomposition
    that imports torch._dynamo (seconds on a small CPU) for values that are never read. On a
    real device it initialises as nn.Embedding does."""

    def reset_parameters(self) -> None:
        if self.weight.device.type != "meta":
            super().reset_parameters()


class LabelEmbedder(nn.Module):
    """Class labels -> [B, D]. The table has num_classes + 1 rows: the last is the null class."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = Embedding(num_classes + 1, dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


class Mlp(nn.Module):
    """fc1 -> activation -> fc2 (timm's Mlp names)."""

    def __init__(self, dim: int, hidden_dim: int, activation: str = "gelu_tanh"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        if activation == "gelu_tanh":
            self.act = nn.GELU(approximate="tanh")
        elif activation == "gelu":
            self.act = nn.GELU()
        elif activation == "silu":
            self.act = nn.SiLU()
        else:
            raise ValueError(f"unknown MLP activation {activation!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N, H*d] -> [B, H, N, d]."""
    b, n, _ = x.shape
    return x.reshape(b, n, heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, N, d] -> [B, N, H*d]."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def downsample_tokens(x: torch.Tensor, grid: tuple[int, int], factor: float, mode: str = "bilinear") -> torch.Tensor:
    """[B, h*w, D] tokens in raster order -> [B, h'*w', D] on the grid resized by 1/factor per
    side (h' = int(h / factor), at least 1), as ToDo shrinks the keys' and values' source."""
    h, w = grid
    b, n, d = x.shape
    if n != h * w:
        raise ValueError(f"{n} tokens do not form the {h}x{w} grid")
    size = (max(1, int(h / factor)), max(1, int(w / factor)))
    image = x.transpose(1, 2).reshape(b, d, h, w)
    extra = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    small = F.interpolate(image, size=size, mode=mode, **extra)
    return small.flatten(2).transpose(1, 2)


def project_qkv(qkv: nn.Linear, x: torch.Tensor, policy: AttentionPolicy, grid: tuple[int, int] | None):
    """q, k, v (each [B, N, D]) of image tokens from a fused projection. Under a ToDo policy
    the keys and values come from the downsampled grid: projecting fewer tokens is where
    the saving starts, so the fused weight is split instead of projecting everything."""
    if not policy.downsamples_kv:
        return qkv(x).chunk(3, dim=-1)
    if grid is None:
        raise ValueError("K/V downsampling needs the image token grid")
    dim = x.shape[-1]
    weight, bias = qkv.weight, qkv.bias
    q = F.linear(x, weight[:dim], None if bias is None else bias[:dim])
    source, source_grid = x, grid
    hook = sequence_parallel()
    if hook is not None:
        # Ulysses: downsample the whole grid, not this rank's rows (exact for any factor and
        # mode; a shard's own interpolation would differ at its edges for bilinear 1.6).
        source, source_grid = hook.gather_tokens(x, grid)
    kv = F.linear(downsample_tokens(source, source_grid, policy.kv_factor, policy.kv_mode), weight[dim:],
                  None if bias is None else bias[dim:])
    k, v = kv.chunk(2, dim=-1)
    return q, k, v


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection, under any attention policy of
    a step plan through `attend` (full, ToDo's downsampled K/V, DiTFastAttn's WA-RS, AST and
    ASC). `forward` takes the store of the layer's state (the block's `Hidden.attn_cache`)
    and key, loads what the policy reads and saves what it stores; `attend` is the pure part.
    """

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden size {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, policy: AttentionPolicy = FULL_ATTENTION,
                grid: tuple[int, int] | None = None, cache=None, layer=None) -> torch.Tensor:
        state = load_state(cache, layer, policy, x.shape[0])
        out, state = self.attend(x, policy, grid, state)
        save_state(cache, layer, state)
        return out

    def attend(self, x: torch.Tensor, policy: AttentionPolicy = FULL_ATTENTION, grid: tuple[int, int] | None = None,
               state: AttentionState = NO_STATE) -> tuple[torch.Tensor, AttentionState]:
        """(output, stored state): q, k, v = qkv(x) split into heads, attention, proj."""
        def qkv(rows):
            return tuple(split_heads(t, self.heads) for t in project_qkv(self.qkv, x[rows], policy, grid))

        return attend(qkv, policy, state, rows=x.shape[0], project=lambda out: self.proj(merge_heads(out)))


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale (SD3.5's per-head qk-norm, T5's norm).

    The mean square is taken in float32 whatever the input dtype; in half precision the
    normalised value is cast to the weight's dtype before the scale, as the references do.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return x * self.weight


class FinalLayer(nn.Module):
    """adaLN (shift, scale) on a parameter-free LayerNorm, then the per-token projection to
    patch x patch x channels (DiT's and SD3's reference layout; diffusers' SD3 port stores the
    two halves the other way round, which its key map swaps)."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))
