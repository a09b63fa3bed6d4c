"""POST /v1/images/edits: OpenAI's multipart form -> a checked generation body and init image.

The form's text fields are the generation fields (validation.GenerationBody, typed from
text here: a form carries strings) plus `strength`; `image` is the init image (one file),
`mask` optional. Without a mask the request is image-to-image, with one inpainting
(docs/img2img.md). Masks: OpenAI's convention, a PNG whose fully transparent pixels
(alpha 0) mark where to edit, is read when the mask has an alpha channel; a mask without
one follows diffusers' and dite's convention, white = repaint. Everything is checked before
the request is queued; each failure is one BadRequest naming the field.
"""

from __future__ import annotations

import io
import json

from PIL import Image, UnidentifiedImageError

from dite.engine.serve.validation import SLG_FIELDS, BadRequest, EditInput, GenerationBody, pydantic_error

MAX_IMAGE_BYTES = 50 * 2**20  # OpenAI's own limit for an edit's image
MAX_IMAGE_PIXELS = 4096 * 4096  # refused before decoding: a request must not take the server's memory
_INTS = {"n", "steps", "seed"}
_FLOATS = {"guidance", "strength", *SLG_FIELDS[1:]}
FILE_FIELDS = ("image", "mask")


def _number(field: str, text: str, kind):
    try:
        return kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise BadRequest(f"{field}: {text!r} is not {what}", field) from None


def _layers(text: str) -> list:
    """skip_guidance_layers in a form: "7,8,9" or "[7, 8, 9]"."""
    field = "skip_guidance_layers"
    try:
        value = json.loads(text) if text.strip().startswith("[") else [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise BadRequest(f"{field}: {text!r} is not a list of block indices such as 7,8,9", field) from None
    if not isinstance(value, list):
        raise BadRequest(f"{field}: {text!r} is not a list of block indices such as 7,8,9", field)
    return value


def typed_fields(items: list[tuple[str, str]]) -> dict:
    """The form's text fields, typed as the JSON body would carry them."""
    fields: dict = {}
    for name, value in items:
        if name in fields:
            raise BadRequest(f"{name} is given twice; give each field once", name)
        if name in _INTS:
            fields[name] = _number(name, value, int)
        elif name in _FLOATS:
            fields[name] = _number(name, value, float)
        elif name == "skip_guidance_layers":
            fields[name] = _layers(value)
        elif name == "class_label" and value.strip().isdigit():
            fields[name] = int(value)
        else:
            fields[name] = value
    return fields


def _picture(field: str, upload) -> Image.Image:
    """An uploaded file as a decoded PIL image; BadRequest naming `field` otherwise."""
    if upload is None or isinstance(upload, str):
        raise BadRequest(f"{field} must be an uploaded image file (multipart/form-data, PNG or JPEG)", field)
    data = upload.file.read(MAX_IMAGE_BYTES + 1)
    if len(data) > MAX_IMAGE_BYTES:
        raise BadRequest(f"{field} is larger than {MAX_IMAGE_BYTES >> 20} MB", field)
    try:
        img = Image.open(io.BytesIO(data))
        if img.width * img.height > MAX_IMAGE_PIXELS:
            raise BadRequest(f"{field} is {img.width}x{img.height} pixels, more than this server decodes "
                             f"({MAX_IMAGE_PIXELS} pixels)", field)
        img.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise BadRequest(f"{field} is not a readable image ({type(exc).__name__}); give a PNG or JPEG file",
                         field) from None
    return img


def _mask(upload) -> Image.Image:
    """The mask as dite reads it (L, white = repaint): from the alpha channel when it has
    one (OpenAI: fully transparent = edit), else the image as given (white = repaint)."""
    img = _picture("mask", upload)
    if "A" in img.getbands() or (img.mode == "P" and "transparency" in img.info):
        alpha = img.convert("RGBA").getchannel("A")
        return alpha.point(lambda a: 255 if a == 0 else 0, mode="L")
    return img


async def read_edit(request) -> tuple[GenerationBody, EditInput]:
    """The edit request's body and init image, every field checked for its shape."""
    from pydantic import ValidationError

    try:
        form = await request.form(max_files=2, max_fields=64)
    except Exception as exc:  # noqa: BLE001 - starlette raises several types for a malformed form
        raise BadRequest(f"the request body must be multipart/form-data with an image file and a prompt "
                         f"({type(exc).__name__}: {exc})", None) from None
    items = list(form.multi_items())
    uploads = {name: value for name, value in items if name in FILE_FIELDS or name == "image[]"}
    if "image[]" in uploads:
        if "image" in uploads or sum(name == "image[]" for name, _ in items) > 1:
            raise BadRequest("image: this server edits one image per request; send one image file", "image")
        uploads["image"] = uploads.pop("image[]")
    fields = typed_fields([(n, v) for n, v in items if n not in FILE_FIELDS and n != "image[]"])
    strength = fields.pop("strength", None)
    try:
        body = GenerationBody(**fields)
    except ValidationError as exc:
        raise pydantic_error(list(exc.errors())) from None
    image = _picture("image", uploads.get("image"))
    mask = _mask(uploads["mask"]) if uploads.get("mask") is not None else None
    return body, EditInput(image=image, mask=mask, strength=strength)
