"""Loading DiT: the diffusers DiTPipeline folder and the original facebookresearch `.pt`."""

from __future__ import annotations

from pathlib import Path


from dite.engine.errors import CheckpointError, ConfigError
from dite.engine.pipeline_dit import DiTPipeline
from dite.engine.vae_loading import resolve_vae
from dite.engine.weights import WeightReader, build_module, open_component
from dite.models import dit
from dite.schedulers import by_name, load_scheduler

PIPELINE_CLASSES = ("DiTPipeline",)
TRANSFORMER_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")


def detect_file(keys) -> bool:
    return dit.detect_layout(keys) is not None


def build_transformer(cfg: dit.DiTConfig, reader: WeightReader, layout: str, *, device, dtype) -> dit.DiT:
    keymap, ignore = dit.keymap(cfg, layout)
    return build_module(lambda: dit.DiT(cfg), keymap, reader, ignore=ignore, dtype=dtype, device=device)


def load_folder(path: Path, model_index: dict, *, device, dtype, vae, variant, model_config,
                components: dict, tokenizers=None) -> DiTPipeline:
    _no_components(components, tokenizers)
    config, reader = open_component(path / "transformer", TRANSFORMER_CLASSES, dit.detect_layout,
                                    "DiT transformer", variant)
    cfg = dit.DiTConfig.from_diffusers(config)
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
    cfg = dit.detect_config(reader.shapes(), num_heads=model_config.get("num_heads"))
    unknown = set(model_config) - {"num_heads"}
    if unknown:
        raise ConfigError(f"model_config keys {sorted(unknown)} cannot be set for a DiT checkpoint (only num_heads)")
    transformer = build_transformer(cfg, reader, "original", device=device, dtype=dtype)
    if vae is None:
        raise ConfigError(
            f"{path} is an original DiT checkpoint, which has no VAE: pass vae=PATH (the DiT "
            "release uses stabilityai/sd-vae-ft-ema or sd-vae-ft-mse)"
        )
    return DiTPipeline(transformer, resolve_vae(vae, None, device=device, dtype=dtype, variant=variant),
                       original_scheduler(cfg))


def original_scheduler(cfg: dit.DiTConfig):
    """The original sampler: 1000-step linear-beta DDPM with the learned-range variance,
    respaced evenly (IDDPM's space_timesteps == diffusers' "linspace" spacing)."""
    return by_name("ddpm", timestep_spacing="linspace", clip_sample=False,
                   variance_type="learned_range" if cfg.learned_sigma else "fixed_small")


def _no_components(components: dict, tokenizers) -> None:
    if tokenizers is not None:
        raise ConfigError("a DiT pipeline is class-conditional and has no tokenizers: drop tokenizers=")
    if components:
        raise ConfigError(f"a DiT pipeline has no {', '.join(sorted(components))} to replace")
