"""Loading CLIP and T5 text encoders from a transformers folder or a single weights file.

Kept out of `dite.models.clip` / `dite.models.t5` because models do not read files. A
folder's `config.json` is authoritative; a single file (bare, OpenCLIP, or inside an SD3
release under `text_encoders.{clip_l,clip_g,t5xxl}.transformer.`) is detected from shapes.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch

from dite.engine.errors import CheckpointError
from dite.engine.loading.config_files import naming, read_config
from dite.engine.loading.weights import WeightReader, find_weights_file, load_weights, open_weights
from dite.models.checkpoint import KeyMap
from dite.models.clip import (
    CLIPTextConfig, CLIPTextModel, clip_keymap, clip_layout, clip_projection_dim, detect_clip, find_clip_prefix,
)
from dite.models.t5 import T5Config, T5Encoder, detect_t5, find_t5_prefix, t5_keymap

# Anchor key suffix -> what a checkpoint holding it is, for "this is not a ..." errors.
_LOOKS_LIKE = (
    ("encoder.block.0.layer.0.SelfAttention.q.weight", "a T5 encoder"),
    ("text_model.encoder.layers.0.self_attn.q_proj.weight", "a CLIP text model"),
    ("embeddings.token_embedding.weight", "a CLIP text model"),
    ("transformer.resblocks.0.attn.in_proj_weight", "a CLIP text model (OpenCLIP layout)"),
    ("vision_model.encoder.layers.0.self_attn.q_proj.weight", "a CLIP vision model"),
    ("decoder.conv_in.weight", "a VAE"),
    ("joint_blocks.0.context_block.attn.qkv.weight", "an SD3 MMDiT"),
    ("transformer_blocks.0.attn.add_q_proj.weight", "an SD3 MMDiT"),
    ("adaln_single.linear.weight", "a PixArt transformer"),
    ("t_block.1.weight", "a PixArt transformer"),
    ("y_embedder.embedding_table.weight", "a DiT"),
)


def load_clip(
    path_or_reader: str | os.PathLike | WeightReader,
    *,
    config: CLIPTextConfig | None = None,
    prefix: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    variant: str | None = None,
) -> CLIPTextModel:
    """A CLIPTextModel with its weights, in eval mode.

    `path_or_reader`: a transformers `text_encoder/` folder (config.json + model[.variant]
    .safetensors, sharded or not), a single file in transformers or OpenCLIP names, or an
    open reader. `prefix` selects one tower of a file holding several (an SD3 single file:
    "text_encoders.clip_l.transformer." or "text_encoders.clip_g.transformer."). Without a
    config.json or `config` the config is detected from shapes (see `detect_clip`). Whether
    the model has a text_projection is always read from the file.
    """
    reader, folder_config = _open(path_or_reader, variant)
    config, keymap, ignore = clip_parts(reader, config=config, folder_config=folder_config, prefix=prefix)
    with torch.device("meta"):
        model = CLIPTextModel(config)
    return load_weights(model, keymap, reader, ignore=ignore, dtype=dtype, device=device)


def load_t5(
    path_or_reader: str | os.PathLike | WeightReader,
    *,
    config: T5Config | None = None,
    prefix: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    variant: str | None = None,
) -> T5Encoder:
    """A T5Encoder with its weights, in eval mode.

    `path_or_reader`: a transformers `text_encoder_3/` folder, a single file (bare or under
    a prefix such as "text_encoders.t5xxl.transformer."; fp8 e4m3 files are upcast to
    `dtype`), or an open reader. In fp16 the feed-forward `wo` weights stay in fp32, as in
    transformers, because T5-XXL's activations overflow fp16 there; prefer bf16 or fp32.
    """
    reader, folder_config = _open(path_or_reader, variant)
    config, keymap, ignore = t5_parts(reader, config=config, folder_config=folder_config, prefix=prefix)
    with torch.device("meta"):
        model = T5Encoder(config).to(dtype)
        if dtype == torch.float16:
            for block in model.blocks:
                block.ff.wo.float()
    # dtype=None: each tensor is cast to its meta parameter's dtype, so an fp32 `wo` is read
    # straight from the file, not rounded through fp16.
    return load_weights(model, keymap, reader, ignore=ignore, dtype=None, device=device)


def clip_parts(reader: WeightReader, *, config: CLIPTextConfig | None = None, folder_config: dict | None = None,
               prefix: str | None = None) -> tuple[CLIPTextConfig, KeyMap, set[str]]:
    """(config, key map, keys to ignore) of the CLIP text model in `reader` under `prefix`
    (found if None): `config`, else the folder's config.json, else detected from shapes.
    Whether it has a text_projection is always read from the file. Shared by loading and
    conversion."""
    keys = reader.keys()
    prefix = _find(find_clip_prefix, reader, "a CLIP text model") if prefix is None else prefix
    layout = clip_layout(keys, prefix)
    shapes = {k: reader.shape(k) for k in keys if k.startswith(prefix)}
    if config is None and folder_config is not None:
        with naming(folder_config):
            config = CLIPTextConfig.from_transformers(folder_config)
    if config is None:
        config, _ = detect_clip(keys, shapes, prefix=prefix)
    config = replace(config, projection_dim=clip_projection_dim(keys, shapes, prefix, layout))
    keymap, ignore = clip_keymap(config, layout, keys, prefix)
    return config, keymap, ignore


def t5_parts(reader: WeightReader, *, config: T5Config | None = None, folder_config: dict | None = None,
             prefix: str | None = None) -> tuple[T5Config, KeyMap, set[str]]:
    """(config, key map, keys to ignore) of the T5 encoder in `reader`, as clip_parts."""
    keys = reader.keys()
    prefix = _find(find_t5_prefix, reader, "a T5 encoder") if prefix is None else prefix
    scaled = [k for k in keys if k.startswith(prefix) and k.endswith(("scale_weight", "scaled_fp8"))]
    if scaled:
        raise CheckpointError(f"{reader.where(scaled[0])} is a scaled-fp8 file ({scaled[0]}); dite reads plain fp8 "
                              "e4m3 weights only: use an fp16/bf16 or unscaled fp8 T5 file")
    if config is None and folder_config is not None:
        with naming(folder_config):
            config = T5Config.from_transformers(folder_config)
    if config is None:
        config = detect_t5(keys, {k: reader.shape(k) for k in keys if k.startswith(prefix)}, prefix=prefix)
    keymap, ignore = t5_keymap(config, keys, prefix)
    return config, keymap, ignore


def open_encoder(path_or_reader, variant: str | None = None) -> tuple[WeightReader, dict | None]:
    """The reader of a text encoder folder or file, and the folder's config.json if any."""
    return _open(path_or_reader, variant)


def _open(path_or_reader, variant: str | None) -> tuple[WeightReader, dict | None]:
    """The reader, and the folder's config.json when given a folder."""
    if isinstance(path_or_reader, WeightReader):
        return path_or_reader, None
    path = Path(path_or_reader)
    if not path.is_dir():
        return open_weights(path), None
    config = None
    if (path / "config.json").exists():
        config = read_config(path / "config.json", "text encoder config")
    return open_weights(find_weights_file(path, variant=variant)), config


def _find(find, reader: WeightReader, wanted: str) -> str:
    """`find(keys)` (the model's prefix finder); when it finds nothing, say what the file is."""
    keys = reader.keys()
    try:
        return find(keys)
    except CheckpointError as exc:
        looks = sorted({what for anchor, what in _LOOKS_LIKE for k in keys if k.endswith(anchor)})
        if not looks or "several" in str(exc):
            raise
        origin = reader.where(keys[0])
        raise CheckpointError(f"expected {wanted}, but {origin} looks like {' and '.join(looks)} ({exc})") from None
