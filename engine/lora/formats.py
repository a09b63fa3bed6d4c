"""Reading LoRA files: each adapted weight as (down [rank, in], up [out, rank], alpha).

Two key styles are read, both naming the adapted linear layer by its key in a checkpoint layout
(diffusers names or the original release names), never by dite's own module names:
- diffusers / peft: `transformer.<module>.lora_A.weight`, `.lora_B.weight`, optional `.alpha`;
  `lora_alpha` also comes from the `lora_adapter_metadata` diffusers writes into the file.
  Without an alpha, alpha = rank (scale 1), as diffusers and peft do.
- kohya / ComfyUI: `lora_unet_<module with dots as underscores>.lora_down.weight`,
  `.lora_up.weight`, `.alpha`; the underscores are resolved against the model's known keys
  (engine/lora/targets.py), since module names contain underscores themselves.

Each adapted module belongs to a component: the denoiser ("transformer") or, for SD3, one of
the text encoders, named as diffusers' SD3 pipeline names them: `text_encoder.` (CLIP-L),
`text_encoder_2.` (CLIP-G), `text_encoder_3.` (T5) in diffusers files; `lora_te1_`,
`lora_te2_`, `lora_te3_` in kohya files (sd-scripts' networks/lora_sd3.py prefixes, with the
module names of transformers' CLIPTextModelWithProjection / T5EncoderModel).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dite.engine.errors import CheckpointError


class LoraError(CheckpointError):
    """A LoRA file that cannot be read, or that does not fit the loaded model."""


@dataclass
class LoraPair:
    down: torch.Tensor  # [rank, in] (lora_A / lora_down)
    up: torch.Tensor  # [out, rank] (lora_B / lora_up)
    alpha: float | None = None


TRANSFORMER = "transformer"
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")  # diffusers' SD3 component names
_KOHYA_COMPONENTS = {"lora_unet_": TRANSFORMER, "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2",
                     "lora_te3_": "text_encoder_3"}


@dataclass
class LoraFile:
    path: Path
    sha256: str
    style: str  # "diffusers" or "kohya"
    # (component, module key (dots, or kohya underscores)) -> pair
    pairs: dict[tuple[str, str], LoraPair] = field(default_factory=dict)

    @property
    def components(self) -> set[str]:
        return {component for component, _ in self.pairs}

    @property
    def label(self) -> str:
        """What image metadata records: the file name and a short hash, never a folder."""
        return f"{self.path.name}@{self.sha256[:10]}"


_DIFFUSERS_PARTS = {"lora_A.weight": "down", "lora_B.weight": "up", "alpha": "alpha"}
_KOHYA_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _open(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    if not path.is_file():
        raise LoraError(f"LoRA file {path} does not exist (give a .safetensors LoRA file)")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises several types for a damaged or foreign file
        raise LoraError(f"cannot read LoRA file {path} as safetensors ({type(exc).__name__}: {exc}); "
                        "give a .safetensors LoRA file") from None


def _metadata_alpha(metadata: dict[str, str], component: str) -> float | None:
    """`lora_alpha` of the adapter config diffusers saves with the file, if any: diffusers'
    save_lora_weights prefixes each component's config (`text_encoder_2.lora_alpha`); a bare
    `lora_alpha` serves every component that has none of its own."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except ValueError:
        return None
    for key in (f"{component}.lora_alpha", "lora_alpha"):
        if isinstance(config.get(key), (int, float)):
            return float(config[key])
    return None


def _split(key: str) -> tuple[str, str, str, str] | None:
    """key -> (style, component, module, part) or None for a key of neither style."""
    for prefix, component in _KOHYA_COMPONENTS.items():
        if key.startswith(prefix):
            for suffix, part in _KOHYA_PARTS.items():
                if key.endswith("." + suffix):
                    return "kohya", component, key[len(prefix):-len(suffix) - 1], part
            return None
    component, body = TRANSFORMER, key.removeprefix("transformer.").removeprefix("base_model.model.")
    for name in TEXT_ENCODERS:
        if key.startswith(name + "."):
            component, body = name, key[len(name) + 1:]
    for suffix, part in _DIFFUSERS_PARTS.items():
        if body.endswith("." + suffix):
            return "diffusers", component, body[:-len(suffix) - 1], part
    return None


def display(component: str, module: str) -> str:
    """A module as messages name it: the denoiser's bare, a text encoder's with its component."""
    return module if component == TRANSFORMER else f"{component}.{module}"


def read_lora(path) -> LoraFile:
    """Read and check a LoRA file's structure (pairs complete, ranks agree); the fit to a model
    is checked by engine/lora/targets.py."""
    path = Path(path)
    tensors, metadata = _open(path)
    single = sorted(k for k in tensors if k.startswith("lora_te_"))
    if single:  # kohya's one-text-encoder prefix: SD 1.x/2.x, not a model dite runs
        raise LoraError(f"{path.name} adapts a single text encoder ({len(single)} lora_te_ keys such as {single[:2]}): "
                        "an SD 1.x/2.x LoRA; SD3 files name CLIP-L, CLIP-G and T5 lora_te1_, lora_te2_, lora_te3_")
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    styles, unknown = set(), []
    for key, tensor in tensors.items():
        split = _split(key)
        if split is None:
            unknown.append(key)
            continue
        style, component, module, part = split
        styles.add(style)
        parts.setdefault((component, module), {})[part] = tensor
    if unknown:
        raise LoraError(f"{path.name} has keys that are not LoRA weights of a known style ({len(unknown)} such as "
                        f"{sorted(unknown)[:3]}); dite reads diffusers/peft (lora_A/lora_B) and kohya "
                        "(lora_unet_/lora_te1_/lora_te2_/lora_te3_ *.lora_down/lora_up) files")
    if not parts:
        raise LoraError(f"{path.name} holds no LoRA weights")
    if len(styles) > 1:
        raise LoraError(f"{path.name} mixes diffusers and kohya key styles; give a file of one style")
    lora = LoraFile(path=path, sha256=sha256_of(path), style=styles.pop())
    for (component, name), found in sorted(parts.items()):
        module = display(component, name)
        if "down" not in found or "up" not in found:
            missing = "down (lora_A/lora_down)" if "down" not in found else "up (lora_B/lora_up)"
            raise LoraError(f"{path.name}: {module} has no {missing} weight; the file is incomplete")
        down, up = found["down"], found["up"]
        if down.dim() != 2 or up.dim() != 2:
            raise LoraError(f"{path.name}: {module} has {down.dim()}-d/{up.dim()}-d LoRA weights; dite merges LoRAs "
                            "into linear layers (2-d) only")
        if down.shape[0] != up.shape[1]:
            raise LoraError(f"{path.name}: {module} has rank {down.shape[0]} in its down (A) weight "
                            f"{tuple(down.shape)} but {up.shape[1]} in its up (B) weight {tuple(up.shape)}")
        alpha = float(found["alpha"].item()) if "alpha" in found else _metadata_alpha(metadata, component)
        if alpha is not None and not math.isfinite(alpha):
            raise LoraError(f"{path.name}: {module} has alpha {alpha}")
        if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
            raise LoraError(f"{path.name}: {module} has NaN or infinite LoRA weights")
        lora.pairs[(component, name)] = LoraPair(down=down, up=up, alpha=alpha)
    return lora
