"""Loading a VAE from a diffusers `vae/` folder or a single weights file (any layout).

Kept out of `dite.models.vae` because models do not read files: they only say how their
checkpoints are named (`detect_vae`, `vae_keymap`); this module does the reading.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from dite.engine.loading.config_files import parse_config
from dite.engine.loading.weights import WeightReader, load_weights, open_weights
from dite.models.checkpoint import KeyMap
from dite.models.vae import AutoencoderKL, VAEConfig, detect_vae, find_vae_prefix, vae_keymap, vae_layout, with_scaling


def load_vae(
    path_or_reader: str | os.PathLike | WeightReader,
    *,
    config: VAEConfig | None = None,
    scaling_factor: float | None = None,
    shift_factor: float | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    prefix: str | None = None,
) -> AutoencoderKL:
    """An AutoencoderKL with its weights, in eval mode.

    `path_or_reader`: a diffusers `vae/` folder (its config.json is authoritative), a
    pipeline folder holding `vae/`, a single weights file (diffusers or LDM names, bare or
    under `first_stage_model.` / `vae.`, e.g. an SD3 single-file release), or an open
    reader. Without a config.json the config is detected from shapes, and the latent
    scaling, which shapes cannot tell, defaults by latent channels (see `detect_vae`):
    pass `scaling_factor` for the SDXL VAE (0.13025). Explicit `scaling_factor` /
    `shift_factor` override any config.
    """
    if isinstance(path_or_reader, WeightReader):
        reader = path_or_reader
    else:
        path = Path(path_or_reader)
        if path.is_dir() and not (path / "config.json").exists() and (path / "vae").is_dir():
            path = path / "vae"
        if config is None and path.is_dir() and (path / "config.json").exists():
            config = parse_config(path / "config.json", VAEConfig.from_diffusers, "VAE config")
        reader = open_weights(path)

    config, keymap, ignore = vae_parts(reader, config=config, scaling_factor=scaling_factor,
                                       shift_factor=shift_factor, prefix=prefix)
    with torch.device("meta"):
        vae = AutoencoderKL(config)
    return load_weights(vae, keymap, reader, ignore=ignore, dtype=dtype, device=device)


def vae_parts(reader: WeightReader, *, config: VAEConfig | None = None, scaling_factor: float | None = None,
              shift_factor: float | None = None, prefix: str | None = None) -> tuple[VAEConfig, KeyMap, set[str]]:
    """(config, key map, keys to ignore) of the VAE in `reader` under `prefix` (found if
    None); the config detected from shapes unless given. Shared by loading and conversion."""
    keys = reader.keys()
    prefix = find_vae_prefix(keys) if prefix is None else prefix
    layout = vae_layout(keys, prefix)
    if config is None:
        shapes = {k: reader.shape(k) for k in keys if k.startswith(prefix)}
        config, _ = detect_vae(keys, shapes, prefix=prefix, scaling_factor=scaling_factor, shift_factor=shift_factor)
    config = with_scaling(config, scaling_factor, shift_factor)
    keymap, ignore = vae_keymap(config, layout, keys, prefix)
    return config, keymap, ignore


def resolve_vae(vae, default: Path | None, *, dtype: torch.dtype, device, variant: str | None = None) -> AutoencoderKL:
    """A pipeline's VAE: a given module as is, a given path or hub id loaded, else `default`
    (the pipeline folder's own `vae/`)."""
    from dite.engine.errors import CheckpointError
    from dite.engine.loading.hub import resolve_source

    if isinstance(vae, AutoencoderKL):
        return vae
    source = resolve_source(vae, variant=variant) if vae is not None else default
    if source is None or not Path(source).exists():
        raise CheckpointError(f"no VAE found at {source}")
    return load_vae(source, dtype=dtype, device=device)
