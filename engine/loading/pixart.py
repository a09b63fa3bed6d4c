"""Loading PixArt-α / PixArt-Σ: a diffusers PixArtAlphaPipeline / PixArtSigmaPipeline folder, or
an original `.pth` release (`{"state_dict": ...}`, read with weights_only=True).

An original file holds the transformer and its learned null caption only. T5, its tokenizer
and the VAE come from `text_encoder=` / `tokenizer=` / `vae=` (paths or hub ids), else from
folders beside the file: a diffusers-style `text_encoder/`, `tokenizer/`, `vae/` (as in
PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers), or the α repo's `t5-v1_1-xxl/` and
`sd-vae-ft-ema/`. The VAE's latent scale follows the PixArt version (α 0.18215, Σ 0.13025): the SD
and SDXL VAEs have the same shapes, and the transformer was trained on its family's scale.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

from dite.engine.errors import CheckpointError, ConfigError
from dite.engine.checkpoints.recorded import recorded_config, recorded_scheduler, with_recorded
from dite.engine.families import PIXART_SCHEDULER, PIXART_VERSION_OF_PIPELINE
from dite.engine.loading.pixart_files import beside as _beside, beside_hint as _beside_hint
from dite.engine.loading.config_files import naming
from dite.engine.loading.hub import resolve_source
from dite.engine.pipelines.pixart import PixArtPipeline
from dite.engine.loading.text_encoders import load_t5
from dite.engine.pipelines.pixart_prompts import PixArtText
from dite.engine.loading.vae import resolve_vae
from dite.engine.loading.weights import WeightReader, build_module, open_component
from dite.models import pixart
from dite.models.config_fields import check_fields
from dite.models.tokenizers import T5Tokenizer
from dite.schedulers import from_diffusers_config, load_scheduler

TRANSFORMER_CLASSES = ("PixArtTransformer2DModel", "Transformer2DModel")
# The sampler of the original inference scripts and of every diffusers PixArt release.
# Folders beside an original file, best first, for each part.
FILE_HINTS = ("num_heads", "variant", "sample_size")  # model_config keys; "variant": the PixArt version


def build_transformer(cfg: pixart.PixArtConfig, reader: WeightReader, layout: str, *, device, dtype) -> pixart.PixArt:
    keymap, ignore = pixart.keymap(cfg, layout)
    return build_module(lambda: pixart.PixArt(cfg), keymap, reader, ignore=ignore, dtype=dtype, device=device)


def _check_components(components: dict) -> None:
    unknown = set(components) - {"text_encoder", "tokenizer"}
    if unknown:
        raise ConfigError(f"a PixArt pipeline has no {', '.join(sorted(unknown))} to replace "
                          "(it takes text_encoder=, tokenizer= and vae=)")
    for name, value in components.items():
        if value is None:
            raise ConfigError(f"PixArt needs its T5: {name}=None is not supported")


def _text(places: dict[str, Path], *, device, dtype, variant) -> PixArtText:
    folder = places["tokenizer"]
    if (folder / "tokenizer").is_dir():  # a pipeline folder given as tokenizers=
        folder = folder / "tokenizer"
    return PixArtText(t5=load_t5(places["text_encoder"], dtype=dtype, device=device, variant=variant),
                      tokenizer=T5Tokenizer.from_folder(folder))


def load_folder(path: Path, model_index: dict, *, device, dtype, vae, variant, model_config,
                components: dict, tokenizers=None) -> PixArtPipeline:
    _check_components(components)
    if model_config:
        raise ConfigError("model_config is for original .pth files; a diffusers folder's config.json says it all")
    pixart_version = PIXART_VERSION_OF_PIPELINE[model_index["_class_name"]]
    config, reader = open_component(path / "transformer", TRANSFORMER_CLASSES, pixart.detect_layout,
                                    "PixArt transformer", variant)
    with naming(config):
        cfg = pixart.PixArtConfig.from_diffusers(config, pixart_version)
    places = {"text_encoder": _given(components.get("text_encoder")) or path / "text_encoder",
              "tokenizer": _given(components.get("tokenizer")) or _given(tokenizers) or path / "tokenizer"}
    transformer = build_transformer(cfg, reader, "diffusers", device=device, dtype=dtype)
    text = _text(places, device=device, dtype=dtype, variant=variant)
    _check_width(cfg, text, path)
    vae_module = resolve_vae(vae, path / "vae", dtype=dtype, device=device, variant=variant)
    return PixArtPipeline(transformer, vae_module, load_scheduler(path / "scheduler"), text)


def load_file(path: Path, reader: WeightReader, *, device, dtype, vae, variant, model_config,
              components: dict, tokenizers=None) -> PixArtPipeline:
    _check_components(components)
    unknown = set(model_config) - set(FILE_HINTS)
    if unknown:
        raise ConfigError(f"model_config keys {sorted(unknown)} cannot be set for a PixArt checkpoint; it takes "
                          f"{', '.join(FILE_HINTS)}")
    if pixart.detect_layout(reader.keys()) != "original":
        raise CheckpointError(f"{path} is a diffusers-layout PixArt transformer file without its folder; load the "
                              "pipeline folder (with model_index.json) instead")
    check_fields(model_config, "model_config", {"num_heads": "size", "variant": "str", "sample_size": "size"})
    model_config = with_recorded(path, model_config)  # what dite recorded in a file it converted
    shapes = reader.shapes()
    cfg = pixart.detect_config(shapes, num_heads=model_config.get("num_heads"),
                               pixart_version=model_config.get("variant"), sample_size=model_config.get("sample_size"))
    cfg = recorded_config(path, "transformer", cfg)
    places = {"text_encoder": _given(components.get("text_encoder")) or _beside(path, "text_encoder"),
              "tokenizer": _given(components.get("tokenizer")) or _given(tokenizers) or _beside(path, "tokenizer")}
    vae_place = vae if vae is not None else _beside(path, "vae", cfg.pixart_version)
    missing = [name for name, place in {**places, "vae": vae_place}.items() if place is None]
    if missing:
        raise CheckpointError(
            f"{path} is an original PixArt checkpoint, which holds the transformer only; no "
            f"{' and no '.join(missing)} found beside it. Pass them (text_encoder=, tokenizer=, vae=; CLI --vae, "
            f"--tokenizers) or put the folders next to the file: {_beside_hint(cfg.pixart_version)}")

    transformer = build_transformer(cfg, reader, "original", device=device, dtype=dtype)
    null_caption = reader.get(pixart.NULL_CAPTION_KEY).float() if pixart.NULL_CAPTION_KEY in shapes else None
    text = _text(places, device=device, dtype=dtype, variant=variant)
    _check_width(cfg, text, path)
    vae_module = resolve_vae(vae_place, None, dtype=dtype, device=device, variant=variant)
    scale = pixart.VAE_SCALE[cfg.pixart_version]
    if vae_module.config.scaling_factor != scale:
        if isinstance(vae_place, (str, Path)) and (Path(str(vae_place)) / "config.json").is_file():
            warnings.warn(f"the VAE's config says scaling_factor {vae_module.config.scaling_factor}, but PixArt-"
                          f"{'α' if cfg.pixart_version == 'alpha' else 'Σ'} latents use {scale}, which is used; is this "
                          f"the {'sd-vae-ft-ema' if cfg.pixart_version == 'alpha' else 'SDXL'} VAE?", stacklevel=3)
        vae_module.config = replace(vae_module.config, scaling_factor=scale)
    return PixArtPipeline(transformer, vae_module, from_diffusers_config(recorded_scheduler(path) or PIXART_SCHEDULER),
                          text, null_caption=null_caption)


def _given(source) -> Path | None:
    return None if source is None else resolve_source(source)


def _check_width(cfg: pixart.PixArtConfig, text: PixArtText, source) -> None:
    if text.t5.config.d_model != cfg.caption_channels:
        raise CheckpointError(f"the T5 of {source} is {text.t5.config.d_model} wide, but the PixArt transformer takes "
                              f"{cfg.caption_channels}-wide captions; PixArt uses T5-v1.1-XXL (4096)")
