"""Images written with the settings that made them, in PNG, JPEG or WebP.

PNG: text chunks, "dite" (JSON of everything, what --from-image reads), one readable chunk
per setting, and "parameters" in the form AUTOMATIC1111's web UI writes, which its "PNG info"
tab, ComfyUI's and other readers show. JPEG / WebP: the same two texts in EXIF, the A1111
text in UserComment (where A1111 puts it for those formats) and the JSON in ImageDescription.

Files are written to a hidden temporary sibling first, then moved into place: an existing
file is replaced only with `overwrite`, and never left half-written.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from dite.engine.errors import InputError
from dite.engine.outputs.naming import FORMATS

EXIF_IFD = 0x8769
USER_COMMENT = 0x9286
IMAGE_DESCRIPTION = 0x010E
# EXIF UserComment: an 8-byte character code, then the text (UTF-16, as A1111 writes it via piexif).
UNICODE_PREFIX = b"UNICODE\0"
JPEG_QUALITY = 95


def _a1111_value(value: Any) -> str:
    """A1111 quotes a value holding a comma or colon (its reader splits on ', ' and ': ')."""
    text = value if isinstance(value, str) else json.dumps(value)
    return json.dumps(text) if any(c in text for c in ",:\n\"") else text


def a1111_parameters(params: dict[str, Any]) -> str:
    """The settings as A1111's "parameters" text: the prompt, a "Negative prompt:" line, then
    "Key: value" pairs. DiT's class label stands where a prompt would."""
    if "prompt" in params:
        head = str(params["prompt"])
    else:
        name = params.get("class_name")
        head = f"class {params.get('class_label')}" + (f" ({name})" if name else "")
    lines = [head]
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    pairs = {"Steps": params.get("steps"), "Sampler": params.get("scheduler"), "CFG scale": params.get("guidance"),
             "Seed": params.get("seed"), "Size": params.get("size"), "Model hash": params.get("model_hash"),
             "Model": params.get("model"), "Accel": params.get("accel"), "Dtype": params.get("dtype"),
             "Device": params.get("device"), "Executor": params.get("executor"),
             "Version": f"dite {params['dite_version']}" if params.get("dite_version") else None}
    lines.append(", ".join(f"{key}: {_a1111_value(value)}" for key, value in pairs.items() if value is not None))
    return "\n".join(lines)


def _png_info(params: dict[str, Any]) -> PngInfo:
    info = PngInfo()
    info.add_text("dite", json.dumps(params, sort_keys=True))
    info.add_text("parameters", a1111_parameters(params))
    for key, value in params.items():
        if key not in ("dite", "parameters"):
            info.add_text(str(key), value if isinstance(value, str) else json.dumps(value))
    return info


def _exif(image: Image.Image, params: dict[str, Any]) -> Image.Exif:
    exif = image.getexif()
    exif[IMAGE_DESCRIPTION] = json.dumps(params, sort_keys=True)  # ASCII: json escapes the rest
    exif.get_ifd(EXIF_IFD)[USER_COMMENT] = UNICODE_PREFIX + a1111_parameters(params).encode("utf-16-be")
    return exif


def encode_options(path: Path, image: Image.Image, params: dict[str, Any]) -> dict[str, Any]:
    """PIL save() keywords for `path`'s format, metadata included."""
    fmt = FORMATS[path.suffix.lower()]
    if fmt == "PNG":
        return {"format": fmt, "pnginfo": _png_info(params)}
    options = {"format": fmt, "exif": _exif(image, params).tobytes(), "quality": JPEG_QUALITY}
    return options


def save_image(image: Image.Image, path: str | Path, params: dict[str, Any], *, overwrite: bool = False) -> Path:
    """Write `image` with `params` to `path` (format from its suffix). An existing file is an
    InputError unless `overwrite` (checked again at the moment of writing, so a file that
    appeared during the run is not lost either)."""
    path = Path(path)
    options = encode_options(path, image, params)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, **options)
        if overwrite:
            os.replace(temporary, path)
        else:
            try:
                os.link(temporary, path)  # fails if `path` exists: no window in which it is replaced
            except FileExistsError:
                raise InputError(f"{path} appeared while generating; kept it (the new image is not written): "
                                 "give --overwrite to replace files") from None
            except OSError:  # a file system without hard links: check, then move
                if path.exists():
                    raise InputError(f"{path} appeared while generating; kept it: give --overwrite to replace "
                                     "files") from None
                os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return path


def read_parameters(path: str | Path) -> dict[str, Any]:
    """The "dite" settings an image was written with (PNG text chunk or EXIF
    ImageDescription); an InputError if the file has none."""
    try:
        with Image.open(path) as image:
            image.load()
            text = getattr(image, "text", {}).get("dite")
            if text is None:
                text = image.getexif().get(IMAGE_DESCRIPTION)
    except FileNotFoundError:
        raise InputError(f"--from-image {path}: no such file") from None
    except (OSError, Image.UnidentifiedImageError) as exc:
        raise InputError(f"--from-image {path}: not an image dite can read ({exc})") from None
    try:
        params = json.loads(text) if text else None
    except json.JSONDecodeError:
        params = None
    if not isinstance(params, dict):
        raise InputError(f"--from-image {path}: it holds no dite settings (only images written by `dite generate` "
                         "can be re-run)")
    return params
