"""Loading DiT: the diffusers DiTPipeline folder and the original facebookresearch `.pt`."""

from __future__ import annotations

from pathlib import Path


from dite.engine.errors import CheckpointError, ConfigError
from dite.engine.checkpoints.recorded import recorded_config, recorded_id2label, recorded_scheduler, with_recorded
from dite.engine.families import DIT, original_dit_scheduler_config
from dite.engine.pipelines.dit import DiTPipeline
from dite.engine.loading.config_files import naming
from dite.engine.loading.vae import resolve_vae
from dite.engine.loading.weights import WeightReader, build_module, open_component
from dite.models import dit
from dite.models.config_fields import check_fields
from dite.schedulers import from_diffusers_config, load_scheduler

TRANSFORMER_CLASSES = DIT.transformer_classes


def build_transformer(cfg: dit.DiTConfig, reader: WeightReader, layout: str, *, device, dtype) -> dit.DiT:
    keymap, ignore = dit.keymap(cfg, layout)
    return build_module(lambda: dit.DiT(cfg), keymap, reader, ignore=ignore, dtype=dtype, device=device)


def load_folder(path: Path, model_index: dict, *, device, dtype, vae, variant, model_config,
                components: dict, tokenizers=None) -> DiTPipeline:
    _no_components(components, tokenizers)
    if model_config:
        raise ConfigError(f"model_config ({', '.join(sorted(model_config))}) is for original DiT .pt files; "
                          f"{path / 'transformer' / 'config.json'} says it all for a diffusers folder")
    config, reader = open_component(path / "transformer", TRANSFORMER_CLASSES, dit.detect_layout,
                                    "DiT transformer", variant)
    with naming(config):
        cfg = dit.DiTConfig.from_diffusers(config)
    # Untied per-block embedders (a model made in diffusers) get one per block; tied, one.
    cfg = dit.fit_embedders(cfg, reader.keys(), reader.get)
    transformer = build_transformer(cfg, reader, "diffusers", device=device, dtype=dtype)
    vae_module = resolve_vae(vae, path / "vae", device=device, dtype=dtype, variant=variant)
    scheduler = load_scheduler(path / "scheduler")
    return DiTPipeline(transformer, vae_module, scheduler, id2label=model_index.get("id2label"))


def load_file(path: Path, reader: WeightReader, *, device, dtype, vae, variant, model_config,
              components: dict, tokenizers=None) -> DiTPipeline:
    _no_components(components, tokenizers)
    layout = dit.detect_layout(reader.keys())
    if layout != "original":
        raise CheckpointError(
            f"{path} is a diffusers-layout DiT transformer file without its folder; load the "
            "pipeline folder (with model_index.json) instead"
        )
    unknown = set(model_config) - {"num_heads"}
    if unknown:
        raise ConfigError(f"model_config keys {sorted(unknown)} cannot be set for a DiT checkpoint (only num_heads)")
    check_fields(model_config, "model_config", {"num_heads": "size"})
    model_config = with_recorded(path, model_config)  # what dite recorded in a file it converted
    cfg = dit.detect_config(reader.shapes(), num_heads=model_config.get("num_heads"))
    cfg = recorded_config(path, "transformer", cfg)
    transformer = build_transformer(cfg, reader, "original", device=device, dtype=dtype)
    if vae is None:
        raise ConfigError(
            f"{path} is an original DiT checkpoint, which has no VAE: pass vae=PATH (the DiT "
            "release uses stabilityai/sd-vae-ft-ema or sd-vae-ft-mse)"
        )
    recorded = recorded_scheduler(path)
    return DiTPipeline(transformer, resolve_vae(vae, None, device=device, dtype=dtype, variant=variant),
                       from_diffusers_config(recorded) if recorded else original_scheduler(cfg),
                       id2label=recorded_id2label(path))


def original_scheduler(cfg: dit.DiTConfig):
    """The original sampler: 1000-step linear-beta DDPM with the learned-range variance,
    respaced evenly (IDDPM's space_timesteps == diffusers' "linspace" spacing)."""
    return from_diffusers_config(original_dit_scheduler_config(cfg.learned_sigma))


def _no_components(components: dict, tokenizers) -> None:
    if tokenizers is not None:
        raise ConfigError("a DiT pipeline is class-conditional and has no tokenizers: drop tokenizers=")
    if components:
        raise ConfigError(f"a DiT pipeline has no {', '.join(sorted(components))} to replace")
