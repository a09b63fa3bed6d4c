"""PixArt-α and PixArt-Σ: a DiT whose blocks add cross-attention to T5 caption tokens.

adaLN-single: one timestep MLP (`t_embedder`) and one shared projection (`t_block`) give six
modulation vectors for the whole network; each block adds its own learned
`scale_shift_table` to them. A block is modulated self-attention (gated), cross-attention
to the projected caption with the T5 padding mask (no norm, no gate), and a modulated MLP
(gated). The final layer modulates with the timestep embedding itself, not `t_block`'s.
PixArt-α-1024 adds micro-conditions: the image height, width and aspect ratio, each embedded
like a timestep, are added to the timestep embedding.

Parameter names follow the original release (PixArt-alpha `PixArt.py` / `PixArtMS.py`), so
an original `.pth` maps one to one; `keymap` maps the diffusers layout
(PixArtTransformer2DModel) onto them. α and Σ share the architecture: the PixArt version decides
the T5 length (120 / 300), the position-embedding interpolation rule and the VAE scale, and
is read from the stored null caption's length, never from which embedders exist.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from dite.models.attention import attention
from dite.engine.errors import CheckpointError, ConfigError
from dite.models.config_fields import check_fields, check_instance
from dite.models.checkpoint import KeyMap, concat, count_indexed, take
from dite.models.denoiser import Conditioning, Denoiser, Hidden
from dite.models.layers import (
    Mlp,
    PatchEmbed,
    SelfAttention,
    TimestepEmbedder,
    merge_heads,
    modulate,
    sincos_pos_embed_2d,
    split_heads,
    unpatchify,
)
from dite.models.plan import BlockPlan

VERSIONS = ("alpha", "sigma")  # PixArt-α, PixArt-Σ: `pixart_version`
# T5 tokens each version was trained with; also the rows of the original's null caption.
CAPTION_LENGTH = {"alpha": 120, "sigma": 300}
VERSION_OF_LENGTH = {length: version for version, length in CAPTION_LENGTH.items()}
# Latent scaling of the VAE each version was trained with (α: sd-vae-ft-ema, Σ: SDXL's VAE);
# the two VAEs have identical shapes, so the scale cannot come from the VAE weights.
VAE_SCALE = {"alpha": 0.18215, "sigma": 0.13025}
HEAD_DIM = 72  # every released PixArt (XL/2: 1152 = 16 x 72); heads are not in the shapes


def family_interpolation(pixart_version: str, sample_size: int) -> float:
    """The position-embedding interpolation the originals trained with (docs/checkpoints.md
    §2.3, item 4):
    α: 1 for 256 and 512 px, 2 for 1024 px; Σ: image size / 512 (0.5, 1, 2, 4)."""
    if pixart_version == "alpha":
        return 2.0 if sample_size >= 128 else 1.0
    return sample_size * 8 / 512


# The config.json fields from_diffusers reads, by kind (models/config_fields.py).
DIFFUSERS_FIELDS = {
    "num_attention_heads": "size", "attention_head_dim": "size", "num_layers": "size", "patch_size": "size",
    "in_channels": "size", "out_channels": "size", "caption_channels": "size", "sample_size": "size",
    "cross_attention_dim": "size", "interpolation_scale": "positive", "use_additional_conditions": "bool",
    "norm_type": "str", "activation_fn": "str", "norm_elementwise_affine": "bool",
}


@dataclass(frozen=True)
class PixArtConfig:
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    patch_size: int = 2
    in_channels: int = 4
    out_channels: int = 8  # learned sigma: 2 x in_channels
    caption_channels: int = 4096
    sample_size: int = 128  # latent side of the training size (128 = 1024 px)
    interpolation_scale: float = 2.0
    micro_conditions: bool = False  # α-1024's resolution / aspect-ratio embedders
    pixart_version: str = "alpha"
    mlp_ratio: float = 4.0

    def __post_init__(self):
        check_instance(self, "PixArt config")
        if self.pixart_version not in VERSIONS:
            raise ConfigError(f"PixArt version must be one of {VERSIONS}, got {self.pixart_version!r}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"PixArt hidden size {self.hidden_size} is not divisible by {self.num_heads} heads")
        if self.micro_conditions and self.hidden_size % 3:
            raise ConfigError(f"PixArt micro-conditions need a hidden size divisible by 3, got {self.hidden_size}")
        if self.out_channels not in (self.in_channels, 2 * self.in_channels):
            raise ConfigError(f"PixArt out_channels {self.out_channels} must equal in_channels {self.in_channels} "
                              "or twice it (learned sigma)")

    @property
    def learned_sigma(self) -> bool:
        return self.out_channels == 2 * self.in_channels

    @property
    def max_sequence_length(self) -> int:
        return CAPTION_LENGTH[self.pixart_version]

    @classmethod
    def from_diffusers(cls, config: dict, pixart_version: str) -> "PixArtConfig":
        """From a diffusers PixArtTransformer2DModel (or legacy Transformer2DModel) config.json.

        Missing `interpolation_scale` and `use_additional_conditions` take diffusers' own
        fallbacks (max(sample_size // 64, 1); sample_size == 128), so a folder gives what
        diffusers gives; `pixart_version` comes from the pipeline class."""
        check_fields(config, "PixArt transformer config", DIFFUSERS_FIELDS)
        if config.get("norm_type", "ada_norm_single") != "ada_norm_single":
            raise ConfigError(f"not a PixArt transformer config: norm_type is {config.get('norm_type')!r}")
        if config.get("caption_channels") is None:
            raise ConfigError("PixArt transformer config has no caption_channels (no caption projection)")
        if config.get("norm_elementwise_affine", False):
            raise ConfigError("PixArt configs with norm_elementwise_affine=true are not supported")
        if config.get("activation_fn", "gelu-approximate") != "gelu-approximate":
            raise ConfigError(f"PixArt activation {config.get('activation_fn')!r} is not supported (gelu-approximate)")
        heads = config.get("num_attention_heads", 16)
        dim = heads * config.get("attention_head_dim", 72)
        if config.get("cross_attention_dim", dim) not in (None, dim):
            raise ConfigError(f"PixArt cross_attention_dim {config.get('cross_attention_dim')} must equal the "
                              f"hidden size {dim} (the caption is projected to it)")
        sample_size = config.get("sample_size", 128)
        interpolation = config.get("interpolation_scale")
        micro = config.get("use_additional_conditions")
        in_channels = config.get("in_channels", 4)
        return cls(
            hidden_size=dim, depth=config.get("num_layers", 28), num_heads=heads,
            patch_size=config.get("patch_size", 2), in_channels=in_channels,
            out_channels=config.get("out_channels") or in_channels, caption_channels=config["caption_channels"],
            sample_size=sample_size,
            interpolation_scale=float(interpolation if interpolation is not None else max(sample_size // 64, 1)),
            micro_conditions=bool(micro if micro is not None else sample_size == 128),
            pixart_version=pixart_version,
        )

    def to_diffusers(self) -> dict:
        """The diffusers PixArtTransformer2DModel config.json (interpolation and micro-
        conditions written explicitly: diffusers' fallbacks are wrong for Σ-256 and Σ-1024)."""
        if self.mlp_ratio != 4.0:
            raise ConfigError(f"no diffusers PixArt config has mlp_ratio={self.mlp_ratio} (diffusers: 4.0)")
        return {
            "_class_name": "PixArtTransformer2DModel", "num_attention_heads": self.num_heads,
            "attention_head_dim": self.hidden_size // self.num_heads, "in_channels": self.in_channels,
            "out_channels": self.out_channels, "num_layers": self.depth, "dropout": 0.0, "norm_num_groups": 32,
            "cross_attention_dim": self.hidden_size, "attention_bias": True, "sample_size": self.sample_size,
            "patch_size": self.patch_size, "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000,
            "upcast_attention": False, "norm_type": "ada_norm_single", "norm_elementwise_affine": False,
            "norm_eps": 1e-6, "interpolation_scale": self.interpolation_scale,
            "use_additional_conditions": self.micro_conditions, "caption_channels": self.caption_channels,
        }

    def to_dict(self) -> dict:
        return asdict(self)


class CrossAttention(nn.Module):
    """Image tokens attend to the caption tokens (keys and values from one fused projection);
    padded caption tokens get no weight. Always exact: acceleration policies shrink or
    reuse self-attention only."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        q = split_heads(self.q_linear(x), self.heads)
        k, v = (split_heads(t, self.heads) for t in self.kv_linear(context).chunk(2, dim=-1))
        keep = None if mask is None else mask[:, None, None, :]
        return self.proj(merge_heads(attention(q, k, v, mask=keep)))


class PixArtBlock(nn.Module):
    def __init__(self, cfg: PixArtConfig, index: int = 0):
        super().__init__()
        self.index = index  # the key of this block's entries in a call's attention cache
        dim = cfg.hidden_size
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, cfg.num_heads, qkv_bias=True)
        self.cross_attn = CrossAttention(dim, cfg.num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio), activation="gelu_tanh")
        self.scale_shift_table = nn.Parameter(torch.zeros(6, dim))

    def forward(self, hidden: Hidden, plan: BlockPlan) -> Hidden:
        x = hidden.image
        # The first 6D columns of hidden.c are t_block's output; this block's table shifts them.
        dim = x.shape[-1]
        mods = self.scale_shift_table[None] + hidden.c[:, :6 * dim].reshape(x.shape[0], 6, dim)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods.unbind(1)
        attn = self.attn(modulate(self.norm1(x), shift_msa, scale_msa), plan.attention, hidden.grid,
                         hidden.attn_cache, self.index)
        x = x + gate_msa.unsqueeze(1) * attn
        x = x + self.cross_attn(x, hidden.text, hidden.text_mask)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return hidden.with_image(x)


class CaptionEmbedder(nn.Module):
    """T5 states [B, T, caption_channels] -> [B, T, D] (two-layer GELU-tanh MLP)."""

    def __init__(self, caption_channels: int, dim: int):
        super().__init__()
        self.y_proj = nn.Module()
        self.y_proj.fc1 = nn.Linear(caption_channels, dim)
        self.y_proj.fc2 = nn.Linear(dim, dim)

    def forward(self, caption: torch.Tensor) -> torch.Tensor:
        return self.y_proj.fc2(nn.functional.gelu(self.y_proj.fc1(caption), approximate="tanh"))


class FinalLayer(nn.Module):
    """PixArt's final layer: LayerNorm modulated by its table plus the timestep embedding."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.scale_shift_table = nn.Parameter(torch.zeros(2, dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + t[:, None]).unbind(1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class PixArt(Denoiser):
    family = "pixart"

    def __init__(self, cfg: PixArtConfig):
        super().__init__()
        self.config = cfg
        dim = cfg.hidden_size
        self.x_embedder = PatchEmbed(cfg.in_channels, dim, cfg.patch_size)
        self.t_embedder = TimestepEmbedder(dim)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        if cfg.micro_conditions:
            # Each scalar (height, width; aspect ratio) is embedded like a timestep into D/3.
            self.csize_embedder = TimestepEmbedder(dim // 3)
            self.ar_embedder = TimestepEmbedder(dim // 3)
        self.y_embedder = CaptionEmbedder(cfg.caption_channels, dim)
        self.blocks = nn.ModuleList(PixArtBlock(cfg, i) for i in range(cfg.depth))
        self.final_layer = FinalLayer(dim, cfg.patch_size, cfg.out_channels)
        self._pos_tables: dict = {}  # per (grid, device): a pure function of the config, never state

    def pos_embed(self, grid: tuple[int, int], device) -> torch.Tensor:
        """[1, h*w, D] sin-cos table for this grid: coordinates are compressed into the
        training grid (base = sample_size / patch) and divided by the interpolation scale."""
        key = (grid, device)
        if key not in self._pos_tables:
            cfg = self.config
            table = sincos_pos_embed_2d(cfg.hidden_size, grid[0], grid[1], base_size=cfg.sample_size // cfg.patch_size,
                                        interpolation_scale=cfg.interpolation_scale)
            self._pos_tables[key] = table.unsqueeze(0).to(device)
        return self._pos_tables[key]

    def embed_time(self, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The timestep embedding [B, D], with α-1024's size embeddings added."""
        c = self.t_embedder(t)
        if self.config.micro_conditions:
            # PixArt has no pooled text; its per-image vector conditioning, carried in
            # `pooled`, is [B, 3]: height and width in pixels, and height / width.
            sizes = cond.pooled
            if sizes is None:
                raise ConfigError("this PixArt model takes micro-conditions (image height, width and aspect ratio): "
                                  "the conditioning has none")
            b = t.shape[0]
            size = self.csize_embedder(sizes[:, :2].reshape(-1)).reshape(b, -1)
            ratio = self.ar_embedder(sizes[:, 2]).reshape(b, -1)
            c = c + torch.cat([size, ratio], dim=1)
        return c

    def prepare(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> Hidden:
        tokens, grid = self.x_embedder(x)
        tokens = (tokens + self.pos_embed(grid, tokens.device)).to(tokens.dtype)
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t
        t_emb = self.embed_time(t, cond)
        mask = None if cond.context_mask is None else cond.context_mask.to(device=x.device, dtype=torch.bool)
        # c carries both: t_block's output for the blocks and the raw embedding for the final layer.
        c = torch.cat([self.t_block(t_emb), t_emb], dim=1)
        return Hidden(image=tokens, c=c, grid=grid, text=self.y_embedder(cond.context.to(tokens.dtype)),
                      text_mask=mask)

    def finalize(self, hidden: Hidden) -> torch.Tensor:
        dim = self.config.hidden_size
        out = self.final_layer(hidden.image, hidden.c[:, 6 * dim:])
        return unpatchify(out, hidden.grid, self.config.patch_size, self.config.out_channels)


# ---------------------------------------------------------------- checkpoints

ORIGINAL_ANCHOR = "t_block.1.weight"
DIFFUSERS_ANCHORS = ("adaln_single.linear.weight", "caption_projection.linear_1.weight")
NULL_CAPTION_KEY = "y_embedder.y_embedding"  # the original's learned unconditional caption
# Stored by the originals but not parameters of ours: the training-size position table
# (recomputed per size) and the null caption (read by the loader for guidance).
ORIGINAL_EXTRAS = ("pos_embed", NULL_CAPTION_KEY)


def detect_layout(keys) -> str | None:
    keys = set(keys)
    if ORIGINAL_ANCHOR in keys:
        return "original"
    if all(k in keys for k in DIFFUSERS_ANCHORS):
        return "diffusers"
    return None


def version_of(shapes: dict[str, tuple[int, ...]]) -> str | None:
    """α or Σ from the null caption's rows (120 / 300), or None when the file has none."""
    if NULL_CAPTION_KEY not in shapes:
        return None
    rows = shapes[NULL_CAPTION_KEY][0]
    if rows not in VERSION_OF_LENGTH:
        raise CheckpointError(f"{NULL_CAPTION_KEY} has {rows} rows; PixArt-α stores 120, PixArt-Σ 300, so this "
                              "file's version is unknown: pass model_config={'variant': 'alpha' or 'sigma'}")
    return VERSION_OF_LENGTH[rows]


def detect_config(shapes: dict[str, tuple[int, ...]], *, num_heads: int | None = None,
                  pixart_version: str | None = None,
                  sample_size: int | None = None) -> PixArtConfig:
    """The config of an original-layout PixArt state dict, from its tensor shapes.

    `pixart_version`, `sample_size`, `num_heads` are what a file may not tell: a file without
    a null caption needs the version, one without `pos_embed` the training size; a version
    that contradicts the stored null caption is an error, not an override.
    """
    if detect_layout(shapes) != "original":
        raise CheckpointError(f"not an original-layout PixArt state dict (no {ORIGINAL_ANCHOR})")
    unsupported = [k for k in ("blocks.0.attn.q_norm.weight", "blocks.0.attn.sr.weight") if k in shapes]
    if unsupported:
        raise CheckpointError(f"this PixArt was trained with {'qk-norm' if 'q_norm' in unsupported[0] else 'KV compression'} "
                              f"({unsupported[0]}), which no released model uses and dite does not implement")
    stored = version_of(shapes)
    if pixart_version is not None and pixart_version not in VERSIONS:
        raise ConfigError(f"PixArt version must be one of {VERSIONS}, got {pixart_version!r}")
    if stored is not None and pixart_version is not None and pixart_version != stored:
        rows = shapes[NULL_CAPTION_KEY][0]
        raise ConfigError(f"this checkpoint is PixArt-{'α' if stored == 'alpha' else 'Σ'} (its null caption has {rows} "
                          f"rows), not PixArt-{'α' if pixart_version == 'alpha' else 'Σ'}: its T5 length, position "
                          "interpolation and VAE follow from that; drop model_config['variant']")
    pixart_version = stored or pixart_version
    if pixart_version is None:
        raise ConfigError(f"this PixArt checkpoint has no {NULL_CAPTION_KEY}, so α and Σ cannot be told apart: "
                          "pass model_config={'variant': 'alpha' or 'sigma'}")
    dim, in_channels, patch, _ = shapes["x_embedder.proj.weight"]
    if "pos_embed" in shapes:
        sample_size = math.isqrt(shapes["pos_embed"][1]) * patch
    elif sample_size is None:
        raise ConfigError("this PixArt checkpoint has no pos_embed, so its training size is unknown: pass "
                          "model_config={'sample_size': latent side} (32, 64, 128 or 256 for 256 to 2048 px)")
    if num_heads is None:
        if dim % HEAD_DIM:
            raise ConfigError(f"cannot infer the heads of a PixArt with hidden size {dim} (released models use "
                              f"{HEAD_DIM}-wide heads); pass model_config={{'num_heads': N}}")
        num_heads = dim // HEAD_DIM
    return PixArtConfig(
        hidden_size=dim, depth=count_indexed(shapes, "blocks."), num_heads=num_heads, patch_size=patch,
        in_channels=in_channels, out_channels=shapes["final_layer.linear.weight"][0] // (patch * patch),
        caption_channels=shapes["y_embedder.y_proj.fc1.weight"][1], sample_size=sample_size,
        interpolation_scale=family_interpolation(pixart_version, sample_size),
        micro_conditions="csize_embedder.mlp.0.weight" in shapes, pixart_version=pixart_version,
        mlp_ratio=shapes["blocks.0.mlp.fc1.weight"][0] / dim,
    )


def keymap(cfg: PixArtConfig, layout: str) -> tuple[KeyMap, set[str]]:
    """(our name -> source, checkpoint keys to ignore) for an original or diffusers layout."""
    names = list(param_names(cfg))
    if layout == "original":
        return {n: take(n) for n in names}, set(ORIGINAL_EXTRAS)
    if layout != "diffusers":
        raise ValueError(f"unknown PixArt layout {layout!r}")
    emb = "adaln_single.emb."
    m: KeyMap = {"final_layer.scale_shift_table": take("scale_shift_table")}
    for p in ("weight", "bias"):
        m[f"x_embedder.proj.{p}"] = take(f"pos_embed.proj.{p}")
        m[f"t_embedder.mlp.0.{p}"] = take(emb + f"timestep_embedder.linear_1.{p}")
        m[f"t_embedder.mlp.2.{p}"] = take(emb + f"timestep_embedder.linear_2.{p}")
        m[f"t_block.1.{p}"] = take(f"adaln_single.linear.{p}")
        if cfg.micro_conditions:
            for ours, theirs in (("csize_embedder", "resolution_embedder"), ("ar_embedder", "aspect_ratio_embedder")):
                m[f"{ours}.mlp.0.{p}"] = take(emb + f"{theirs}.linear_1.{p}")
                m[f"{ours}.mlp.2.{p}"] = take(emb + f"{theirs}.linear_2.{p}")
        m[f"y_embedder.y_proj.fc1.{p}"] = take(f"caption_projection.linear_1.{p}")
        m[f"y_embedder.y_proj.fc2.{p}"] = take(f"caption_projection.linear_2.{p}")
        m[f"final_layer.linear.{p}"] = take(f"proj_out.{p}")
        for i in range(cfg.depth):
            d, o = f"transformer_blocks.{i}.", f"blocks.{i}."
            m[o + f"attn.qkv.{p}"] = concat(d + f"attn1.to_{x}.{p}" for x in "qkv")
            m[o + f"attn.proj.{p}"] = take(d + f"attn1.to_out.0.{p}")
            m[o + f"cross_attn.q_linear.{p}"] = take(d + f"attn2.to_q.{p}")
            m[o + f"cross_attn.kv_linear.{p}"] = concat(d + f"attn2.to_{x}.{p}" for x in "kv")
            m[o + f"cross_attn.proj.{p}"] = take(d + f"attn2.to_out.0.{p}")
            m[o + f"mlp.fc1.{p}"] = take(d + f"ff.net.0.proj.{p}")
            m[o + f"mlp.fc2.{p}"] = take(d + f"ff.net.2.{p}")
    for i in range(cfg.depth):
        m[f"blocks.{i}.scale_shift_table"] = take(f"transformer_blocks.{i}.scale_shift_table")
    missing = set(names) - set(m)
    if missing:  # a programming error in this map, not a user error
        raise AssertionError(f"PixArt diffusers key map misses {sorted(missing)[:5]}")
    return m, set()


def param_names(cfg: PixArtConfig):
    """Our parameter names for `cfg`, without building the module."""
    with torch.device("meta"):
        return PixArt(cfg).state_dict().keys()
