"""Reading LoRA files: each adapted weight as (down [rank, in], up [out, rank], alpha).

Two key styles are read, both naming the adapted linear layer by its key in a checkpoint layout
(diffusers names or the original release names), never by dite's own module names:
- diffusers / peft: `transformer.<module>.lora_A.weight`, `.lora_B.weight`, optional `.alpha`;
  `lora_alpha` also comes from the `lora_adapter_metadata` diffusers writes into the file.
  Without an alpha, alpha = rank (scale 1), as diffusers and peft do.
- kohya / ComfyUI: `lora_unet_<module with dots as underscores>.lora_down.weight`,
  `.lora_up.weight`, `.alpha`; the underscores are resolved against the model's known keys
  (engine/lora/targets.py), since module names contain underscores themselves.
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


@dataclass
class LoraFile:
    path: Path
    sha256: str
    style: str  # "diffusers" or "kohya"
    pairs: dict[str, LoraPair] = field(default_factory=dict)  # module key (dots, or kohya underscores) -> pair

    @property
    def label(self) -> str:
        """What image metadata records: the file name and a short hash, never a folder."""
        return f"{self.path.name}@{self.sha256[:10]}"


_DIFFUSERS_PARTS = {"lora_A.weight": "down", "lora_B.weight": "up", "alpha": "alpha"}
_KOHYA_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
TEXT_ENCODER_PREFIXES = ("text_encoder.", "text_encoder_2.", "text_encoder_3.", "lora_te1_", "lora_te2_", "lora_te3_",
                         "lora_te_")


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


def _metadata_alpha(metadata: dict[str, str]) -> float | None:
    """`lora_alpha` of the adapter config diffusers saves with the file, if any."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except ValueError:
        return None
    for key in ("transformer.lora_alpha", "lora_alpha"):
        if isinstance(config.get(key), (int, float)):
            return float(config[key])
    return None


def _split(key: str) -> tuple[str, str, str] | None:
    """key -> (style, module, part) or None for a key of neither style."""
    if key.startswith("lora_unet_"):
        for suffix, part in _KOHYA_PARTS.items():
            if key.endswith("." + suffix):
                return "kohya", key[len("lora_unet_"):-len(suffix) - 1], part
        return None
    body = key.removeprefix("transformer.").removeprefix("base_model.model.")
    for suffix, part in _DIFFUSERS_PARTS.items():
        if body.endswith("." + suffix):
            return "diffusers", body[:-len(suffix) - 1], part
    return None


def read_lora(path) -> LoraFile:
    """Read and check a LoRA file's structure (pairs complete, ranks agree); the fit to a model
    is checked by engine/lora/targets.py."""
    path = Path(path)
    tensors, metadata = _open(path)
    text = sorted(k for k in tensors if k.startswith(TEXT_ENCODER_PREFIXES))
    if text:
        raise LoraError(f"{path.name} adapts the text encoders ({len(text)} keys such as {text[:2]}); dite merges "
                        "LoRAs into the denoiser only so far")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    styles, unknown = set(), []
    for key, tensor in tensors.items():
        split = _split(key)
        if split is None:
            unknown.append(key)
            continue
        style, module, part = split
        styles.add(style)
        parts.setdefault(module, {})[part] = tensor
    if unknown:
        raise LoraError(f"{path.name} has keys that are not LoRA weights of a known style ({len(unknown)} such as "
                        f"{sorted(unknown)[:3]}); dite reads diffusers/peft (lora_A/lora_B) and kohya "
                        "(lora_unet_*.lora_down/lora_up) files")
    if not parts:
        raise LoraError(f"{path.name} holds no LoRA weights")
    if len(styles) > 1:
        raise LoraError(f"{path.name} mixes diffusers and kohya key styles; give a file of one style")
    default_alpha = _metadata_alpha(metadata)
    lora = LoraFile(path=path, sha256=sha256_of(path), style=styles.pop())
    for module, found in sorted(parts.items()):
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
        alpha = float(found["alpha"].item()) if "alpha" in found else default_alpha
        if alpha is not None and not math.isfinite(alpha):
            raise LoraError(f"{path.name}: {module} has alpha {alpha}")
        if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
            raise LoraError(f"{path.name}: {module} has NaN or infinite LoRA weights")
        lora.pairs[module] = LoraPair(down=down, up=up, alpha=alpha)
    return lora
