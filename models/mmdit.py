"""MMDiT (Stable Diffusion 3 / 3.5): two token streams, one joint attention.

Image tokens and text tokens keep their own weights (qkv, output projection, MLP, adaLN)
and meet in one attention over the concatenation [image; text]. SD3.5 adds per-head RMS
qk-norm (large, large-turbo, medium) and, on 3.5-medium's first 13 blocks, a second
image-only self-attention ("MMDiT-X"). The last block's text side is "pre-only": it only
provides keys and values. Parameter names follow Stability's reference (`mmditx.py`), with
`joint_blocks` exposed as `blocks`; the diffusers layout is mapped in `keymap`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from dite.models.attention import NO_STATE, AttentionState, attend, load_state, save_state
from dite.engine.errors import CheckpointError, ConfigError, InputError
from dite.models.config_fields import check_fields, check_instance
from dite.models.checkpoint import KeyMap, Source, concat, count_indexed, take, transformed
from dite.models.denoiser import Conditioning, Denoiser, Hidden
from dite.models.layers import (
    FinalLayer,
    Mlp,
    PatchEmbed,
    RMSNorm,
    TimestepEmbedder,
    merge_heads,
    modulate,
    project_qkv,
    split_heads,
    unpatchify,
)
from dite.models.plan import FULL_ATTENTION, AttentionPolicy, BlockPlan


# The config.json fields from_diffusers reads, by kind (models/config_fields.py).
DIFFUSERS_FIELDS = {
    "num_attention_heads": "size", "attention_head_dim": "size", "caption_projection_dim": "size",
    "num_layers": "size", "patch_size": "size", "in_channels": "size", "out_channels": "size",
    "pos_embed_max_size": "size", "joint_attention_dim": "size", "pooled_projection_dim": "size",
    "sample_size": "size", "qk_norm": "str", "dual_attention_layers": "counts",
}


@dataclass(frozen=True)
class MMDiTConfig:
    depth: int = 24
    num_heads: int = 24
    head_dim: int = 64
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    pos_embed_max_size: int = 192
    context_dim: int = 4096  # width of the text states fed in (T5 width)
    pooled_dim: int = 2048  # CLIP-L + bigG pooled
    sample_size: int = 128  # default latent side (1024 px)
    qk_norm: bool = False
    dual_attention_layers: tuple[int, ...] = ()

    def __post_init__(self):
        check_instance(self, "MMDiT config")
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.depth]
        if bad:
            raise ConfigError(f"dual_attention_layers {bad} are outside the {self.depth} blocks")

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    @classmethod
    def from_diffusers(cls, config: dict) -> "MMDiTConfig":
        """From a diffusers SD3Transformer2DModel config.json."""
        check_fields(config, "SD3 transformer config", DIFFUSERS_FIELDS)
        heads, head_dim = config.get("num_attention_heads", 18), config.get("attention_head_dim", 64)
        caption = config.get("caption_projection_dim", 1152)
        if caption != heads * head_dim:
            raise ConfigError(f"caption_projection_dim {caption} must equal the hidden size {heads * head_dim}")
        qk_norm = config.get("qk_norm")
        if qk_norm not in (None, "rms_norm"):
            raise ConfigError(f"qk_norm {qk_norm!r} is not supported (SD3.5 uses 'rms_norm')")
        return cls(
            depth=config.get("num_layers", 18), num_heads=heads, head_dim=head_dim,
            patch_size=config.get("patch_size", 2), in_channels=config.get("in_channels", 16),
            out_channels=config.get("out_channels") or config.get("in_channels", 16),
            pos_embed_max_size=config.get("pos_embed_max_size", 96),
            context_dim=config.get("joint_attention_dim", 4096),
            pooled_dim=config.get("pooled_projection_dim", 2048),
            sample_size=config.get("sample_size", 128), qk_norm=qk_norm == "rms_norm",
            dual_attention_layers=tuple(config.get("dual_attention_layers") or ()),
        )

    def to_diffusers(self) -> dict:
        """The diffusers SD3Transformer2DModel config.json of this config (inverse of from_diffusers)."""
        return {
            "_class_name": "SD3Transformer2DModel", "sample_size": self.sample_size, "patch_size": self.patch_size,
            "in_channels": self.in_channels, "out_channels": self.out_channels, "num_layers": self.depth,
            "attention_head_dim": self.head_dim, "num_attention_heads": self.num_heads,
            "joint_attention_dim": self.context_dim, "caption_projection_dim": self.hidden_size,
            "pooled_projection_dim": self.pooled_dim, "pos_embed_max_size": self.pos_embed_max_size,
            "dual_attention_layers": list(self.dual_attention_layers),
            "qk_norm": "rms_norm" if self.qk_norm else None,
        }

    def to_dict(self) -> dict:
        return asdict(self)


class StreamAttention(nn.Module):
    """One stream's share of an attention: fused qkv, optional qk-norm, output projection."""

    def __init__(self, dim: int, heads: int, qk_norm: bool, has_proj: bool = True):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        if qk_norm:
            self.ln_q = RMSNorm(dim // heads, eps=1e-6)
            self.ln_k = RMSNorm(dim // heads, eps=1e-6)
        self.proj = nn.Linear(dim, dim) if has_proj else None

    def qkv_heads(self, x: torch.Tensor, policy: AttentionPolicy = FULL_ATTENTION,
                  grid: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # qk-norm is per token, so it commutes with ToDo's downsampling of the K/V source.
        q, k, v = (split_heads(t, self.heads) for t in project_qkv(self.qkv, x, policy, grid))
        if hasattr(self, "ln_q"):
            q, k = self.ln_q(q), self.ln_k(k)
        return q, k, v

    def self_attention(self, x: torch.Tensor, policy: AttentionPolicy, grid: tuple[int, int]) -> torch.Tensor:
        """MMDiT-X's image-only attention (full or ToDo: no per-layer state)."""
        out, _ = attend(lambda rows: self.qkv_heads(x[rows], policy, grid), policy, rows=x.shape[0],
                        project=lambda o: self.proj(merge_heads(o)))
        return out


class StreamBlock(nn.Module):
    """The per-stream half of a joint block: adaLN, attention weights, MLP."""

    def __init__(self, cfg: MMDiTConfig, pre_only: bool = False, dual: bool = False):
        super().__init__()
        dim = cfg.hidden_size
        self.pre_only, self.dual = pre_only, dual
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = StreamAttention(dim, cfg.num_heads, cfg.qk_norm, has_proj=not pre_only)
        if dual:
            self.attn2 = StreamAttention(dim, cfg.num_heads, cfg.qk_norm)
        if not pre_only:
            self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.mlp = Mlp(dim, 4 * dim, activation="gelu_tanh")
        chunks = 2 if pre_only else (9 if dual else 6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, chunks * dim))

    def modulation(self, x: torch.Tensor, c: torch.Tensor):
        """(adaLN chunks, the normalised x) for this stream."""
        mods = self.adaLN_modulation(c).chunk(2 if self.pre_only else (9 if self.dual else 6), dim=1)
        return mods, self.norm1(x)

    def qkv(self, normed: torch.Tensor, mods, policy: AttentionPolicy = FULL_ATTENTION,
            grid: tuple[int, int] | None = None):
        """q, k, v heads of this stream; `policy` and `grid` only for the image stream (ToDo
        shrinks image keys/values, never text)."""
        return self.attn.qkv_heads(modulate(normed, mods[0], mods[1]), policy, grid)

    def post_attention(self, x, projected, mods, normed, policy: AttentionPolicy, grid) -> torch.Tensor:
        """Gate and add the projected attention output, then (MMDiT-X) the image-only
        attention and the MLP. The second attention takes only ToDo's part of the policy:
        DiTFastAttn's kernels apply to the joint attention."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        x = x + gate_msa.unsqueeze(1) * projected
        if self.dual:
            shift2, scale2, gate2 = mods[6:9]
            kv_only = AttentionPolicy(kv_factor=policy.kv_factor, kv_mode=policy.kv_mode, backend=policy.backend)
            x = x + gate2.unsqueeze(1) * self.attn2.self_attention(modulate(normed, shift2, scale2), kv_only, grid)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class JointBlock(nn.Module):
    """Both streams' halves and the one joint attention over [image; text].

    DiTFastAttn on a joint attention (our choice; the reference has no MMDiT version): the
    window applies to image queries, which see the image keys within +-w raster positions
    and every text key; text queries keep full attention. The stored residual is the
    image rows' full - window. Output sharing stores and reuses both streams' projected
    outputs; CFG sharing runs both streams' conditional rows and copies them.
    """

    def __init__(self, cfg: MMDiTConfig, index: int):
        super().__init__()
        self.index = index  # the key of this block's entries in a call's attention cache
        self.x_block = StreamBlock(cfg, dual=index in cfg.dual_attention_layers)
        self.context_block = StreamBlock(cfg, pre_only=index == cfg.depth - 1)

    def joint_attention(self, x_normed, x_mods, c_normed, c_mods, policy: AttentionPolicy, grid,
                        state: AttentionState = NO_STATE):
        """((image, text or None) projected attention outputs, stored state) under `policy`:
        the image tokens' q, k, v, then the text tokens' (never downsampled), one attention."""
        n = x_normed.shape[1]
        pre_only = self.context_block.pre_only

        def image_qkv(rows):
            return self.x_block.qkv(x_normed[rows], [m[rows] for m in x_mods], policy, grid)

        def text_qkv(rows):
            return self.context_block.qkv(c_normed[rows], [m[rows] for m in c_mods])

        def project(out):
            # Image tokens first, as diffusers orders them (the reference puts text first; with
            # no mask or position term inside attention only the split offset depends on it).
            out = merge_heads(out)
            return self.x_block.attn.proj(out[:, :n]), None if pre_only else self.context_block.attn.proj(out[:, n:])

        return attend(image_qkv, policy, state, rows=x_normed.shape[0], project=project, text=text_qkv)

    def forward(self, hidden: Hidden, plan: BlockPlan) -> Hidden:
        x, ctx, c = hidden.image, hidden.text, hidden.c
        x_mods, x_normed = self.x_block.modulation(x, c)
        c_mods, c_normed = self.context_block.modulation(ctx, c)
        policy = plan.attention
        state = load_state(hidden.attn_cache, self.index, policy, x.shape[0])
        (image, text), state = self.joint_attention(x_normed, x_mods, c_normed, c_mods, policy, hidden.grid, state)
        save_state(hidden.attn_cache, self.index, state)
        x = self.x_block.post_attention(x, image, x_mods, x_normed, policy, hidden.grid)
        if not self.context_block.pre_only:
            ctx = self.context_block.post_attention(ctx, text, c_mods, c_normed, FULL_ATTENTION, None)
        # A pre-only text side has nothing left to update; the stream passes through.
        return replace(hidden, image=x, text=ctx)


class VectorEmbedder(nn.Module):
    """Pooled text vector -> [B, D] (two-layer SiLU MLP)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.mlp(y)



class MMDiT(Denoiser):
    family = "sd3"
    streams = ("image", "text")  # both change from block to block; a cached range holds both deltas

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        self.config = cfg
        dim = cfg.hidden_size
        self.x_embedder = PatchEmbed(cfg.in_channels, dim, cfg.patch_size)
        self.register_buffer("pos_embed", torch.zeros(1, cfg.pos_embed_max_size ** 2, dim))
        self.t_embedder = TimestepEmbedder(dim)
        self.y_embedder = VectorEmbedder(cfg.pooled_dim, dim)
        self.context_embedder = nn.Linear(cfg.context_dim, dim)
        self.blocks = nn.ModuleList(JointBlock(cfg, i) for i in range(cfg.depth))
        self.final_layer = FinalLayer(cfg.hidden_size, cfg.patch_size, cfg.out_channels)

    def cropped_pos_embed(self, grid: tuple[int, int]) -> torch.Tensor:
        """The centred h x w window of the stored max_size x max_size table (not interpolated)."""
        h, w = grid
        m = self.config.pos_embed_max_size
        if h > m or w > m:
            limit = m * self.config.patch_size
            raise InputError(f"latent of {h * self.config.patch_size}x{w * self.config.patch_size} exceeds the "
                             f"model's position table ({limit}x{limit} latent pixels)")
        top, left = (m - h) // 2, (m - w) // 2
        table = self.pos_embed.reshape(m, m, -1)[top: top + h, left: left + w]
        return table.reshape(1, h * w, -1)

    def prepare(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> Hidden:
        tokens, grid = self.x_embedder(x)
        tokens = (tokens + self.cropped_pos_embed(grid)).to(tokens.dtype).contiguous()
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t
        c = self.t_embedder(t) + self.y_embedder(cond.pooled)
        return Hidden(image=tokens, text=self.context_embedder(cond.context), c=c, grid=grid)

    def finalize(self, hidden: Hidden) -> torch.Tensor:
        out = self.final_layer(hidden.image, hidden.c)
        return unpatchify(out, hidden.grid, self.config.patch_size, self.config.out_channels)


# ---------------------------------------------------------------- checkpoints

ORIGINAL_ANCHOR = "joint_blocks.0.context_block.attn.qkv.weight"
DIFFUSERS_ANCHORS = ("transformer_blocks.0.attn.add_q_proj.weight", "pos_embed.pos_embed")


def detect_layout(keys) -> str | None:
    keys = set(keys)
    if ORIGINAL_ANCHOR in keys:
        return "original"
    if all(k in keys for k in DIFFUSERS_ANCHORS):
        return "diffusers"
    return None


def detect_config(shapes: dict[str, tuple[int, ...]], num_heads: int | None = None) -> MMDiTConfig:
    """Infer the config of an original-layout MMDiT state dict (prefix already stripped).

    Heads are not in the shapes; every SD3 release uses 64-wide heads (the reference hard-
    wires it), so heads = width / 64 unless `num_heads` says otherwise.
    """
    if detect_layout(shapes) != "original":
        raise CheckpointError("not an original-layout MMDiT state dict (no joint_blocks.0.context_block.attn.qkv)")
    dim, in_channels, patch, _ = shapes["x_embedder.proj.weight"]
    depth = count_indexed(shapes, "joint_blocks.")
    if num_heads is None:
        if dim % 64:
            raise ConfigError(f"MMDiT hidden size {dim} is not a multiple of SD3's 64-wide heads; pass "
                              "model_config={'num_heads': N}")
        num_heads = dim // 64
    if dim % num_heads:
        raise ConfigError(f"MMDiT hidden size {dim} is not divisible by {num_heads} heads")
    return MMDiTConfig(
        depth=depth, num_heads=num_heads, head_dim=dim // num_heads, patch_size=patch, in_channels=in_channels,
        out_channels=shapes["final_layer.linear.weight"][0] // (patch * patch),
        pos_embed_max_size=math.isqrt(shapes["pos_embed"][1]),
        context_dim=shapes["context_embedder.weight"][1], pooled_dim=shapes["y_embedder.mlp.0.weight"][1],
        qk_norm="joint_blocks.0.context_block.attn.ln_q.weight" in shapes,
        dual_attention_layers=tuple(i for i in range(depth) if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in shapes),
    )


def swap_halves(key: str) -> Source:
    """diffusers' AdaLayerNormContinuous emits (scale, shift); the reference (shift, scale)."""
    def swap(t: torch.Tensor) -> torch.Tensor:
        return torch.cat(t.chunk(2, dim=0)[::-1])

    return transformed(key, swap, swap, "swap halves")


def keymap(cfg: MMDiTConfig, layout: str, prefix: str = "") -> tuple[KeyMap, set[str]]:
    """(our name -> source, checkpoint keys to ignore). Original keys may sit under `prefix`
    (`model.diffusion_model.` in SD3 single files)."""
    names = list(param_names(cfg))
    if layout == "original":
        renamed = {n: take(prefix + n.replace("blocks.", "joint_blocks.", 1) if n.startswith("blocks.") else prefix + n)
                   for n in names}
        return renamed, set()
    if layout != "diffusers":
        raise ValueError(f"unknown MMDiT layout {layout!r}")
    m: KeyMap = {"pos_embed": take(prefix + "pos_embed.pos_embed")}
    for p in ("weight", "bias"):
        m[f"x_embedder.proj.{p}"] = take(prefix + f"pos_embed.proj.{p}")
        m[f"t_embedder.mlp.0.{p}"] = take(prefix + f"time_text_embed.timestep_embedder.linear_1.{p}")
        m[f"t_embedder.mlp.2.{p}"] = take(prefix + f"time_text_embed.timestep_embedder.linear_2.{p}")
        m[f"y_embedder.mlp.0.{p}"] = take(prefix + f"time_text_embed.text_embedder.linear_1.{p}")
        m[f"y_embedder.mlp.2.{p}"] = take(prefix + f"time_text_embed.text_embedder.linear_2.{p}")
        m[f"context_embedder.{p}"] = take(prefix + f"context_embedder.{p}")
        m[f"final_layer.linear.{p}"] = take(prefix + f"proj_out.{p}")
        m[f"final_layer.adaLN_modulation.1.{p}"] = swap_halves(prefix + f"norm_out.linear.{p}")
    for i in range(cfg.depth):
        d, o = f"{prefix}transformer_blocks.{i}.", f"blocks.{i}."
        last = i == cfg.depth - 1
        for p in ("weight", "bias"):
            m[o + f"x_block.attn.qkv.{p}"] = concat(d + f"attn.to_{x}.{p}" for x in "qkv")
            m[o + f"x_block.attn.proj.{p}"] = take(d + f"attn.to_out.0.{p}")
            m[o + f"context_block.attn.qkv.{p}"] = concat(d + f"attn.add_{x}_proj.{p}" for x in "qkv")
            m[o + f"x_block.adaLN_modulation.1.{p}"] = take(d + f"norm1.linear.{p}")
            m[o + f"x_block.mlp.fc1.{p}"] = take(d + f"ff.net.0.proj.{p}")
            m[o + f"x_block.mlp.fc2.{p}"] = take(d + f"ff.net.2.{p}")
            if last:
                m[o + f"context_block.adaLN_modulation.1.{p}"] = swap_halves(d + f"norm1_context.linear.{p}")
            else:
                m[o + f"context_block.adaLN_modulation.1.{p}"] = take(d + f"norm1_context.linear.{p}")
                m[o + f"context_block.attn.proj.{p}"] = take(d + f"attn.to_add_out.{p}")
                m[o + f"context_block.mlp.fc1.{p}"] = take(d + f"ff_context.net.0.proj.{p}")
                m[o + f"context_block.mlp.fc2.{p}"] = take(d + f"ff_context.net.2.{p}")
            if i in cfg.dual_attention_layers:
                m[o + f"x_block.attn2.qkv.{p}"] = concat(d + f"attn2.to_{x}.{p}" for x in "qkv")
                m[o + f"x_block.attn2.proj.{p}"] = take(d + f"attn2.to_out.0.{p}")
        if cfg.qk_norm:
            for ours, theirs in (("ln_q", "norm_q"), ("ln_k", "norm_k")):
                m[o + f"x_block.attn.{ours}.weight"] = take(d + f"attn.{theirs}.weight")
                m[o + f"context_block.attn.{ours}.weight"] = take(d + f"attn.{theirs.replace('norm_', 'norm_added_')}.weight")
                if i in cfg.dual_attention_layers:
                    m[o + f"x_block.attn2.{ours}.weight"] = take(d + f"attn2.{theirs}.weight")
    missing = set(names) - set(m)
    if missing:  # a programming error in this map, not a user error
        raise AssertionError(f"MMDiT diffusers key map misses {sorted(missing)[:5]}")
    return m, set()


def param_names(cfg: MMDiTConfig):
    with torch.device("meta"):
        return MMDiT(cfg).state_dict().keys()
