"""Where the parts of an SD3 / SD3.5 original single-file release are.

Stability ships one pipeline as several files (docs/checkpoints.md §1.1-1.2):
- the model file: the MMDiT under `model.diffusion_model.`, the VAE under
  `first_stage_model.`; the `*_incl_clips*` files add the text encoders under
  `text_encoders.{clip_l,clip_g,t5xxl}.transformer.`;
- `text_encoders/clip_l.safetensors`, `clip_g.safetensors` and a T5
  (`t5xxl_fp16.safetensors`, `t5xxl_fp8_e4m3fn.safetensors`) beside the model file;
- no tokenizers and no scheduler config. Tokenizers come from a folder holding
  `tokenizer/`, `tokenizer_2/` and `tokenizer_3/` as a diffusers SD3 folder does, found
  beside the model file (or in its `text_encoders/`) or given with `tokenizers=PATH`.

Everything here reads names and shapes only, never tensor data, so `dite inspect` uses it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dite.engine.errors import CheckpointError, ConfigError
from dite.engine.loading.config_files import naming
from dite.engine.loading.weights import WeightReader
from dite.models import mmdit
from dite.models.tokenizers import CLIPTokenizer, T5Tokenizer
from dite.models.clip import CLIPTextConfig
from dite.models.t5 import T5Config
from dite.models.vae import VAEConfig, find_vae_prefix

TEXT_ENCODERS = ("clip_l", "clip_g", "t5xxl")
BUNDLED_PREFIX = {part: f"text_encoders.{part}.transformer." for part in TEXT_ENCODERS}
# Beside the model file, best first: fp16 T5 before the 8-bit one, then any other t5xxl_*.
SEPARATE_FILES = {
    "clip_l": ("clip_l.safetensors",),
    "clip_g": ("clip_g.safetensors",),
    "t5xxl": ("t5xxl_fp16.safetensors", "t5xxl_fp8_e4m3fn.safetensors", "t5xxl_*.safetensors"),
}
DESCRIPTION = {"clip_l": "CLIP-L", "clip_g": "CLIP-G (bigG)", "t5xxl": "T5-XXL"}
# Top-level parts of a single file that are not the MMDiT (when the MMDiT has no prefix).
OTHER_PARTS = ("first_stage_model.", "vae.", "text_encoders.", "cond_stage_model.", "conditioner.")

TOKENIZER_FOLDER = {"clip_l": "tokenizer", "clip_g": "tokenizer_2", "t5xxl": "tokenizer_3"}
TOKENIZER_FILES = {"clip_l": "vocab.json + merges.txt, or tokenizer.json", "clip_g": "vocab.json + merges.txt, or "
                   "tokenizer.json, and the special_tokens_map.json that sets its pad token",
                   "t5xxl": "spiece.model or tokenizer.json"}
TOKENIZERS_HINT = ("pass tokenizers=PATH (CLI: --tokenizers PATH), a folder holding tokenizer/, tokenizer_2/ and "
                   "tokenizer_3/ such as a diffusers SD3 folder, or the hub repo "
                   "stabilityai/stable-diffusion-3-medium-diffusers")


def transformer_prefix(keys) -> str | None:
    """The prefix of the original-layout MMDiT in a single file ("model.diffusion_model."
    in every release), or None if there is none."""
    found = sorted({k[: -len(mmdit.ORIGINAL_ANCHOR)] for k in keys if k.endswith(mmdit.ORIGINAL_ANCHOR)})
    found = [p for p in found if p == "" or p.endswith(".")]
    if len(found) > 1:
        raise CheckpointError(f"several SD3 MMDiTs in one file (prefixes {found}); dite reads files holding one")
    return found[0] if found else None


def transformer_shapes(reader: WeightReader, prefix: str) -> dict[str, tuple[int, ...]]:
    return {k[len(prefix):]: reader.shape(k) for k in reader.keys() if k.startswith(prefix)}


def not_transformer(keys, prefix: str) -> set[str]:
    """The keys of a single file that belong to its other parts (VAE, text encoders)."""
    return {k for k in keys if not k.startswith(prefix) or k.startswith(OTHER_PARTS)}


def vae_prefix(keys) -> str | None:
    try:
        return find_vae_prefix(keys)
    except CheckpointError:
        return None


@dataclass(frozen=True)
class EncoderSource:
    """Where one text encoder's weights are: the model file's reader and a prefix (bundled),
    or a separate file (prefix None: found from the names)."""

    weights: WeightReader | Path
    prefix: str | None
    where: str

    @property
    def bundled(self) -> bool:
        return self.prefix is not None


def encoder_folders(model_file: Path) -> list[Path]:
    return [model_file.parent / "text_encoders", model_file.parent]


def find_encoder(model_file: Path, reader: WeightReader, part: str) -> EncoderSource | None:
    """Text encoder `part` ("clip_l", "clip_g", "t5xxl"): bundled in the model file, else in
    a separate file in text_encoders/ beside it (or beside it directly); None if neither."""
    prefix = BUNDLED_PREFIX[part]
    if any(k.startswith(prefix) for k in reader.keys()):
        return EncoderSource(reader, prefix, f"{model_file} ({prefix}*)")
    for folder in encoder_folders(model_file):
        for pattern in SEPARATE_FILES[part]:
            found = sorted(p for p in folder.glob(pattern) if p.resolve() != model_file.resolve())
            if found:
                return EncoderSource(found[0], None, str(found[0]))
    return None


def missing_encoders_error(model_file: Path, missing: list[str]) -> CheckpointError:
    names = " and ".join(f"{DESCRIPTION[p]} ({' or '.join(SEPARATE_FILES[p])})" for p in missing)
    folders = " or ".join(str(f) for f in encoder_folders(model_file))
    return CheckpointError(
        f"{model_file} has no text encoders bundled and SD3 needs {names}: put the files from the model's "
        f"repo (its text_encoders/ folder) in {folders}, or load a file that bundles them "
        "(e.g. sd3_medium_incl_clips.safetensors)"
    )


def load_tokenizer(places: list[Path], part: str, *, single_file: bool):
    """The tokenizer of text encoder `part` from the first of `places` that has its folder."""
    name = TOKENIZER_FOLDER[part]
    kind = T5Tokenizer if part == "t5xxl" else CLIPTokenizer
    folder = next((place / name for place in places if (place / name).is_dir()), None)
    why = "single-file checkpoints carry no tokenizers; " if single_file else ""
    if folder is None:
        looked = " or ".join(str(place) for place in places)
        raise CheckpointError(f"SD3 needs its {DESCRIPTION[part]} tokenizer: no {name}/ folder "
                              f"({TOKENIZER_FILES[part]}) in {looked}; {why}{TOKENIZERS_HINT}")
    try:
        return kind.from_folder(folder)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}; {why}{TOKENIZERS_HINT}") from None


def tokenizer_places(model_file: Path) -> list[Path]:
    """Where the tokenizers of a single file are looked for when not given."""
    return [model_file.parent, model_file.parent / "text_encoders"]


# model_config keys a single file takes: what tensor shapes cannot tell (only needed for
# sizes no release has): MMDiT heads, and each component's config.json (transformers /
# diffusers format) or dite config.
HINTS = {"text_encoder": CLIPTextConfig, "text_encoder_2": CLIPTextConfig, "text_encoder_3": T5Config,
         "vae": VAEConfig}


def component_hints(model_config: dict) -> dict:
    """model_config of a single file -> {component: its dite config or None}."""
    unknown = set(model_config) - {"num_heads", *HINTS}
    if unknown:
        raise ConfigError(f"model_config keys {sorted(unknown)} cannot be set for an SD3 single file; it takes "
                          f"num_heads (MMDiT) and the config.json of {', '.join(HINTS)}")
    hints = {}
    for name, kind in HINTS.items():
        value = model_config.get(name)
        if value is None or isinstance(value, kind):
            hints[name] = value
        elif isinstance(value, dict):
            with naming(f"model_config[{name!r}]"):
                hints[name] = kind.from_diffusers(value) if kind is VAEConfig else kind.from_transformers(value)
        else:
            raise ConfigError(f"model_config[{name!r}] must be a {kind.__name__} or a config.json dict, "
                              f"not {type(value).__name__}")
    return hints
