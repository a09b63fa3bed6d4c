"""Where PixArt's original `.pth` releases keep their other parts: the T5, tokenizer and VAE
folders beside the file. Used by loading and by conversion (pipeline-free on purpose)."""

from __future__ import annotations

from pathlib import Path

BESIDE = {"text_encoder": ("text_encoder", "t5-v1_1-xxl"), "tokenizer": ("tokenizer", "text_encoder", "t5-v1_1-xxl"),
          "vae": {"alpha": ("vae", "sd-vae-ft-ema"), "sigma": ("vae", "sdxl-vae", "sdxl-vae-fp16-fix")}}


def beside(path: Path, part: str, pixart_version: str | None = None) -> Path | None:
    names = BESIDE[part][pixart_version] if part == "vae" else BESIDE[part]
    for name in names:
        folder = path.parent / name
        if part == "tokenizer" and ((folder / "spiece.model").is_file() or (folder / "tokenizer.json").is_file()):
            return folder
        if part != "tokenizer" and folder.is_dir():
            return folder
    return None


def beside_hint(pixart_version: str) -> str:
    if pixart_version == "alpha":
        return "text_encoder/ (or t5-v1_1-xxl/), tokenizer/ and vae/ (or sd-vae-ft-ema/), as in the PixArt-alpha repos"
    return "text_encoder/, tokenizer/ and vae/, as in PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers"
