"""The layouts conversion writes, per component kind: the family's own key map for that
layout (so writing is the loader's reading run backwards), the config file that goes with
it, and what the layout stores that the module does not (DiT's position table).

diffusers / transformers layout: one folder per component (config.json + weights named
`diffusion_pytorch_model` or `model`). Original layout: the names of the release files,
under the prefixes of an SD3 single file when bundled (docs/checkpoints.md §1.2).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from dite.engine.checkpoints.tensor_stream import Component, Target
from dite.models import dit, mmdit, pixart
from dite.models.clip import clip_keymap
from dite.models.layers import sincos_pos_embed_2d
from dite.models.t5 import t5_keymap
from dite.models.vae import vae_keymap

DIFFUSERS_VERSION = "0.42.1"  # the diffusers version whose folders these match (tests load them with it)
TRANSFORMERS_VERSION = "5.23.0"
# Prefixes of the parts of an SD3 single file (engine/loading/sd3_single_file.py reads them back).
SD3_PREFIX = {"transformer": "model.diffusion_model.", "vae": "first_stage_model.",
              "text_encoder": "text_encoders.clip_l.transformer.", "text_encoder_2": "text_encoders.clip_g.transformer.",
              "text_encoder_3": "text_encoders.t5xxl.transformer."}
WEIGHTS_STEM = {"dit": "diffusion_pytorch_model", "mmdit": "diffusion_pytorch_model", "pixart": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
                "clip": "model", "t5": "model"}


def diffusers_config(component: Component) -> dict:
    """The config.json of `component` in its diffusers / transformers folder."""
    cfg = component.config
    if component.kind == "dit":
        # diffusers' DiT fixes the timestep divisor shift at 1 (the original uses 0); the
        # same weights, diffusers' own numerics (README: Numerics worth knowing).
        config = replace(cfg, freq_shift=1.0).to_diffusers()
    elif component.kind in ("mmdit", "vae", "pixart"):
        config = cfg.to_diffusers()
    else:
        config = {**cfg.to_transformers(), "transformers_version": TRANSFORMERS_VERSION}
        return config
    return {"_diffusers_version": DIFFUSERS_VERSION, **config}


def diffusers_target(component: Component) -> Target:
    cfg = component.config
    if component.kind == "dit":
        return Target(dit.keymap(cfg, "diffusers")[0])
    if component.kind == "mmdit":
        return Target(mmdit.keymap(cfg, "diffusers")[0])
    if component.kind == "pixart":
        return Target(pixart.keymap(cfg, "diffusers")[0])
    if component.kind == "vae":
        return Target(vae_keymap(cfg, "diffusers", [])[0])
    if component.kind == "clip":
        return Target(clip_keymap(cfg, "transformers", [])[0])
    # transformers ties T5's encoder.embed_tokens to `shared`: one stored copy.
    return Target(t5_keymap(cfg, ["shared.weight"])[0])


def original_target(component: Component, prefix: str = "", *, mmap: bool = True) -> Target:
    """`component` in its release names under `prefix` ("" for a file of its own); `mmap`:
    how stored extras are read (WeightReader.get)."""
    cfg = component.config
    if component.kind == "dit":
        # The original keeps its fixed sin-cos table as a (non-trainable) parameter, so its
        # code loads only state dicts that have it.
        side = cfg.input_size // cfg.patch_size
        table = sincos_pos_embed_2d(cfg.hidden_size, side, side).unsqueeze(0)
        return Target(dit.keymap(cfg, "original")[0], extras={"pos_embed": table})
    if component.kind == "mmdit":
        return Target(mmdit.keymap(cfg, "original", prefix)[0])
    if component.kind == "pixart":
        # The original stores its training-size position table and the learned null caption.
        side = cfg.sample_size // cfg.patch_size
        table = sincos_pos_embed_2d(cfg.hidden_size, side, side, base_size=side,
                                    interpolation_scale=cfg.interpolation_scale).unsqueeze(0)
        extras = {"pos_embed": table}
        extras.update({key: reader.get(stored, mmap=mmap) for key, (reader, stored) in component.side.items()})
        return Target(pixart.keymap(cfg, "original")[0], extras=extras)
    if component.kind == "vae":
        return Target(vae_keymap(cfg, "ldm", [], prefix)[0])
    if component.kind == "clip":
        return Target(clip_keymap(cfg, "transformers", [], prefix)[0])
    # Stability's bundled T5 holds the embedding under both names (diffusers' single-file
    # loader reads encoder.embed_tokens); a file of its own holds `shared` only.
    names = ["shared.weight", "encoder.embed_tokens.weight"] if prefix else ["shared.weight"]
    return Target(t5_keymap(cfg, [prefix + n for n in names], prefix)[0])


def is_identity(tensor: torch.Tensor) -> bool:
    return tensor.dim() == 2 and tensor.shape[0] == tensor.shape[1] and torch.equal(
        tensor.float(), torch.eye(tensor.shape[0]))


def fp32_only(component: Component, dtype: torch.dtype | None):
    """Keys that stay fp32 under an fp16 `dtype`: T5's feed-forward output weights, which
    transformers and dite keep (and compute) in fp32 because T5-XXL overflows fp16 there."""
    if component.kind != "t5" or dtype != torch.float16:
        return lambda key: False
    return lambda key: key.endswith("DenseReluDense.wo.weight")
