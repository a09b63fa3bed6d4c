"""What a checkpoint file or folder holds, as components with their key maps.

`find_parts(path)` recognises every layout dite reads (docs/checkpoints.md §6): diffusers
pipeline folders (DiT, SD3), single component folders (config.json + weights), SD3 / SD3.5
original single files (with bundled or separate text encoders), original DiT `.pt`, and
bare VAE (LDM or diffusers names), CLIP (transformers or OpenCLIP names) and T5 files. Each
component gets the loader's own config detection and key map, so conversion and
`dite inspect` see a checkpoint exactly as `load()` does. Names and shapes only: no tensor
data is read here (except CLIP-L's small projection, to tell whether it is the identity).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from dite.engine.checkpoints.recognise import file_family, pipeline_family
from dite.engine.checkpoints.recorded import read_recorded, recorded_config, with_recorded
from dite.engine.loading import sd3_single_file as sd3_files
from dite.engine.errors import CheckpointError, ConfigError
from dite.engine.families import PIXART_VERSION_OF_PIPELINE, SD3_SCHEDULER
from dite.engine.loading.sd3_single_file import component_hints
from dite.engine.checkpoints.tensor_stream import Component
from dite.engine.loading.config_files import parsed, read_config, read_model_index
from dite.schedulers import read_scheduler_config
from dite.engine.loading.text_encoders import clip_parts, open_encoder, t5_parts
from dite.engine.loading.vae import vae_parts
from dite.engine.loading.weights import WeightReader, find_weights_file, open_weights
from dite.models import dit, mmdit, pixart
from dite.models.clip import CLIPTextConfig, clip_keymap, clip_layout, clip_prefixes, find_clip_prefix
from dite.models.sd3_releases import sd3_release
from dite.models.t5 import T5Config
from dite.models.vae import VAEConfig

SD3_ENCODER_NAMES = {"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5xxl": "text_encoder_3"}
# A family's anchor keys (suffixes), for "not a supported model; closest is ..." errors.
ANCHORS = {
    "sd3 (original)": ("joint_blocks.0.context_block.attn.qkv.weight", "x_embedder.proj.weight", "pos_embed",
                       "final_layer.adaLN_modulation.1.weight", "context_embedder.weight"),
    "sd3 (diffusers)": ("transformer_blocks.0.attn.add_q_proj.weight", "pos_embed.pos_embed", "norm_out.linear.weight",
                        "context_embedder.weight", "time_text_embed.text_embedder.linear_1.weight"),
    "dit (original)": ("y_embedder.embedding_table.weight", "blocks.0.adaLN_modulation.1.weight",
                       "x_embedder.proj.weight", "t_embedder.mlp.0.weight", "final_layer.linear.weight"),
    "dit (diffusers)": ("transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight", "proj_out_2.weight",
                        "proj_out_1.weight", "pos_embed.proj.weight", "transformer_blocks.0.attn1.to_q.weight"),
    "pixart": ("t_block.1.weight", "adaln_single.linear.weight", "caption_projection.linear_1.weight", "y_embedding"),
    "vae": ("decoder.conv_in.weight", "encoder.conv_in.weight", "decoder.conv_out.weight", "encoder.conv_out.weight"),
    "clip": ("embeddings.token_embedding.weight", "encoder.layers.0.self_attn.q_proj.weight", "final_layer_norm.weight",
             "token_embedding.weight", "transformer.resblocks.0.attn.in_proj_weight"),
    "t5": ("encoder.block.0.layer.0.SelfAttention.q.weight", "shared.weight", "encoder.final_layer_norm.weight",
           "encoder.block.0.layer.1.DenseReluDense.wi_0.weight"),
}


@dataclass
class Parts:
    """A recognised checkpoint: its family ("sd3", "dit", "vae", "clip", "t5"), the layout it
    is in ("original" or "diffusers"), and its components by diffusers name. `release`: the
    SD3 release ("sd3-medium", ...) or PixArt version ("alpha", "sigma"), written as the
    files' `variant` metadata."""

    family: str
    layout: str
    path: Path
    components: dict[str, Component]
    release: str | None = None
    tokenizer_places: list[Path] = field(default_factory=list)
    scheduler_config: dict | None = None
    model_index: dict | None = None
    notes: list[str] = field(default_factory=list)
    label: str = ""  # what written metadata calls the source: its name or hub id, never a local path

    def __post_init__(self):
        self.label = self.label or self.path.name


def _read_json(path: Path) -> dict:
    return read_config(path)


# ----------------------------------------------------------------------------- folders

# diffusers drops PixArt's learned null caption; conversion keeps it beside the weights.
PIXART_SIDE_FILE = "dite_null_caption.safetensors"


def pixart_component(reader: WeightReader, cfg, layout: str, side_file: Path | None = None) -> Component:
    keymap, ignore = pixart.keymap(cfg, layout)
    component = Component("transformer", "pixart", cfg, reader, keymap, set(ignore))
    if layout == "original" and pixart.NULL_CAPTION_KEY in reader.keys():
        component.side[pixart.NULL_CAPTION_KEY] = (reader, pixart.NULL_CAPTION_KEY)
    elif side_file is not None and side_file.exists():
        component.side[pixart.NULL_CAPTION_KEY] = (open_weights(side_file), pixart.NULL_CAPTION_KEY)
    return component


def _dit_component(reader: WeightReader, cfg: dit.DiTConfig, layout: str) -> Component:
    keymap, ignore = dit.keymap(cfg, layout)
    return Component("transformer", "dit", cfg, reader, keymap, set(ignore))


def _mmdit_component(reader: WeightReader, cfg: mmdit.MMDiTConfig, layout: str, prefix: str = "",
                     ignore=frozenset()) -> Component:
    keymap, own = mmdit.keymap(cfg, layout, prefix)
    return Component("transformer", "mmdit", cfg, reader, keymap, set(own) | set(ignore))


def _vae_component(reader: WeightReader, name: str = "vae", **options) -> Component:
    config, keymap, ignore = vae_parts(reader, **options)
    return Component(name, "vae", config, reader, keymap, ignore)


def _clip_component(reader: WeightReader, name: str, **options) -> Component:
    config, keymap, ignore = clip_parts(reader, **options)
    return Component(name, "clip", config, reader, keymap, ignore)


def _t5_component(reader: WeightReader, name: str, **options) -> Component:
    config, keymap, ignore = t5_parts(reader, **options)
    return Component(name, "t5", config, reader, keymap, ignore)


def component_folder(folder: Path, name: str | None = None, variant: str | None = None,
                     pixart_version: str | None = None, *, mmap: bool = True) -> Component:
    """One diffusers / transformers component folder (config.json + weights); `mmap`: how
    the few tensors recognition reads are read (WeightReader.get)."""
    config = _read_json(folder / "config.json")
    name = name or folder.name
    cls = config.get("_class_name") or next(iter(config.get("architectures") or []), None)
    if cls == "AutoencoderKL":
        reader = open_weights(find_weights_file(folder, variant=variant))
        return _vae_component(reader, name, config=parsed(config, VAEConfig.from_diffusers))
    if cls in ("DiTTransformer2DModel", "Transformer2DModel"):
        reader = open_weights(find_weights_file(folder, variant=variant))
        cfg = dit.fit_embedders(parsed(config, dit.DiTConfig.from_diffusers), reader.keys(),
                                lambda key: reader.get(key, mmap=mmap))
        return _dit_component(reader, cfg, "diffusers")
    if cls == "PixArtTransformer2DModel":
        reader = open_weights(find_weights_file(folder, variant=variant))
        cfg = parsed(config, lambda c: pixart.PixArtConfig.from_diffusers(c, pixart_version or "alpha"))
        return pixart_component(reader, cfg, "diffusers", side_file=folder / PIXART_SIDE_FILE)
    if cls == "SD3Transformer2DModel":
        reader = open_weights(find_weights_file(folder, variant=variant))
        return _mmdit_component(reader, parsed(config, mmdit.MMDiTConfig.from_diffusers), "diffusers")
    if cls in ("CLIPTextModel", "CLIPTextModelWithProjection", "CLIPModel"):
        reader, folder_config = open_encoder(folder, variant)
        return _clip_component(reader, name, folder_config=folder_config, prefix="")
    if cls in ("T5EncoderModel", "T5ForConditionalGeneration", "T5Model"):
        reader, folder_config = open_encoder(folder, variant)
        return _t5_component(reader, name, folder_config=folder_config, prefix="")
    raise ConfigError(f"{folder} holds a {cls!r}, which dite does not convert (supported: AutoencoderKL, "
                      "DiTTransformer2DModel, SD3Transformer2DModel, CLIPTextModel[WithProjection], T5EncoderModel)")


def _pipeline_folder(path: Path, variant: str | None, mmap: bool) -> Parts:
    index = read_model_index(path)
    family = pipeline_family(path / "model_index.json", index).name
    cls = index.get("_class_name")
    components = {}
    for name, spec in index.items():
        weighted = name in ("transformer", "vae") or name.startswith("text_encoder")
        if weighted and isinstance(spec, list) and spec[0] is not None and (path / name).is_dir():
            components[name] = component_folder(path / name, name, variant, PIXART_VERSION_OF_PIPELINE.get(cls),
                                                mmap=mmap)
    parts = Parts(family, "diffusers", path, components, model_index=index, tokenizer_places=[path])
    if family == "sd3" and "transformer" in components:
        parts.release = sd3_release(components["transformer"].config)
    if family == "pixart":
        parts.release = PIXART_VERSION_OF_PIPELINE[cls]
    scheduler = path / "scheduler" / "scheduler_config.json"
    parts.scheduler_config = read_scheduler_config(scheduler) if scheduler.exists() else None
    return parts


# ----------------------------------------------------------------------------- files

def _dit_file(path: Path, reader: WeightReader, model_config: dict, tokenizers: Path | None) -> Parts:
    """An original DiT checkpoint: the transformer alone (its VAE is a separate release)."""
    _only(model_config, ("num_heads",), "a DiT checkpoint")
    cfg = dit.detect_config(reader.shapes(), num_heads=model_config.get("num_heads"))
    cfg = recorded_config(path, "transformer", cfg)
    return _recorded_pipeline(Parts("dit", "original", path, {"transformer": _dit_component(reader, cfg, "original")}))


def _sd3_file(path: Path, reader: WeightReader, model_config: dict, tokenizers: Path | None) -> Parts:
    """An SD3 / SD3.5 release file and the text encoders beside it (engine/loading/sd3_single_file.py)."""
    hints = component_hints(model_config)
    keys = reader.keys()
    prefix = sd3_files.transformer_prefix(keys)
    cfg = mmdit.detect_config(sd3_files.transformer_shapes(reader, prefix), num_heads=model_config.get("num_heads"))
    cfg = recorded_config(path, "transformer", cfg)
    components = {"transformer": _mmdit_component(reader, cfg, "original", prefix,
                                                   sd3_files.not_transformer(keys, prefix))}
    vae_prefix = sd3_files.vae_prefix(keys)
    if vae_prefix is not None:
        sd3 = VAEConfig.sd3()  # the latent scaling is not in the shapes; every SD3 VAE uses these
        options = {"config": hints["vae"]} if hints["vae"] is not None else {
            "scaling_factor": sd3.scaling_factor, "shift_factor": sd3.shift_factor}
        vae = _vae_component(reader, prefix=vae_prefix, **options)
        vae.ignore |= {k for k in keys if not k.startswith(vae_prefix)}
        components["vae"] = vae
    for part, name in SD3_ENCODER_NAMES.items():
        source = sd3_files.find_encoder(path, reader, part)
        if source is None:
            continue
        weights = source.weights if isinstance(source.weights, WeightReader) else open_weights(source.weights)
        if part == "t5xxl":
            component = _t5_component(weights, name, config=hints[name], prefix=source.prefix)
        else:
            prefix = source.prefix if source.prefix is not None else find_clip_prefix(weights.keys())
            component = _clip_component(weights, name, config=hints[name], prefix=prefix)
            if part == "clip_l":
                sd3_clip_l_projection(component, prefix)
        components[name] = component
    places = [tokenizers] if tokenizers is not None else sd3_files.tokenizer_places(path)
    return _recorded_pipeline(Parts("sd3", "original", path, components, release=sd3_release(cfg),
                                    tokenizer_places=places, scheduler_config=dict(SD3_SCHEDULER)))


def _recorded_pipeline(parts: Parts) -> Parts:
    """A file dite wrote from a pipeline folder goes back to that folder's scheduler and
    model_index (engine/checkpoints/recorded.py)."""
    recorded = read_recorded(parts.path)
    if recorded is not None:
        parts.scheduler_config = recorded.scheduler or parts.scheduler_config
        parts.model_index = recorded.model_index
    return parts


def _only(model_config: dict, allowed: tuple[str, ...], what: str) -> None:
    unknown = sorted(set(model_config) - set(allowed))
    if unknown:
        raise ConfigError(f"model_config keys {unknown} cannot be set for {what}; it takes "
                          f"{', '.join(allowed) or 'none'}")


def sd3_clip_l_projection(component: Component, prefix: str) -> None:
    """SD3 uses CLIP-L's pooled output unprojected (Stability's reference; diffusers' single-
    file loader installs an identity projection). A diffusers folder needs a projection
    layer, so it gets the identity; a projection stored in the file is not used by any SD3
    loader and is left out, with a note."""
    keys = component.reader.keys()
    stored = component.keymap.get("text_projection.weight")
    component.config = replace(component.config, projection_dim=component.config.width)
    keymap, _ = clip_keymap(component.config, clip_layout(keys, prefix), keys, prefix)
    del keymap["text_projection.weight"]
    component.keymap = keymap
    component.synthesized["text_projection.weight"] = torch.eye(component.config.width)
    if stored is not None:
        component.ignore |= set(stored.keys)
        component.notes.append(f"{stored.keys[0]} left out: SD3 never applies CLIP-L's projection (the reference "
                               "uses the pooled output as is); the diffusers folder gets the identity, which "
                               "diffusers' single-file loader installs too")


def _single_file(path: Path, model_config: dict, tokenizers: Path | None) -> Parts:
    reader = open_weights(path)
    keys = reader.keys()
    model_config = with_recorded(path, model_config)  # what dite recorded when it wrote the file
    found = file_family(keys)
    if found is not None:
        family, layout = found
        if layout == "diffusers":
            raise CheckpointError(f"{path} is a diffusers-layout transformer without its config.json; convert the "
                                  "folder that holds it (config.json + weights), or the pipeline folder")
        read = {"sd3": _sd3_file, "pixart": _pixart_file, "dit": _dit_file}[family.name]
        return read(path, reader, model_config, tokenizers)
    if sd3_files.vae_prefix(keys) is not None and not clip_prefixes(keys):
        _only(model_config, ("vae",), "a VAE file")
        hint = model_config.get("vae")
        options = {"config": hint if isinstance(hint, VAEConfig) else VAEConfig.from_diffusers(hint)} if isinstance(
            hint, (dict, VAEConfig)) else {}
        return Parts("vae", _vae_layout_name(reader), path, {"vae": _vae_component(reader, **options)})
    # model_config["text_encoder"]: its transformers config.json, for sizes no release has.
    if clip_prefixes(keys):
        _only(model_config, ("text_encoder",), "a CLIP file")
        component = _clip_component(reader, "text_encoder", **_encoder_hint(model_config, CLIPTextConfig))
        return Parts("clip", "original", path, {"text_encoder": component})
    if any(k.endswith("encoder.block.0.layer.0.SelfAttention.q.weight") for k in keys):
        _only(model_config, ("text_encoder",), "a T5 file")
        component = _t5_component(reader, "text_encoder", **_encoder_hint(model_config, T5Config))
        return Parts("t5", "original", path, {"text_encoder": component})
    raise unsupported(path, keys)


def _encoder_hint(model_config: dict, kind) -> dict:
    """model_config["text_encoder"] for clip_parts / t5_parts: a dite config (recorded by
    dite) or the encoder's transformers config.json."""
    hint = model_config.get("text_encoder")
    if hint is None:
        return {}
    if isinstance(hint, kind):
        return {"config": hint}
    if isinstance(hint, dict):
        return {"folder_config": hint}
    raise ConfigError(f"model_config['text_encoder'] must be the encoder's config.json (a dict), not "
                      f"{type(hint).__name__}")


def _pixart_file(path: Path, reader: WeightReader, model_config: dict, tokenizers: Path | None) -> Parts:
    """An original PixArt .pth, with the T5, tokenizer and VAE folders `load()` finds beside it."""
    from dite.engine.families import PIXART_SCHEDULER
    from dite.engine.loading.pixart_files import beside as _beside

    _only(model_config, ("num_heads", "variant", "sample_size"), "a PixArt checkpoint")
    cfg = pixart.detect_config(reader.shapes(), num_heads=model_config.get("num_heads"),
                               pixart_version=model_config.get("variant"), sample_size=model_config.get("sample_size"))
    cfg = recorded_config(path, "transformer", cfg)
    components = {"transformer": pixart_component(reader, cfg, "original")}
    encoder, vae = _beside(path, "text_encoder"), _beside(path, "vae", cfg.pixart_version)
    if encoder is not None:
        components["text_encoder"] = component_folder(encoder, "text_encoder")
    if vae is not None:
        components["vae"] = component_folder(vae, "vae")
        components["vae"].config = replace(components["vae"].config, scaling_factor=pixart.VAE_SCALE[cfg.pixart_version])
    places = [tokenizers] if tokenizers is not None else [path.parent]
    return _recorded_pipeline(Parts("pixart", "original", path, components, release=cfg.pixart_version,
                                    tokenizer_places=places, scheduler_config=dict(PIXART_SCHEDULER)))


def _vae_layout_name(reader: WeightReader) -> str:
    from dite.models.vae import find_vae_prefix, vae_layout

    return "original" if vae_layout(reader.keys(), find_vae_prefix(reader.keys())) == "ldm" else "diffusers"


def unsupported(path: Path, keys: list[str]) -> CheckpointError:
    """"Not a supported model", with the family whose anchor keys it shares most and which it lacks."""
    def present(anchor: str) -> bool:
        return any(k == anchor or k.endswith("." + anchor) for k in keys)

    scores = {family: [a for a in anchors if present(a)] for family, anchors in ANCHORS.items()}
    family, found = max(scores.items(), key=lambda item: len(item[1]) / len(ANCHORS[item[0]]))
    sample = ", ".join(sorted(keys)[:3]) or "no tensors"
    if not found:
        return CheckpointError(f"{path} is not a supported model: none of its {len(keys)} tensors ({sample}, ...) "
                               "looks like DiT, SD3, PixArt, a VAE, CLIP or T5")
    lacking = [a for a in ANCHORS[family] if a not in found]
    return CheckpointError(f"{path} is not a supported model: closest is {family}, which it shares "
                           f"{len(found)} of {len(ANCHORS[family])} anchor tensors with ({', '.join(found)}) but "
                           f"lacks {', '.join(lacking)}")


def find_parts(path: str | Path, *, model_config: dict | None = None, tokenizers: str | Path | None = None,
               variant: str | None = None, mmap: bool = True) -> Parts:
    """Recognise the checkpoint at `path` (a local file or folder). `mmap`: how the few
    tensors recognition reads are read (WeightReader.get)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        if model_config:
            raise ConfigError(f"model_config is for single checkpoint files; {path} is a folder, whose config.json "
                              "files say it all: drop it (--model-config)")
        if (path / "model_index.json").exists():
            return _pipeline_folder(path, variant, mmap)
        if (path / "config.json").exists():
            component = component_folder(path, variant=variant, mmap=mmap)
            family = {"dit": "dit", "mmdit": "sd3"}.get(component.kind, component.kind)
            if component.kind == "pixart":
                return Parts("pixart", "diffusers", path, {component.name: component},
                             release=component.config.pixart_version)
            return Parts(family, "diffusers", path, {component.name: component})
        raise CheckpointError(f"{path} has neither model_index.json (a pipeline folder) nor config.json (a component "
                              "folder)")
    return _single_file(path, model_config or {}, Path(tokenizers) if tokenizers is not None else None)
