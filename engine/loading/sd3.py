"""Loading SD3 / SD3.5: a diffusers StableDiffusion3Pipeline folder, or an original single file
(`sd3_medium.safetensors` with `text_encoders/` beside it, or `*_incl_clips*` with the
encoders bundled; engine/loading/sd3_single_file.py says where each part is)."""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

from dite.engine.loading import sd3_single_file as sd3_files
from dite.engine.errors import CheckpointError, ConfigError
from dite.engine.checkpoints.recorded import recorded_config, recorded_scheduler, with_recorded
from dite.engine.loading.config_files import naming
from dite.engine.loading.hub import resolve_tokenizers
from dite.engine.pipelines.sd3 import SD3Pipeline
from dite.engine.loading.text_encoders import load_clip, load_t5
from dite.engine.pipelines.sd3_prompts import SD3TextEncoders
from dite.engine.loading.vae import load_vae, resolve_vae
from dite.engine.loading.weights import WeightReader, build_module, open_component
from dite.models import mmdit
from dite.engine.families import SD3_SCHEDULER
from dite.engine.loading.sd3_single_file import component_hints
from dite.models.clip import CLIPTextModel
from dite.models.config_fields import check_fields
from dite.models.vae import VAEConfig
from dite.schedulers import from_diffusers_config, load_scheduler



class RunningWithoutT5Warning(UserWarning):
    """An SD3 single file was loaded without T5 because no T5 weights were found."""


def build_transformer(cfg: mmdit.MMDiTConfig, reader: WeightReader, layout: str, *, device, dtype, prefix="",
                      ignore=frozenset()):
    keymap, keymap_ignore = mmdit.keymap(cfg, layout, prefix)
    return build_module(lambda: mmdit.MMDiT(cfg), keymap, reader, ignore=set(keymap_ignore) | set(ignore),
                        dtype=dtype, device=device)


def _skip_t5(components: dict) -> bool:
    """Whether `text_encoder_3=None` asked to run without T5 (the only component SD3 replaces)."""
    unknown = set(components) - {"text_encoder_3"}
    if unknown:
        raise ConfigError(f"SD3 pipelines cannot replace {sorted(unknown)}")
    if components.get("text_encoder_3", None) is not None:
        raise ConfigError("text_encoder_3 takes None (run without T5)")
    return "text_encoder_3" in components


def _tokenizer_places(tokenizers, default: list[Path]) -> list[Path]:
    return [resolve_tokenizers(tokenizers)] if tokenizers is not None else default


def check_text_widths(cfg: mmdit.MMDiTConfig, text: SD3TextEncoders, source) -> None:
    """Refuse text encoders of another model here, not as a matmul error in the first step."""
    def pooled_width(model: CLIPTextModel) -> int:
        return model.config.projection_dim if model.text_projection is not None else model.config.width

    pooled = pooled_width(text.clip_l) + pooled_width(text.clip_g)
    states = text.clip_l.config.width + text.clip_g.config.width
    problems = []
    if pooled != cfg.pooled_dim:
        problems.append(f"their pooled outputs are {pooled} wide together, the MMDiT takes {cfg.pooled_dim}")
    if states > cfg.context_dim:
        problems.append(f"their hidden states are {states} wide together, more than the MMDiT's {cfg.context_dim}")
    if text.t5 is not None and text.t5.config.d_model != cfg.context_dim:
        problems.append(f"T5 is {text.t5.config.d_model} wide, the MMDiT takes {cfg.context_dim}")
    if problems:
        raise CheckpointError(f"the text encoders of {source} do not fit its MMDiT: {'; '.join(problems)}. Are they "
                              "from the same model release?")


def load_folder(path: Path, model_index: dict, *, device, dtype, vae, variant, model_config,
                components: dict, tokenizers=None) -> SD3Pipeline:
    skip_t5 = _skip_t5(components)
    if model_config:
        raise ConfigError(f"model_config ({', '.join(sorted(model_config))}) is for SD3 single files; the "
                          f"config.json files of {path} say it all for a diffusers folder")
    config, reader = open_component(path / "transformer", ("SD3Transformer2DModel",), mmdit.detect_layout,
                                    "SD3 transformer", variant)
    with naming(config):
        cfg = mmdit.MMDiTConfig.from_diffusers(config)
    places = _tokenizer_places(tokenizers, [path])
    has_t5 = isinstance(model_index.get("text_encoder_3"), list) and model_index["text_encoder_3"][0] is not None
    use_t5 = has_t5 and not skip_t5
    tokenizer_l, tokenizer_g = (sd3_files.load_tokenizer(places, p, single_file=False) for p in ("clip_l", "clip_g"))
    tokenizer_t5 = sd3_files.load_tokenizer(places, "t5xxl", single_file=False) if use_t5 else None

    transformer = build_transformer(cfg, reader, "diffusers", device=device, dtype=dtype)
    vae_module = resolve_vae(vae, path / "vae", dtype=dtype, device=device, variant=variant)
    scheduler = load_scheduler(path / "scheduler")
    text = SD3TextEncoders(
        clip_l=load_clip(path / "text_encoder", dtype=dtype, device=device, variant=variant),
        clip_g=load_clip(path / "text_encoder_2", dtype=dtype, device=device, variant=variant),
        tokenizer_l=tokenizer_l, tokenizer_g=tokenizer_g, t5_width=cfg.context_dim,
    )
    if use_t5:
        # T5 overflows in fp16: it computes in bf16 or fp32 (see models/t5.py).
        text.t5 = load_t5(path / "text_encoder_3", dtype=dtype, device=device, variant=variant)
        text.tokenizer_t5 = tokenizer_t5
    check_text_widths(cfg, text, path)
    return SD3Pipeline(transformer, vae_module, scheduler, text)


def load_file(path: Path, reader: WeightReader, *, device, dtype, vae, variant, model_config,
              components: dict, tokenizers=None) -> SD3Pipeline:
    """An original SD3 / SD3.5 single file with its text encoders (bundled or beside it in
    text_encoders/) and tokenizers (beside it, or `tokenizers`). Everything is located and
    checked before any weights are read, so a missing part fails at once."""
    skip_t5 = _skip_t5(components)
    model_config = with_recorded(path, model_config)  # what dite recorded in a file it converted
    hints = component_hints(model_config)
    prefix, cfg = _file_transformer_config(path, reader, model_config)
    vae_prefix = sd3_files.vae_prefix(reader.keys())
    if vae is None and vae_prefix is None:
        raise CheckpointError(f"{path} holds no VAE (no first_stage_model.* tensors): pass vae=PATH (CLI: --vae), "
                              "e.g. the vae/ folder of a diffusers SD3 folder")
    sources = _file_encoders(path, reader, skip_t5)
    places = _tokenizer_places(tokenizers, sd3_files.tokenizer_places(path))
    tokenizer_of = {part: sd3_files.load_tokenizer(places, part, single_file=True)
                    for part in sd3_files.TEXT_ENCODERS if sources[part] is not None}

    # Weights from here on.
    transformer = build_transformer(cfg, reader, "original", device=device, dtype=dtype, prefix=prefix,
                                    ignore=sd3_files.not_transformer(reader.keys(), prefix))
    if vae is not None:
        vae_module = resolve_vae(vae, None, dtype=dtype, device=device, variant=variant)
    elif hints["vae"] is not None:
        vae_module = load_vae(reader, config=hints["vae"], prefix=vae_prefix, dtype=dtype, device=device)
    else:  # the latent scaling is not in the shapes; SD3's VAE always uses these
        sd3 = VAEConfig.sd3()
        vae_module = load_vae(reader, prefix=vae_prefix, scaling_factor=sd3.scaling_factor,
                              shift_factor=sd3.shift_factor, dtype=dtype, device=device)
    text = _file_text_encoders(sources, tokenizer_of, hints, cfg, dtype=dtype, device=device)
    check_text_widths(cfg, text, path)
    return SD3Pipeline(transformer, vae_module, from_diffusers_config(recorded_scheduler(path) or SD3_SCHEDULER), text)


def _file_transformer_config(path: Path, reader: WeightReader, model_config: dict) -> tuple[str, mmdit.MMDiTConfig]:
    """(prefix, config) of a single file's MMDiT, from its shapes and what dite recorded."""
    prefix = sd3_files.transformer_prefix(reader.keys())
    if prefix is None:
        raise CheckpointError(
            f"{path} is a diffusers-layout SD3 transformer file without its folder; load the pipeline folder "
            "(with model_index.json) instead"
        )
    check_fields(model_config, "model_config", {"num_heads": "size"})
    cfg = mmdit.detect_config(sd3_files.transformer_shapes(reader, prefix), num_heads=model_config.get("num_heads"))
    return prefix, recorded_config(path, "transformer", cfg)


def _file_encoders(path: Path, reader: WeightReader, skip_t5: bool) -> dict:
    """Where each text encoder of a single file is ({part: EncoderSource or None}; T5 None
    when it is not used): both CLIPs or one line naming the missing ones; no T5 found (and
    not skipped) is a warning, and SD3 runs without it."""
    sources = {part: sd3_files.find_encoder(path, reader, part) for part in sd3_files.TEXT_ENCODERS}
    missing = [part for part in ("clip_l", "clip_g") if sources[part] is None]
    if missing:
        raise sd3_files.missing_encoders_error(path, missing)
    if sources["t5xxl"] is None and not skip_t5:
        files = " or ".join(sd3_files.SEPARATE_FILES["t5xxl"])
        warnings.warn(
            f"no T5 found for {path} (not bundled, and no {files} in "
            f"{' or '.join(map(str, sd3_files.encoder_folders(path)))}): running SD3 without T5, whose tokens "
            "become zeros (lower prompt adherence). Put the T5 file in text_encoders/ to use it, or pass "
            "text_encoder_3=None (CLI: --no-t5) to choose this mode", RunningWithoutT5Warning, stacklevel=4)
    if skip_t5:
        sources["t5xxl"] = None
    return sources


def _file_text_encoders(sources: dict, tokenizers: dict, hints: dict, cfg: mmdit.MMDiTConfig, *, dtype,
                        device) -> SD3TextEncoders:
    """The text encoders a single file's `sources` point at, with their tokenizers."""
    def encoder(load, part: str, hint: str):
        source = sources[part]
        return load(source.weights, prefix=source.prefix, config=hints[hint], dtype=dtype, device=device)

    text = SD3TextEncoders(
        # SD3 uses CLIP-L's pooled output unprojected (Stability's reference and ComfyUI do;
        # diffusers' single-file loader puts an identity projection in): a projection that
        # a file may carry is not applied.
        clip_l=without_projection(encoder(load_clip, "clip_l", "text_encoder")),
        clip_g=encoder(load_clip, "clip_g", "text_encoder_2"),
        tokenizer_l=tokenizers["clip_l"], tokenizer_g=tokenizers["clip_g"], t5_width=cfg.context_dim,
    )
    if sources["t5xxl"] is not None:
        text.t5 = encoder(load_t5, "t5xxl", "text_encoder_3")  # fp8 files are upcast; fp16 keeps wo in fp32
        text.tokenizer_t5 = tokenizers["t5xxl"]
    return text


def without_projection(model: CLIPTextModel) -> CLIPTextModel:
    model.text_projection = None
    model.config = replace(model.config, projection_dim=None)
    return model


