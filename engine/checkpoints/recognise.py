"""What a model source is: the one recogniser that `load()`, `convert()` and `dite inspect`
(and the CLI's early family check) all ask.

A source is a demo model name, a local folder or file, or a hub repo id (`local_path`
resolves the last to its downloaded snapshot). A diffusers pipeline folder names its family
in model_index.json (`pipeline_family`); a single file's tensor names tell the family and
layout of the denoiser it holds (`file_family`: an original release, SD3's under its
single-file prefix too, or a bare diffusers-layout transformer). Only model_index.json and
tensor headers are read. What a file holds besides a denoiser (a VAE, CLIP, T5) is
conversion's business (engine/checkpoints/parts.py).
"""

from __future__ import annotations

import os
from pathlib import Path

from dite.engine.errors import ConfigError, DiteError
from dite.engine.families import FAMILIES, SD3, Family, by_pipeline_class, supported_pipelines
from dite.engine.loading import sd3_single_file as sd3_files
from dite.engine.loading.config_files import read_model_index
from dite.engine.loading.hub import DEMO_FAMILIES, demo_folder, resolve_source
from dite.engine.loading.weights import open_weights


def local_path(source, *, variant: str | None = None, revision: str | None = None) -> Path:
    """The local folder or file of `source`: a demo model's folder, the path itself, or a hub
    repo id ("owner/name", "owner/name/file.safetensors") downloaded."""
    demo = demo_folder(source)
    return demo if demo is not None else resolve_source(source, revision=revision, variant=variant)


def pipeline_family(index: Path, model_index: dict) -> Family:
    """The family a pipeline folder's model_index.json (at `index`) names, or one line
    naming what it describes and what dite runs."""
    class_name = model_index.get("_class_name")
    family = by_pipeline_class(class_name)
    if family is None:
        raise ConfigError(f"{index} describes a {class_name!r}, which dite does not run; supported: "
                          f"{', '.join(supported_pipelines())}")
    return family


def file_family(keys) -> tuple[Family, str] | None:
    """(family, layout) of the denoiser a single file holds, by its tensor names: layout
    "original" (a release file; SD3's transformer under any single-file prefix) or
    "diffusers"; None when it holds none (a VAE, a text encoder, an unknown model)."""
    keys = list(keys)
    if sd3_files.transformer_prefix(keys) is not None:
        return SD3, "original"
    for family in FAMILIES:
        layout = family.model().detect_layout(keys)
        if layout is not None:
            return family, layout
    return None


def peek_family(source) -> str | None:
    """The family ("dit", "sd3", "pixart") of a local source without loading any weights;
    None when it cannot be told cheaply (a hub repo not downloaded yet, a .pt file, which
    would be unpickled, or anything unrecognised: `load()` then says what is wrong). Lets
    the CLI refuse a prompt for a DiT before loading anything."""
    if isinstance(source, str) and source in DEMO_FAMILIES:
        return DEMO_FAMILIES[source]
    path = Path(os.path.expanduser(str(source)))
    try:
        if path.is_dir() and (path / "model_index.json").is_file():
            return pipeline_family(path / "model_index.json", read_model_index(path)).name
        if path.is_file() and path.name.endswith(".safetensors"):  # a header read
            found = file_family(open_weights(path).keys())
            return found[0].name if found is not None else None
    except DiteError:
        return None
    return None
