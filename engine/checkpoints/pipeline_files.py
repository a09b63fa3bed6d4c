"""The files of a diffusers pipeline folder that are not weights: model_index.json, the
scheduler config and the tokenizers, for folders written from any source.

Original release files carry none of these: the scheduler is the one the family's original
loader uses (SD3's flow-matching Euler, DiT's respaced learned-range DDPM), tokenizers are
copied from where `load()` would look for them, and model_index.json names every component,
with [null, null] for those not written. Files dite wrote from a folder record that folder's
scheduler and model_index (engine/checkpoints/recorded.py), which are used instead.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from dite.engine.checkpoints.parts import Parts
from dite.engine.families import PIXART_VERSION_OF_PIPELINE, SD3_SCHEDULER, original_dit_scheduler_config
from dite.engine.checkpoints.layouts import DIFFUSERS_VERSION

# By family, and by PixArt version for PixArt.
PIPELINE_CLASS = {"sd3": "StableDiffusion3Pipeline", "dit": "DiTPipeline",
                  **{version: cls for cls, version in PIXART_VERSION_OF_PIPELINE.items()}}
COMPONENT_CLASSES = {
    "transformer": {"sd3": ["diffusers", "SD3Transformer2DModel"], "dit": ["diffusers", "DiTTransformer2DModel"],
                    "pixart": ["diffusers", "PixArtTransformer2DModel"]},
    "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": {"sd3": ["transformers", "CLIPTextModelWithProjection"], "pixart": ["transformers", "T5EncoderModel"]},
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "text_encoder_3": ["transformers", "T5EncoderModel"],
}
TOKENIZERS = {"sd3": ("tokenizer", "tokenizer_2", "tokenizer_3"), "pixart": ("tokenizer",)}
TEXT_ENCODERS = {"sd3": ("text_encoder", "text_encoder_2", "text_encoder_3"), "pixart": ("text_encoder",)}


def scheduler_config(parts: Parts) -> dict:
    """The source folder's scheduler config, else the one the family's original loader uses."""
    if parts.scheduler_config is not None:
        config = dict(parts.scheduler_config)
    elif parts.family == "dit":
        from dite.schedulers import from_diffusers_config

        learned = parts.components["transformer"].config.learned_sigma
        config = from_diffusers_config(original_dit_scheduler_config(learned)).to_diffusers_config()
    else:
        config = dict(SD3_SCHEDULER)
    return {**config, "_diffusers_version": config.get("_diffusers_version", DIFFUSERS_VERSION)}


def tokenizer_folders(parts: Parts, out: Path) -> list[str]:
    """Copy SD3's tokenizer folders into `out` from the first place that has each; the
    names copied. A missing one is noted: diffusers then loads the pipeline without it."""
    copied = []
    for name in TOKENIZERS.get(parts.family, ()):
        folder = next((place / name for place in parts.tokenizer_places if (place / name).is_dir()), None)
        if folder is None:
            looked = " or ".join(str(p) for p in parts.tokenizer_places) or "nowhere"
            parts.notes.append(f"no {name}/ found in {looked}: the folder has no {name}; pass tokenizers=PATH "
                               "(CLI: --tokenizers) of a diffusers SD3 folder to include it")
            continue
        shutil.copytree(folder, out / name)
        copied.append(name)
    return copied


def _tokenizer_class(out_folder_has_json: bool, name: str, family: str) -> list[str]:
    if name == "tokenizer_3" or family == "pixart":
        return ["transformers", "T5TokenizerFast" if out_folder_has_json else "T5Tokenizer"]
    return ["transformers", "CLIPTokenizer"]


def model_index(parts: Parts, written: list[str], tokenizers: list[str], out: Path | None = None) -> dict:
    """model_index.json of the written folder: the source's own when it had one (keeps
    id2label and dite's sampling defaults), with components not written set to [null, null]."""
    family = parts.family
    if parts.model_index is not None:
        index = dict(parts.model_index)
        for name in list(index):
            if name.startswith(("transformer", "vae", "text_encoder")) and name not in written:
                index[name] = [None, None]
            if name.startswith("tokenizer") and name not in tokenizers:  # not found this time
                index[name] = [None, None]
        return index
    index = {"_class_name": PIPELINE_CLASS[parts.release if family == "pixart" else family],
             "_diffusers_version": DIFFUSERS_VERSION}
    if family == "sd3":
        index.update({"feature_extractor": [None, None], "image_encoder": [None, None]})
    scheduler = scheduler_config(parts)["_class_name"]
    index["scheduler"] = ["diffusers", scheduler]
    names = ["transformer", "vae", *TEXT_ENCODERS.get(family, ())]
    for name in names:
        spec = COMPONENT_CLASSES[name]
        spec = spec[family] if isinstance(spec, dict) else spec
        index[name] = spec if name in written else [None, None]
    for name in TOKENIZERS.get(family, ()):
        has_json = out is not None and (out / name / "tokenizer.json").exists()
        index[name] = _tokenizer_class(has_json, name, family) if name in tokenizers else [None, None]
    return dict(sorted(index.items()))
