"""Helpers of the `dite serve` tests: PNG bytes -> arrays and metadata, metric values."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
from PIL import Image


def png_array(data: bytes | str) -> np.ndarray:
    """A PNG (bytes, or base64 text as in b64_json) as a uint8 (H, W, 3) array."""
    raw = base64.b64decode(data) if isinstance(data, str) else data
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))


def png_parameters(data: bytes | str) -> dict:
    """The "dite" text chunk: everything the image was made with."""
    raw = base64.b64decode(data) if isinstance(data, str) else data
    return json.loads(Image.open(io.BytesIO(raw)).text["dite"])


def library_image(pipe, **kwargs) -> np.ndarray:
    return np.asarray(pipe(progress=False, **kwargs).images[0].convert("RGB"))


def metric(text: str, name: str, **labels) -> float:
    """One sample's value in Prometheus text (0 if absent)."""
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = "^" + re.escape(name + ("{" + inner + "}" if inner else "")) + r" (\S+)$"
    match = re.search(pattern, text, re.M)
    return float(match[1]) if match else 0.0


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())
