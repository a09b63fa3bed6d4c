"""CLIP text encoders (OpenAI CLIP-L/14, OpenCLIP bigG/14) and how their checkpoints are named.

A pre-LN causal transformer over 77 token positions. SD3 reads three things from it: the
hidden state of the penultimate layer *before* the final LayerNorm (per-token features),
the final-LN state at the EOS position (pooled), and that pooled vector through the
bias-free `text_projection`. Parameter names are transformers' names with the
`embeddings.` / `encoder.` containers dropped; the transformers layout (with or without
the `text_model.` wrapper) and the OpenCLIP layout are mapped by `clip_keymap`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dite.models.attention import attention
from dite.engine.errors import CheckpointError, ConfigError
from dite.models.config_fields import check_fields, check_instance
from dite.models.checkpoint import KeyMap, Source, count_indexed, piece_of, take, transformed
from dite.models.layers import Embedding, merge_heads, split_heads

ACTIVATIONS = ("quick_gelu", "gelu")
# Heads and activation are not in tensor shapes; the released text towers by width
# (head_dim 64): OpenAI CLIP-L uses quick_gelu, OpenCLIP ViT-H and bigG exact gelu.
HEADS_BY_WIDTH = {768: 12, 1024: 16, 1280: 20}
ACTIVATION_BY_WIDTH = {768: "quick_gelu", 1024: "gelu", 1280: "gelu"}
# transformers' pooling rule before its PR #24773: configs saved with eos_token_id 2 (all
# SD3 / SDXL configs) pool at the argmax of the ids, which with CLIP's tokenizer (EOS
# 49407 is the largest id) is the first EOS.
LEGACY_EOS_TOKEN_ID = 2


# The config.json fields from_transformers reads, by kind (models/config_fields.py).
TRANSFORMERS_FIELDS = {
    "vocab_size": "size", "hidden_size": "size", "num_hidden_layers": "size", "num_attention_heads": "size",
    "max_position_embeddings": "size", "projection_dim": "size", "eos_token_id": "count",
    "layer_norm_eps": "positive", "intermediate_size": "size", "hidden_act": "str", "architectures": "strings",
}


@dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    width: int = 768
    layers: int = 12
    heads: int = 12
    max_positions: int = 77
    activation: str = "quick_gelu"
    projection_dim: int | None = 768  # None: no text_projection (plain CLIPTextModel)
    eos_token_id: int = LEGACY_EOS_TOKEN_ID
    layer_norm_eps: float = 1e-5
    intermediate_size: int | None = None  # None: 4 * width, as in every release

    def __post_init__(self):
        if self.intermediate_size is None:
            object.__setattr__(self, "intermediate_size", 4 * self.width)
        check_instance(self, "CLIP text config", counts=("eos_token_id",))
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"CLIP activation {self.activation!r} unsupported; expected one of {ACTIVATIONS}")
        if self.width % self.heads:
            raise ConfigError(f"CLIP width {self.width} is not divisible by {self.heads} heads")

    @classmethod
    def clip_l(cls) -> "CLIPTextConfig":
        """OpenAI CLIP ViT-L/14 text tower (SD3 `text_encoder`)."""
        return cls(width=768, layers=12, heads=12, activation="quick_gelu", projection_dim=768)

    @classmethod
    def clip_g(cls) -> "CLIPTextConfig":
        """OpenCLIP ViT-bigG/14 text tower (SD3 `text_encoder_2`)."""
        return cls(width=1280, layers=32, heads=20, activation="gelu", projection_dim=1280)

    @classmethod
    def from_transformers(cls, config: Mapping[str, Any]) -> "CLIPTextConfig":
        """From a transformers `config.json` (CLIPTextModel[WithProjection], or a full CLIPModel's
        `text_config`); absent fields take transformers' defaults."""
        check_fields(config, "CLIP text config", {"text_config": "object"})
        config = config.get("text_config") or config
        check_fields(config, "CLIP text config", TRANSFORMERS_FIELDS)
        act = config.get("hidden_act", "quick_gelu")
        if act not in ACTIVATIONS:
            raise ConfigError(f"CLIP hidden_act {act!r} unsupported; expected one of {ACTIVATIONS}")
        # Every CLIPTextConfig carries projection_dim; only the WithProjection model has the layer.
        archs = config.get("architectures") or []
        plain = bool(archs) and not any("Projection" in a for a in archs)
        return cls(
            vocab_size=config.get("vocab_size", 49408),
            width=config.get("hidden_size", 512),
            layers=config.get("num_hidden_layers", 12),
            heads=config.get("num_attention_heads", 8),
            max_positions=config.get("max_position_embeddings", 77),
            activation=act,
            projection_dim=None if plain else config.get("projection_dim", 512),
            eos_token_id=config.get("eos_token_id", LEGACY_EOS_TOKEN_ID),
            layer_norm_eps=config.get("layer_norm_eps", 1e-5),
            intermediate_size=config.get("intermediate_size", 2048),
        )


    def to_transformers(self) -> dict[str, Any]:
        """The transformers `config.json` of this config (inverse of from_transformers): a
        CLIPTextModelWithProjection, or a plain CLIPTextModel without a projection."""
        return {
            "architectures": ["CLIPTextModelWithProjection" if self.projection_dim else "CLIPTextModel"],
            "model_type": "clip_text_model", "vocab_size": self.vocab_size, "hidden_size": self.width,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads, "max_position_embeddings": self.max_positions,
            "hidden_act": self.activation, "layer_norm_eps": self.layer_norm_eps,
            "projection_dim": self.projection_dim or 512, "eos_token_id": self.eos_token_id,
            "bos_token_id": 0, "pad_token_id": 1, "attention_dropout": 0.0, "dropout": 0.0,
            "initializer_factor": 1.0, "initializer_range": 0.02,
        }


# ----------------------------------------------------------------------------- modules


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


class CLIPAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = (split_heads(proj(x), self.heads) for proj in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(merge_heads(attention(q, k, v, mask=mask)))


class CLIPMLP(nn.Module):
    def __init__(self, width: int, hidden: int, activation: str):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.act = quick_gelu if activation == "quick_gelu" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(c.width, eps=c.layer_norm_eps)
        self.self_attn = CLIPAttention(c.width, c.heads)
        self.layer_norm2 = nn.LayerNorm(c.width, eps=c.layer_norm_eps)
        self.mlp = CLIPMLP(c.width, c.intermediate_size, c.activation)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextOutput(NamedTuple):
    last_hidden_state: torch.Tensor  # [B, T, W], after the final LayerNorm
    hidden_states: tuple[torch.Tensor, ...]  # embeddings, then each layer's output (no final LN)
    pooled: torch.Tensor  # [B, W], last_hidden_state at the EOS position
    projected: torch.Tensor | None  # [B, P], text_projection(pooled); None without a projection


class CLIPTextModel(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = c = config
        self.token_embedding = Embedding(c.vocab_size, c.width)
        self.position_embedding = Embedding(c.max_positions, c.width)
        self.layers = nn.ModuleList(CLIPEncoderLayer(c) for _ in range(c.layers))
        self.final_layer_norm = nn.LayerNorm(c.width, eps=c.layer_norm_eps)
        self.text_projection = nn.Linear(c.width, c.projection_dim, bias=False) if c.projection_dim else None

    def forward(self, input_ids: torch.Tensor) -> CLIPTextOutput:
        """input_ids [B, T] (T <= max_positions). SD3's features are `hidden_states[-2]`."""
        t = input_ids.shape[1]
        if t > self.config.max_positions:
            raise ValueError(f"CLIP takes at most {self.config.max_positions} tokens, got {t}; truncate the prompt")
        x = self.token_embedding(input_ids) + self.position_embedding.weight[:t]
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        states = [x]
        for layer in self.layers:
            x = layer(x, causal)
            states.append(x)
        last = self.final_layer_norm(x)
        pooled = last[torch.arange(last.shape[0], device=last.device), self.eos_positions(input_ids)]
        projected = self.text_projection(pooled) if self.text_projection is not None else None
        return CLIPTextOutput(last, tuple(states), pooled, projected)

    def eos_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Where transformers pools: the first maximal id (legacy eos_token_id 2), else the
        first occurrence of eos_token_id (padding may repeat EOS; the first one counts)."""
        ids = input_ids.to(torch.int)
        if self.config.eos_token_id == LEGACY_EOS_TOKEN_ID:
            return ids.argmax(dim=-1)
        return (ids == self.config.eos_token_id).int().argmax(dim=-1)


# ----------------------------------------------------------------------------- checkpoints

LAYOUTS = ("transformers", "openclip")
_HF_ANCHORS = ("encoder.layers.0.self_attn.q_proj.weight", "embeddings.token_embedding.weight")
_OPENCLIP_ANCHORS = ("transformer.resblocks.0.attn.in_proj_weight", "token_embedding.weight")
_WRAPPER = "text_model."
# Tensors of a whole CLIP (text + vision) or of old saves that the text tower does not use.
_IGNORED = ("embeddings.position_ids", "text_model.embeddings.position_ids", "vision_model.",
            "visual_projection.", "logit_scale", "visual.", "attn_mask")


def clip_prefixes(keys: Iterable[str]) -> dict[str, str]:
    """Every CLIP text tower in `keys`: {prefix: layout}. The prefix excludes `text_model.`."""
    keys = set(keys)
    found = {}
    for layout, (anchor, other) in (("transformers", _HF_ANCHORS), ("openclip", _OPENCLIP_ANCHORS)):
        for key in keys:
            inner = key[: -len(anchor)]
            if key.endswith(anchor) and (inner == "" or inner.endswith(".")) and inner + other in keys:
                found[inner[: -len(_WRAPPER)] if inner.endswith(_WRAPPER) else inner] = layout
    return found


def find_clip_prefix(keys: Iterable[str]) -> str:
    found = clip_prefixes(keys)
    if not found:
        raise CheckpointError(f"no CLIP text model in this checkpoint: no key ends with {_HF_ANCHORS[0]!r} "
                              f"or {_OPENCLIP_ANCHORS[0]!r}")
    if len(found) > 1:
        raise CheckpointError(f"several CLIP text models in this checkpoint (prefixes {sorted(found)}); "
                              "pass the prefix of the one to load")
    return next(iter(found))


def clip_layout(keys: Iterable[str], prefix: str = "") -> str:
    """ "transformers" or "openclip" for the tower under `prefix`."""
    layout = clip_prefixes(keys).get(prefix)
    if layout is None:
        raise CheckpointError(f"no CLIP text model under prefix {prefix!r}")
    return layout


def _names(keys: Iterable[str], prefix: str, layout: str) -> dict[str, str]:
    """Checkpoint key of each tensor detection reads, in `layout` under `prefix`."""
    if layout == "openclip":
        return {"tokens": prefix + "token_embedding.weight", "positions": prefix + "positional_embedding",
                "layers": prefix + "transformer.resblocks.", "fc1": prefix + "transformer.resblocks.0.mlp.c_fc.weight",
                "projection": prefix + "text_projection"}
    inner = prefix + _WRAPPER if any(k.startswith(prefix + _WRAPPER) for k in keys) else prefix
    return {"tokens": inner + "embeddings.token_embedding.weight",
            "positions": inner + "embeddings.position_embedding.weight", "layers": inner + "encoder.layers.",
            "fc1": inner + "encoder.layers.0.mlp.fc1.weight", "projection": prefix + "text_projection.weight"}


def clip_projection_dim(keys: Iterable[str], shapes: Mapping[str, tuple[int, ...]], prefix: str, layout: str) -> int | None:
    """The projection width stored in the checkpoint, or None if it has no text_projection.
    OpenCLIP stores it as [W, P] (used as x @ P), transformers as a Linear weight [P, W]."""
    keys = list(keys)
    key = _names(keys, prefix, layout)["projection"]
    if key not in set(keys):
        return None
    return shapes[key][1] if layout == "openclip" else shapes[key][0]


def detect_clip(
    keys: Iterable[str],
    shapes: Mapping[str, tuple[int, ...]],
    *,
    prefix: str | None = None,
    heads: int | None = None,
    activation: str | None = None,
    eos_token_id: int = LEGACY_EOS_TOKEN_ID,
) -> tuple[CLIPTextConfig, str]:
    """Infer the CLIP text config and layout from tensor names and shapes.

    Read from shapes: vocab, width, layers, positions, MLP width, the projection. NOT
    inferable: heads and activation (taken from the released towers by width: 768 is CLIP-L,
    12 heads, quick_gelu; 1024 OpenCLIP-H, 16, gelu; 1280 bigG, 20, gelu; other widths need
    `heads` and `activation`), and eos_token_id (default: the legacy 2, which pools at the
    first EOS with CLIP's tokenizer). A transformers config.json, when present, wins.
    """
    keys = list(keys)
    prefix = find_clip_prefix(keys) if prefix is None else prefix
    layout = clip_layout(keys, prefix)
    n = _names(keys, prefix, layout)
    missing = [n[k] for k in ("tokens", "positions", "fc1") if n[k] not in shapes]
    if missing:
        raise CheckpointError(f"CLIP tensor {missing[0]!r} is missing; the file is incomplete or not a CLIP text model")
    vocab, width = shapes[n["tokens"]]
    heads = heads or HEADS_BY_WIDTH.get(width)
    activation = activation or ACTIVATION_BY_WIDTH.get(width)
    if heads is None or activation is None:
        raise ConfigError(f"CLIP width {width} is not a released text tower: heads and activation cannot be read "
                          "from tensor shapes; pass a config (or heads= and activation=)")
    config = CLIPTextConfig(
        vocab_size=vocab, width=width, layers=count_indexed(keys, n["layers"]), heads=heads,
        max_positions=shapes[n["positions"]][0], activation=activation,
        projection_dim=clip_projection_dim(keys, shapes, prefix, layout), eos_token_id=eos_token_id,
        intermediate_size=shapes[n["fc1"]][0],
    )
    return config, layout


def _third(key: str, i: int) -> Source:
    """OpenCLIP's fused in_proj (q, k, v stacked on dim 0): the i-th third."""
    return piece_of(key, i, 3, dim=0)


def _transposed(key: str) -> Source:
    return transformed(key, torch.t, torch.t, "transpose")


_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def _openclip_source(name: str, prefix: str) -> Source:
    top = {"token_embedding.weight": "token_embedding.weight", "position_embedding.weight": "positional_embedding",
           "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
    if name in top:
        return take(prefix + top[name])
    if name == "text_projection.weight":
        return _transposed(prefix + "text_projection")  # both bigG forms are square: a missed .t() loads silently
    _, i, rest = name.split(".", 2)  # layers.N.<rest>
    module, param = rest.rsplit(".", 1)
    block = f"{prefix}transformer.resblocks.{i}."
    if module in _QKV:
        return _third(f"{block}attn.in_proj_{param}", _QKV.index(module))
    return take(f"{block}{_OPENCLIP_LAYER[module]}.{param}")


def _transformers_name(name: str, inner: str, prefix: str) -> str:
    if name.startswith(("token_embedding.", "position_embedding.")):
        return f"{inner}embeddings.{name}"
    if name.startswith("layers."):
        return f"{inner}encoder.{name}"
    if name.startswith("text_projection."):
        return prefix + name  # outside the text_model wrapper
    return inner + name


def clip_keymap(config: CLIPTextConfig, layout: str, keys: Iterable[str], prefix: str = "") -> tuple[KeyMap, set[str]]:
    """Key map from a checkpoint in `layout` (under `prefix`) onto CLIPTextModel(config).

    Returns the map and the keys to ignore: everything outside `prefix` (the other parts of
    an SD3 single file), `position_ids` buffers, and a full CLIP's vision tower.
    """
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown CLIP layout {layout!r}; expected one of {LAYOUTS}")
    keys = set(keys)
    with torch.device("meta"):
        names = list(CLIPTextModel(config).state_dict())
    # No keys: exporting, into the layout transformers writes (with the text_model wrapper).
    wrapped = not keys or any(k.startswith(prefix + _WRAPPER) for k in keys)
    inner = prefix + _WRAPPER if wrapped else prefix
    if layout == "openclip":
        keymap = {name: _openclip_source(name, prefix) for name in names}
    else:
        keymap = {name: take(_transformers_name(name, inner, prefix)) for name in names}
    ignore = {k for k in keys if not k.startswith(prefix) or k[len(prefix):].startswith(_IGNORED)}
    return keymap, ignore
