"""The T5 v1.1 encoder (T5-XXL in SD3 and PixArt) and how its checkpoints are named.

Pre-norm blocks with RMS norms, self-attention whose scores are NOT scaled by 1/sqrt(d)
and get a learned relative position bias (one table, stored in block 0, computed once and
added in every layer), and a gated-GELU (tanh) feed-forward. Parameter names are our own
(`blocks.N.attn.q`, `blocks.N.ff.wo`); `t5_keymap` maps transformers' `T5EncoderModel`
names onto them.

Half precision: the feed-forward output projection `wo` overflows fp16 in T5-XXL. As
transformers does (`_keep_in_fp32_modules = ["wo"]`), the loader keeps `wo` in fp32 when
loading in fp16 and the block feeds `wo` in its weight's dtype, which also makes the
residual stream fp32 from the first feed-forward on. bf16 has no such problem. Casting a
loaded model with `.half()` casts `wo` too: load with dtype=torch.float16 instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from dite.models.attention import attention
from dite.engine.errors import CheckpointError, ConfigError
from dite.models.config_fields import check_fields, check_instance
from dite.models.checkpoint import KeyMap, count_indexed, identical_copies, take
from dite.models.layers import Embedding, RMSNorm, merge_heads, split_heads


# The config.json fields from_transformers reads, by kind (models/config_fields.py).
TRANSFORMERS_FIELDS = {
    "vocab_size": "size", "d_model": "size", "d_kv": "size", "d_ff": "size", "num_layers": "size",
    "num_heads": "size", "relative_attention_num_buckets": "size", "relative_attention_max_distance": "size",
    "layer_norm_epsilon": "positive", "feed_forward_proj": "str",
}


@dataclass(frozen=True)
class T5Config:
    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    layers: int = 24
    heads: int = 64
    relative_buckets: int = 32
    relative_max_distance: int = 128
    eps: float = 1e-6

    def __post_init__(self):
        check_instance(self, "T5 config")

    @classmethod
    def t5_xxl(cls) -> "T5Config":
        """google/t5-v1_1-xxl encoder (SD3 `text_encoder_3`, PixArt's text encoder)."""
        return cls()

    @classmethod
    def from_transformers(cls, config: Mapping[str, Any]) -> "T5Config":
        """From a transformers T5 `config.json`; only gated-GELU (v1.1, flan) is supported."""
        check_fields(config, "T5 config", TRANSFORMERS_FIELDS)
        proj = config.get("feed_forward_proj", "relu")
        if proj not in ("gated-gelu",):
            raise ConfigError(f"T5 feed_forward_proj {proj!r} unsupported: dite implements T5 v1.1's "
                              "'gated-gelu' (T5 v1.0 uses 'relu')")
        return cls(
            vocab_size=config.get("vocab_size", 32128),
            d_model=config.get("d_model", 512),
            d_kv=config.get("d_kv", 64),
            d_ff=config.get("d_ff", 2048),
            layers=config.get("num_layers", 6),
            heads=config.get("num_heads", 8),
            relative_buckets=config.get("relative_attention_num_buckets", 32),
            relative_max_distance=config.get("relative_attention_max_distance", 128),
            eps=config.get("layer_norm_epsilon", 1e-6),
        )


    def to_transformers(self) -> dict[str, Any]:
        """The transformers T5EncoderModel `config.json` of this config (inverse of
        from_transformers; T5 v1.1's gated-GELU feed-forward)."""
        return {
            "architectures": ["T5EncoderModel"], "model_type": "t5", "vocab_size": self.vocab_size,
            "d_model": self.d_model, "d_kv": self.d_kv, "d_ff": self.d_ff, "num_layers": self.layers,
            "num_decoder_layers": self.layers, "num_heads": self.heads,
            "relative_attention_num_buckets": self.relative_buckets,
            "relative_attention_max_distance": self.relative_max_distance, "layer_norm_epsilon": self.eps,
            "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new", "is_gated_act": True,
            "dropout_rate": 0.0, "is_encoder_decoder": True, "pad_token_id": 0, "eos_token_id": 1,
            "decoder_start_token_id": 0, "tie_word_embeddings": False, "initializer_factor": 1.0, "use_cache": False,
        }


# ----------------------------------------------------------------------------- modules


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    # Written out (not F.gelu(approximate="tanh"), which differs in the last bits) to match
    # transformers' "gelu_new" exactly.
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def relative_position_buckets(length: int, num_buckets: int, max_distance: int, device=None) -> torch.Tensor:
    """[length, length] bucket of (key position - query position), bidirectional: half the
    buckets per direction, exact for small distances, log-spaced up to `max_distance`."""
    pos = torch.arange(length, dtype=torch.long, device=device)
    rel = pos[None, :] - pos[:, None]
    half = num_buckets // 2
    exact = half // 2
    direction = (rel > 0).to(torch.long) * half
    rel = rel.abs()
    # clamp(min=1) only keeps log() finite where the exact branch is taken anyway.
    log_ratio = torch.log(rel.clamp(min=1).float() / exact) / math.log(max_distance / exact)
    far = (exact + (log_ratio * (half - exact)).to(torch.long)).clamp(max=half - 1)
    return direction + torch.where(rel < exact, rel, far)


def clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    """transformers' fp16 guard after each residual: clip inf to just inside the range."""
    if x.dtype != torch.float16:
        return x
    big = torch.finfo(torch.float16).max
    limit = torch.where(torch.isinf(x).any(), big - 1000, big)
    return x.clamp(min=-limit, max=limit)


class T5Attention(nn.Module):
    def __init__(self, c: T5Config):
        super().__init__()
        self.heads = c.heads
        inner = c.heads * c.d_kv
        self.q = nn.Linear(c.d_model, inner, bias=False)
        self.k = nn.Linear(c.d_model, inner, bias=False)
        self.v = nn.Linear(c.d_model, inner, bias=False)
        self.o = nn.Linear(inner, c.d_model, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        q, k, v = (split_heads(proj(x), self.heads) for proj in (self.q, self.k, self.v))
        # T5 was trained without 1/sqrt(d) score scaling (it is folded into the init).
        return self.o(merge_heads(attention(q, k, v, mask=mask, bias=bias, scale=1.0)))


class T5FeedForward(nn.Module):
    def __init__(self, c: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(c.d_model, c.d_ff, bias=False)  # gate
        self.wi_1 = nn.Linear(c.d_model, c.d_ff, bias=False)
        self.wo = nn.Linear(c.d_ff, c.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = gelu_tanh(self.wi_0(x)) * self.wi_1(x)
        return self.wo(h.to(self.wo.weight.dtype))  # wo may be kept in fp32 (see module doc)


class T5Block(nn.Module):
    def __init__(self, c: T5Config):
        super().__init__()
        self.attn_norm = RMSNorm(c.d_model, eps=c.eps)
        self.attn = T5Attention(c)
        self.ff_norm = RMSNorm(c.d_model, eps=c.eps)
        self.ff = T5FeedForward(c)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = clamp_fp16(x + self.attn(self.attn_norm(x), bias, mask))
        return clamp_fp16(x + self.ff(self.ff_norm(x)))


class T5Encoder(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.config = c = config
        self.embed_tokens = Embedding(c.vocab_size, c.d_model)
        self.relative_attention_bias = Embedding(c.relative_buckets, c.heads)
        self.blocks = nn.ModuleList(T5Block(c) for _ in range(c.layers))
        self.final_norm = RMSNorm(c.d_model, eps=c.eps)

    def position_bias(self, length: int, device=None) -> torch.Tensor:
        """[1, heads, length, length], shared by every layer."""
        c = self.config
        buckets = relative_position_buckets(length, c.relative_buckets, c.relative_max_distance, device)
        return self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T]; attention_mask [B, T], True/1 = real token (keys with 0 get no
        weight; SD3 passes none, PixArt passes the padding mask). Returns [B, T, d_model]."""
        x = self.embed_tokens(input_ids)
        bias = self.position_bias(input_ids.shape[1], x.device)
        mask = None if attention_mask is None else attention_mask.to(device=x.device, dtype=torch.bool)[:, None, None, :]
        for block in self.blocks:
            x = block(x, bias, mask)
        return self.final_norm(x)


# ----------------------------------------------------------------------------- checkpoints

_ANCHOR = "encoder.block.0.layer.0.SelfAttention.q.weight"
_EMBEDDINGS = ("shared.weight", "encoder.embed_tokens.weight")  # one tensor, stored once or twice
# A full T5 (encoder-decoder) checkpoint also holds the decoder and the LM head.
_IGNORED = ("decoder.", "lm_head.")
_BLOCK_NAMES = {"attn_norm": "layer.0.layer_norm", "attn": "layer.0.SelfAttention", "ff_norm": "layer.1.layer_norm",
                "ff": "layer.1.DenseReluDense"}


def find_t5_prefix(keys: Iterable[str]) -> str:
    found = sorted({k[: -len(_ANCHOR)] for k in keys if k.endswith(_ANCHOR)})
    found = [p for p in found if p == "" or p.endswith(".")]
    if not found:
        raise CheckpointError(f"no T5 encoder in this checkpoint: no key ends with {_ANCHOR!r}")
    if len(found) > 1:
        raise CheckpointError(f"several T5 encoders in this checkpoint (prefixes {found}); pass the prefix to use")
    return found[0]


def detect_t5(keys: Iterable[str], shapes: Mapping[str, tuple[int, ...]], *, prefix: str | None = None) -> T5Config:
    """Infer the T5 config from tensor names and shapes (everything but the bucket
    max distance, 128 in every release, is in the shapes)."""
    keys = list(keys)
    prefix = find_t5_prefix(keys) if prefix is None else prefix
    block = prefix + "encoder.block.0.layer."
    if block + "1.DenseReluDense.wi.weight" in set(keys):
        raise CheckpointError("this is a T5 v1.0 encoder (ungated ReLU feed-forward, `wi.weight`); dite "
                              "implements T5 v1.1 (gated GELU, `wi_0`/`wi_1`) as used by SD3 and PixArt")
    embedding = next((prefix + e for e in _EMBEDDINGS if prefix + e in set(keys)), None)
    if embedding is None:
        raise CheckpointError(f"T5 checkpoint has no token embedding ({' or '.join(prefix + e for e in _EMBEDDINGS)})")

    def shape(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise CheckpointError(f"T5 tensor {key!r} is missing; the file is incomplete or not a T5 v1.1 encoder")
        return tuple(shapes[key])

    buckets, heads = shape(block + "0.SelfAttention.relative_attention_bias.weight")
    vocab, d_model = shape(embedding)
    return T5Config(
        vocab_size=vocab, d_model=d_model, d_kv=shape(block + "0.SelfAttention.q.weight")[0] // heads,
        d_ff=shape(block + "1.DenseReluDense.wi_0.weight")[0], layers=count_indexed(keys, prefix + "encoder.block."),
        heads=heads, relative_buckets=buckets,
    )


def _transformers_name(name: str) -> str:
    if name == "relative_attention_bias.weight":
        return "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    if name.startswith("final_norm."):
        return "encoder.final_layer_norm." + name.split(".", 1)[1]
    _, i, part, rest = name.split(".", 3)  # blocks.N.<part>.<rest>
    return f"encoder.block.{i}.{_BLOCK_NAMES[part]}.{rest}"


def t5_keymap(config: T5Config, keys: Iterable[str], prefix: str = "") -> tuple[KeyMap, set[str]]:
    """Key map from a transformers-layout T5 checkpoint (under `prefix`) onto T5Encoder(config).

    The embedding may be stored as `shared.weight`, `encoder.embed_tokens.weight` or both
    (then both must be equal). Ignored: everything outside `prefix`, and a full T5's
    decoder and LM head.
    """
    keys = set(keys)
    with torch.device("meta"):
        names = list(T5Encoder(config).state_dict())
    keymap: KeyMap = {name: take(prefix + _transformers_name(name)) for name in names if name != "embed_tokens.weight"}
    stored = [prefix + e for e in _EMBEDDINGS if prefix + e in keys] or [prefix + _EMBEDDINGS[0]]
    keymap["embed_tokens.weight"] = identical_copies(stored) if len(stored) > 1 else take(stored[0])
    ignore = {k for k in keys if not k.startswith(prefix) or k[len(prefix):].startswith(_IGNORED)}
    return keymap, ignore
