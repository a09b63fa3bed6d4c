"""Decoded images to numpy / PIL, and PNG files that remember how they were made."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def postprocess(decoded: torch.Tensor, output_type: str):
    """VAE output in [-1, 1], [N, 3, H, W] -> the requested image type in [0, 1]."""
    images = (decoded / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return images.float()
    array = images.cpu().permute(0, 2, 3, 1).float().numpy()
    if output_type == "np":
        return array
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]


def png_info(parameters: dict[str, Any]) -> PngInfo:
    """Generation parameters as PNG text chunks: one JSON chunk "dite" with everything,
    plus one readable chunk per parameter."""
    info = PngInfo()
    info.add_text("dite", json.dumps(parameters, sort_keys=True))
    for key, value in parameters.items():
        info.add_text(str(key), value if isinstance(value, str) else json.dumps(value))
    return info


def save_png(image: Image.Image, path: str | Path, parameters: dict[str, Any]) -> Path:
    """Write `image` with its generation parameters (png_info) to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, pnginfo=png_info(parameters))
    return path


def png_bytes(image: Image.Image, parameters: dict[str, Any]) -> bytes:
    """The PNG file `save_png` would write, as bytes (what `dite serve` sends)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=png_info(parameters))
    return buffer.getvalue()
