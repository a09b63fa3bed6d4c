"""DiT (Peebles & Xie): class-conditional diffusion transformer with adaLN-Zero blocks.

The math and the parameter names follow facebookresearch/DiT `models.py`, so an original
`.pt` loads one to one; the diffusers layout (DiTTransformer2DModel) is mapped onto it. Two
numeric details of diffusers' port are config fields so each layout reproduces its own
reference: the timestep frequency divisor (`freq_shift`: 0 original, 1 diffusers) and the
eps of the norm before the MLP (`mlp_norm_eps`: 1e-6 original, diffusers' `norm_eps`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Callable, Iterable

import torch
from torch import nn

from dite.engine.errors import CheckpointError, ConfigError
from dite.models.checkpoint import KeyMap, concat, count_indexed, identical_copies, take
from dite.models.config_fields import check_fields, check_instance
from dite.models.denoiser import Conditioning, Denoiser, Hidden
from dite.models.layers import (
    FinalLayer,
    LabelEmbedder,
    Mlp,
    PatchEmbed,
    SelfAttention,
    TimestepEmbedder,
    modulate,
    sincos_pos_embed_2d,
    unpatchify,
)
from dite.models.plan import BlockPlan

# Hidden size -> (depth, heads) of the published DiT sizes. Heads cannot be read from
# tensor shapes, so a width outside this table needs an explicit num_heads.
DIT_SIZES = {"XL": (1152, 28, 16), "L": (1024, 24, 16), "B": (768, 12, 12), "S": (384, 12, 6)}
HEADS_BY_WIDTH = {width: heads for width, _, heads in DIT_SIZES.values()}


@dataclass(frozen=True)
class DiTConfig:
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    patch_size: int = 2
    in_channels: int = 4
    out_channels: int = 8
    num_classes: int = 1000
    input_size: int = 32  # latent side the model was trained at (32 = 256 px)
    mlp_ratio: float = 4.0
    frequency_embedding_size: int = 256
    freq_shift: float = 0.0
    mlp_norm_eps: float = 1e-6
    # One timestep/class embedder per block (diffusers stores one per block; a model
    # initialised or fine-tuned in diffusers has them differ). False: one shared embedder.
    per_block_embedders: bool = False

    def __post_init__(self):
        check_instance(self, "DiT config", signed=("freq_shift",))
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"DiT hidden size {self.hidden_size} is not divisible by {self.num_heads} heads")
        if self.out_channels not in (self.in_channels, 2 * self.in_channels):
            raise ConfigError(
                f"DiT out_channels {self.out_channels} must equal in_channels {self.in_channels} "
                "or twice it (learned sigma)"
            )

    @property
    def learned_sigma(self) -> bool:
        return self.out_channels == 2 * self.in_channels

    @classmethod
    def preset(cls, name: str) -> "DiTConfig":
        """'DiT-XL/2', 'DiT-B/4-512', ... (size, patch, optional image size)."""
        try:
            body = name.removeprefix("DiT-")
            size, rest = body.split("/")
            patch, _, pixels = rest.partition("-")
            width, depth, heads = DIT_SIZES[size]
            return cls(hidden_size=width, depth=depth, num_heads=heads, patch_size=int(patch),
                       input_size=int(pixels or 256) // 8)
        except (KeyError, ValueError):
            sizes = ", ".join(f"DiT-{s}/{{2,4,8}}[-256|-512]" for s in DIT_SIZES)
            raise ConfigError(f"unknown DiT preset {name!r}; known: {sizes}") from None

    @classmethod
    def from_diffusers(cls, config: dict) -> "DiTConfig":
        """From a diffusers DiTTransformer2DModel / Transformer2DModel config.json.

        Whether the per-block embedders are tied is not in the config: `fit_embedders`
        reads it from the weights."""
        check_fields(config, "DiT transformer config", DIFFUSERS_FIELDS)
        if config.get("norm_type", "ada_norm_zero") != "ada_norm_zero":
            raise ConfigError(f"not a DiT transformer config: norm_type is {config.get('norm_type')!r}")
        if config.get("norm_elementwise_affine", False):
            raise ConfigError("DiT configs with norm_elementwise_affine=true are not supported")
        if config.get("activation_fn", "gelu-approximate") != "gelu-approximate":
            raise ConfigError(f"DiT activation {config.get('activation_fn')!r} is not supported (gelu-approximate)")
        heads = config.get("num_attention_heads", 16)
        in_channels = config.get("in_channels", 4)
        return cls(
            hidden_size=heads * config.get("attention_head_dim", 72),
            depth=config.get("num_layers", 28),
            num_heads=heads,
            patch_size=config.get("patch_size", 2),
            in_channels=in_channels,
            out_channels=config.get("out_channels") or in_channels,
            num_classes=config.get("num_embeds_ada_norm", 1000),
            input_size=config.get("sample_size", 32),
            freq_shift=1.0,
            mlp_norm_eps=config.get("norm_eps", 1e-5),
        )

    def to_diffusers(self) -> dict:
        """The diffusers DiTTransformer2DModel config.json of this config (inverse of from_diffusers).

        diffusers' port fixes what the original makes a choice: the timestep divisor shift
        (1), 256 frequency channels and a 4x MLP; other values have no diffusers config."""
        if self.freq_shift != 1.0 or self.frequency_embedding_size != 256 or self.mlp_ratio != 4.0:
            raise ConfigError(
                f"no diffusers DiT config has freq_shift={self.freq_shift}, frequency_embedding_size="
                f"{self.frequency_embedding_size}, mlp_ratio={self.mlp_ratio} (diffusers: 1.0, 256, 4.0)")
        return {
            "_class_name": "DiTTransformer2DModel", "num_attention_heads": self.num_heads,
            "attention_head_dim": self.hidden_size // self.num_heads, "in_channels": self.in_channels,
            "out_channels": self.out_channels, "num_layers": self.depth, "dropout": 0.0, "norm_num_groups": 32,
            "attention_bias": True, "sample_size": self.input_size, "patch_size": self.patch_size,
            "activation_fn": "gelu-approximate", "num_embeds_ada_norm": self.num_classes, "upcast_attention": False,
            "norm_type": "ada_norm_zero", "norm_elementwise_affine": False, "norm_eps": self.mlp_norm_eps,
        }

    def to_dict(self) -> dict:
        return asdict(self)


# The config.json fields from_diffusers reads, by kind (models/config_fields.py).
DIFFUSERS_FIELDS = {
    "num_attention_heads": "size", "attention_head_dim": "size", "num_layers": "size", "patch_size": "size",
    "in_channels": "size", "out_channels": "size", "num_embeds_ada_norm": "size", "sample_size": "size",
    "norm_eps": "positive", "norm_type": "str", "activation_fn": "str", "norm_elementwise_affine": "bool",
}


class DiTBlock(nn.Module):
    """adaLN-Zero block: modulated self-attention and MLP, each gated, on the image tokens."""

    def __init__(self, cfg: DiTConfig, index: int = 0):
        super().__init__()
        self.index = index  # the key of this block's entries in a call's attention cache
        dim = cfg.hidden_size
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, cfg.num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=cfg.mlp_norm_eps)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio), activation="gelu_tanh")
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        # With per-block embedders hidden.c holds every block's vector side by side.
        self.c_columns = slice(index * dim, (index + 1) * dim) if cfg.per_block_embedders else None

    def forward(self, hidden: Hidden, plan: BlockPlan) -> Hidden:
        x = hidden.image
        c = hidden.c if self.c_columns is None else hidden.c[:, self.c_columns]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        attn = self.attn(modulate(self.norm1(x), shift_msa, scale_msa), plan.attention, hidden.grid,
                         hidden.attn_cache, self.index)
        x = x + gate_msa.unsqueeze(1) * attn
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return hidden.with_image(x)


class ConditionEmbedder(nn.Module):
    """One block's own timestep + class embedder (per-block embedders only)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.t_embedder = TimestepEmbedder(cfg.hidden_size, cfg.frequency_embedding_size, cfg.freq_shift)
        self.y_embedder = LabelEmbedder(cfg.num_classes, cfg.hidden_size)

    def forward(self, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.t_embedder(t) + self.y_embedder(labels)


class DiT(Denoiser):
    family = "dit"

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.config = cfg
        self.x_embedder = PatchEmbed(cfg.in_channels, cfg.hidden_size, cfg.patch_size)
        if cfg.per_block_embedders:
            # diffusers' layout with untied copies: each block conditions on its own embedder,
            # and the final layer on block 0's (as DiTTransformer2DModel does).
            self.block_embedders = nn.ModuleList(ConditionEmbedder(cfg) for _ in range(cfg.depth))
        else:
            self.t_embedder = TimestepEmbedder(cfg.hidden_size, cfg.frequency_embedding_size, cfg.freq_shift)
            self.y_embedder = LabelEmbedder(cfg.num_classes, cfg.hidden_size)
        self.blocks = nn.ModuleList(DiTBlock(cfg, i) for i in range(cfg.depth))
        self.final_layer = FinalLayer(cfg.hidden_size, cfg.patch_size, cfg.out_channels)
        self.register_buffer("pos_embed", torch.empty(0), persistent=False)
        self._other_grids: dict = {}  # derived tables for non-training sizes; a pure function cache

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def init_computed_buffers(self, device: torch.device) -> None:
        """The fixed sin-cos position table at the training grid (not stored in checkpoints)."""
        side = self.config.input_size // self.config.patch_size
        self.pos_embed = self._pos_embed((side, side)).to(device)

    def _pos_embed(self, grid: tuple[int, int]) -> torch.Tensor:
        # Other sizes than the training one compress the coordinates into the training grid,
        # as diffusers' PatchEmbed does (base_size = training grid side).
        base = self.config.input_size // self.config.patch_size
        return sincos_pos_embed_2d(self.config.hidden_size, grid[0], grid[1], base_size=base)

    def prepare(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> Hidden:
        tokens, grid = self.x_embedder(x)
        pos = self.pos_embed
        if pos.shape[0] != grid[0] * grid[1] or grid[0] != grid[1]:
            # Another size than the training one: computed once per (grid, device), not per step.
            key = (grid, tokens.device)
            if key not in self._other_grids:
                self._other_grids[key] = self._pos_embed(grid).to(tokens.device)
            pos = self._other_grids[key]
        tokens = tokens + pos.to(tokens.dtype)
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t
        if self.config.per_block_embedders:
            c = torch.cat([e(t, cond.class_labels) for e in self.block_embedders], dim=1)
        else:
            c = self.t_embedder(t) + self.y_embedder(cond.class_labels)
        return Hidden(image=tokens, c=c, grid=grid)

    def finalize(self, hidden: Hidden) -> torch.Tensor:
        c = hidden.c[:, :self.config.hidden_size] if self.config.per_block_embedders else hidden.c
        out = self.final_layer(hidden.image, c)
        return unpatchify(out, hidden.grid, self.config.patch_size, self.config.out_channels)


# ---------------------------------------------------------------- checkpoints

ORIGINAL_ANCHORS = ("y_embedder.embedding_table.weight", "blocks.0.adaLN_modulation.1.weight")
DIFFUSERS_ANCHOR = "transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"


def detect_layout(keys) -> str | None:
    keys = set(keys)
    if all(k in keys for k in ORIGINAL_ANCHORS) and "t_block.1.weight" not in keys:
        return "original"
    if DIFFUSERS_ANCHOR in keys and "proj_out_2.weight" in keys:
        return "diffusers"
    return None


def detect_config(shapes: dict[str, tuple[int, ...]], num_heads: int | None = None) -> DiTConfig:
    """Infer the config of an original-layout DiT state dict from its tensor shapes."""
    layout = detect_layout(shapes)
    if layout != "original":
        raise CheckpointError("not an original-layout DiT state dict (no y_embedder / blocks.0.adaLN_modulation)")
    width, in_channels, patch, _ = shapes["x_embedder.proj.weight"]
    if num_heads is None:
        if width not in HEADS_BY_WIDTH:
            raise ConfigError(
                f"cannot infer the number of heads of a DiT with hidden size {width} (not a published "
                f"size: {sorted(HEADS_BY_WIDTH)}); pass model_config={{'num_heads': N}}"
            )
        num_heads = HEADS_BY_WIDTH[width]
    out_channels = shapes["final_layer.linear.weight"][0] // (patch * patch)
    if "pos_embed" in shapes:
        input_size = math.isqrt(shapes["pos_embed"][1]) * patch
    else:
        input_size = 32
    mlp_hidden = shapes["blocks.0.mlp.fc1.weight"][0]
    return DiTConfig(
        hidden_size=width, depth=count_indexed(shapes, "blocks."), num_heads=num_heads,
        patch_size=patch, in_channels=in_channels, out_channels=out_channels,
        num_classes=shapes["y_embedder.embedding_table.weight"][0] - 1, input_size=input_size,
        mlp_ratio=mlp_hidden / width,
    )


def keymap(cfg: DiTConfig, layout: str) -> tuple[KeyMap, set[str]]:
    """(our name -> source, checkpoint keys to ignore) for an original or diffusers layout."""
    names = list(param_names(cfg))
    if layout == "original":
        if cfg.per_block_embedders:
            raise ConfigError("this DiT has a timestep/class embedder per block (untied copies, as a model made in "
                              "diffusers has), and the original layout stores one: it cannot be written there")
        return {n: take(n) for n in names}, {"pos_embed"}
    if layout != "diffusers":
        raise ValueError(f"unknown DiT layout {layout!r}")
    every = range(cfg.depth)
    emb = "transformer_blocks.{}.norm1.emb."
    m: KeyMap = {}
    for p in ("weight", "bias"):
        m[f"x_embedder.proj.{p}"] = take(f"pos_embed.proj.{p}")
        for ours, theirs in (("t_embedder.mlp.0", "timestep_embedder.linear_1"),
                             ("t_embedder.mlp.2", "timestep_embedder.linear_2")):
            if cfg.per_block_embedders:  # each block's own copy
                for j in every:
                    m[f"block_embedders.{j}.{ours}.{p}"] = take(emb.format(j) + f"{theirs}.{p}")
            else:  # one module tensor, stored once per block: the copies must agree
                m[f"{ours}.{p}"] = identical_copies(emb.format(j) + f"{theirs}.{p}" for j in every)
        m[f"final_layer.adaLN_modulation.1.{p}"] = take(f"proj_out_1.{p}")
        m[f"final_layer.linear.{p}"] = take(f"proj_out_2.{p}")
        for i in every:
            src, dst = f"transformer_blocks.{i}.", f"blocks.{i}."
            m[dst + f"adaLN_modulation.1.{p}"] = take(src + f"norm1.linear.{p}")
            m[dst + f"attn.qkv.{p}"] = concat(src + f"attn1.to_{x}.{p}" for x in "qkv")
            m[dst + f"attn.proj.{p}"] = take(src + f"attn1.to_out.0.{p}")
            m[dst + f"mlp.fc1.{p}"] = take(src + f"ff.net.0.proj.{p}")
            m[dst + f"mlp.fc2.{p}"] = take(src + f"ff.net.2.{p}")
    if cfg.per_block_embedders:
        for j in every:
            m[f"block_embedders.{j}.y_embedder.embedding_table.weight"] = take(
                emb.format(j) + "class_embedder.embedding_table.weight")
    else:
        m["y_embedder.embedding_table.weight"] = identical_copies(
            emb.format(j) + "class_embedder.embedding_table.weight" for j in every)
    return m, set()


EMBEDDER_KEYS = ("timestep_embedder.linear_1.weight", "timestep_embedder.linear_1.bias",
                 "timestep_embedder.linear_2.weight", "timestep_embedder.linear_2.bias",
                 "class_embedder.embedding_table.weight")


def embedders_differ(keys: Iterable[str], get: Callable[[str], torch.Tensor], depth: int) -> bool:
    """Whether the per-block embedder copies of a diffusers-layout DiT differ from block 0's
    (`get(key)` reads one tensor). Missing keys count as tied: the loader names them."""
    keys = set(keys)
    emb = "transformer_blocks.{}.norm1.emb."
    for name in EMBEDDER_KEYS:
        first = emb.format(0) + name
        if first not in keys:
            return False
        reference = None
        for j in range(1, depth):
            key = emb.format(j) + name
            if key not in keys:
                return False
            if reference is None:
                reference = get(first)
            if not torch.equal(get(key), reference):
                return True
    return False


def fit_embedders(cfg: DiTConfig, keys: Iterable[str], get: Callable[[str], torch.Tensor]) -> DiTConfig:
    """`cfg` with per-block embedders when the diffusers weights' copies differ, else one
    shared embedder (the copies are then stored once in the module)."""
    return replace(cfg, per_block_embedders=embedders_differ(keys, get, cfg.depth))


def param_names(cfg: DiTConfig):
    """Our parameter names for `cfg`, without building the module."""
    with torch.device("meta"):
        return DiT(cfg).state_dict().keys()
