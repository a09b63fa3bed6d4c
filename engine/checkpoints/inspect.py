"""`dite inspect`: what a model source is, read from configs and tensor headers only.

Nothing is built and no tensor data is read, so inspecting a 16 GB checkpoint is instant.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from dite.engine.loading import sd3_single_file as sd3_files
from dite.engine.checkpoints.recognise import file_family, local_path, pipeline_family
from dite.engine.checkpoints.recorded import RecordedMetadataError, read_recorded, with_recorded
from dite.engine.errors import CheckpointError, ConfigError, DiteError
from dite.engine.families import PIXART_VERSION_OF_PIPELINE
from dite.engine.loading.config_files import parse_config, read_model_index
from dite.engine.checkpoints.inspect_parts import describe_parts
from dite.engine.loading.weights import WeightReader, find_weights_file, open_weights
from dite.models import dit, mmdit, pixart
from dite.models.sd3_releases import sd3_release


def _tensor_summary(reader: WeightReader) -> dict[str, Any]:
    shapes = reader.shapes()
    count = 0
    for shape in shapes.values():
        n = 1
        for s in shape:
            n *= s
        count += n
    dtypes = Counter(reader.dtype(k) for k in shapes)
    return {"tensors": len(shapes), "parameters": count, "dtypes": dict(dtypes)}


def inspect_source(source: str, *, variant: str | None = None, model_config: dict | None = None) -> dict[str, Any]:
    """What `source` is (family, layout, config, parts) and, per component (engine/
    inspect_parts.py), its kind, config, dtypes, parameter count and any missing,
    unexpected or mis-shaped keys. Files no family claims get the closest family and why.
    model_config: what shapes cannot tell, as for `load()` (e.g. a custom width's num_heads).
    `source` may also be a demo model name (demo-sd3, demo-dit). What dite recorded in a file
    it converted (engine/checkpoints/recorded.py) is used and shown under "recorded"; a
    model_config that contradicts it is refused."""
    path = local_path(source, variant=variant)
    recorded = None
    if path.is_file():
        model_config = with_recorded(path, model_config)
        recorded = read_recorded(path)
    elif model_config:
        raise ConfigError(f"model_config is for single checkpoint files; {path} is a folder, whose config.json "
                          "files say it all: drop it (--model-config)")
    if path.is_dir() and not (path / "model_index.json").exists() and (path / "config.json").exists():
        return {"source": str(source), "format": "component folder", **describe_parts(path, variant=variant)}
    try:
        info = _inspect_source(source, path, variant=variant)
    except CheckpointError as exc:
        if "not a checkpoint dite recognises" not in str(exc):
            raise
        return {"source": str(source), "format": "single file", **describe_parts(path, model_config=model_config)}
    if recorded is not None:
        info["recorded"] = {"source": recorded.source, "dite_version": recorded.version,
                            **({"scheduler_config": recorded.scheduler} if recorded.scheduler else {})}
    try:
        parts = describe_parts(path, variant=variant, model_config=model_config)
    except RecordedMetadataError:
        raise
    except DiteError as exc:  # e.g. sizes no release has: the summary above still stands
        info["components_error"] = str(exc)
        return info
    components = info.setdefault("components", {})
    for name, summary in parts["components"].items():
        components.setdefault(name, {}).update(summary)
    if "transformer" in parts["components"]:  # model_config or the record told what shapes cannot
        info.pop("config_error", None)
        info["config"] = parts["components"]["transformer"]["config"]
    if parts.get("clean") is False:
        info["clean"] = False
    return info


def _inspect_source(source: str, path: Path, *, variant: str | None = None) -> dict[str, Any]:
    if path.is_dir():
        index = path / "model_index.json"
        if not index.exists():
            raise CheckpointError(f"{path} has no model_index.json (not a diffusers pipeline folder)")
        model_index = read_model_index(index)
        info: dict[str, Any] = {"source": str(source), "format": "diffusers folder",
                                "pipeline": model_index.get("_class_name"), "components": {}}
        family = pipeline_family(index, model_index).name
        info["family"] = family
        if family == "dit":
            info["config"] = parse_config(path / "transformer/config.json", dit.DiTConfig.from_diffusers).to_dict()
        elif family == "sd3":
            cfg = parse_config(path / "transformer/config.json", mmdit.MMDiTConfig.from_diffusers)
            info["variant"], info["config"] = sd3_release(cfg), cfg.to_dict()
        else:
            pixart_version = PIXART_VERSION_OF_PIPELINE[model_index["_class_name"]]
            cfg = parse_config(path / "transformer/config.json",
                               lambda c: pixart.PixArtConfig.from_diffusers(c, pixart_version))
            info.update(_pixart_summary(cfg))
        for name, spec in model_index.items():
            if name.startswith("_") or not isinstance(spec, list) or not (path / name).is_dir():
                continue
            entry: dict[str, Any] = {"class": spec[-1]}
            try:
                entry.update(_tensor_summary(open_weights(find_weights_file(path / name, variant=variant))))
            except CheckpointError:
                pass  # schedulers and tokenizers have no weights
            info["components"][name] = entry
        return info
    reader = open_weights(path)
    found = file_family(reader.keys())
    if found is None:
        raise CheckpointError(f"{path}: not a checkpoint dite recognises")
    family, layout = found
    if family.name == "sd3":
        return {"source": str(source), **_sd3_file(path, reader), **_tensor_summary(reader)}
    if family.name == "pixart":
        return {"source": str(source), **_pixart_file(reader), **_tensor_summary(reader)}
    info = {"source": str(source), "format": "single file", "family": "dit", "layout": layout}
    if layout == "original":
        try:
            info["config"] = dit.detect_config(reader.shapes()).to_dict()
        except Exception as exc:  # a non-standard width: report what is known
            info["config_error"] = str(exc)
    info.update(_tensor_summary(reader))
    return info


def _sd3_file(path: Path, reader: WeightReader) -> dict[str, Any]:
    """An SD3 single file: its MMDiT config and release, and where its other parts are."""
    keys = reader.keys()
    prefix = sd3_files.transformer_prefix(keys)
    if prefix is None:
        return {"format": "single file", "family": "sd3", "layout": "diffusers"}
    info: dict[str, Any] = {"format": "single file", "family": "sd3", "layout": "original"}
    try:
        cfg = mmdit.detect_config(sd3_files.transformer_shapes(reader, prefix))
        info["variant"], info["config"] = sd3_release(cfg), cfg.to_dict()
    except Exception as exc:  # a non-standard width: report what is known
        info["config_error"] = str(exc)
    vae = sd3_files.vae_prefix(keys)
    parts = {"transformer": f"{prefix}*", "vae": f"{vae}*" if vae is not None else "missing (pass --vae)"}
    for part in sd3_files.TEXT_ENCODERS:
        source = sd3_files.find_encoder(path, reader, part)
        parts[part] = "missing" if source is None else source.where
    info["parts"] = parts
    return info


def _pixart_summary(cfg: pixart.PixArtConfig) -> dict[str, Any]:
    """The PixArt version (alpha / sigma, key "variant"), the training resolution in pixels and
    the config."""
    return {"variant": cfg.pixart_version, "resolution": cfg.sample_size * 8, "config": cfg.to_dict()}


def _pixart_file(reader: WeightReader) -> dict[str, Any]:
    layout = pixart.detect_layout(reader.keys())
    info: dict[str, Any] = {"format": "single file", "family": "pixart", "layout": layout}
    if layout == "original":
        try:
            info.update(_pixart_summary(pixart.detect_config(reader.shapes())))
        except Exception as exc:  # no null caption, a non-standard width: report what is known
            info["config_error"] = str(exc)
    return info
