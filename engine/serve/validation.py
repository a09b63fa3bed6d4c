"""Request bodies -> checked generation specs, and OpenAI-style error objects.

A body is checked in two passes, both before anything is queued: its shape (pydantic:
field types, ranges, unknown fields) and its meaning for the loaded pipeline (the size,
the step count against the scheduler, the accel spec, the seed range: the very checks a
library call makes, through `Pipeline.check_call`). Either failure is one 400 whose
`param` names the field.

Image edits (POST /v1/images/edits, engine/serve/edits.py) are checked here too: the same
fields plus the init image, mask and strength, run through the library's own image checks.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from dite.engine.errors import DiteError, InputError
from dite.engine.families import BY_NAME as FAMILIES
from dite.engine.pipelines.arguments import MAX_STEPS, SEED_END
from dite.engine.serve.runner import generated_size

MAX_N = 10  # OpenAI's own limit for n


class BadRequest(Exception):
    """A request the server refuses: HTTP status, message, the field it concerns."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error",
               code: str | None = None) -> dict:
    """OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class GenerationBody(BaseModel):
    """POST /v1/images/generations: OpenAI's fields, then dite's own."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = None
    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N, strict=True)
    size: str | None = None
    response_format: Literal["b64_json", "url"] = "b64_json"
    user: str | None = None  # OpenAI's end-user id: accepted, not used
    negative_prompt: str | None = None
    steps: int | None = Field(None, ge=1, le=MAX_STEPS, strict=True)
    guidance: float | None = Field(None, ge=1.0, allow_inf_nan=False, strict=True)
    seed: int | None = Field(None, ge=0, lt=SEED_END, strict=True)
    accel: str | None = None
    class_label: StrictInt | StrictStr | None = None  # no bool or float read as a class
    # skip-layer guidance (SD3), the library's and diffusers' names (docs/slg.md)
    skip_guidance_layers: list[StrictInt] | None = None
    skip_layer_guidance_scale: float | None = Field(None, allow_inf_nan=False, strict=True)
    skip_layer_guidance_start: float | None = Field(None, allow_inf_nan=False, strict=True)
    skip_layer_guidance_stop: float | None = Field(None, allow_inf_nan=False, strict=True)


SLG_FIELDS = ("skip_guidance_layers", "skip_layer_guidance_scale", "skip_layer_guidance_start",
              "skip_layer_guidance_stop")
FIELDS = ("prompt, model, n, size, response_format, user, negative_prompt, steps, guidance, seed, accel, "
          "class_label, " + ", ".join(SLG_FIELDS))
LORA_REFUSAL = ("{field}: a request cannot choose LoRAs: they are merged into the pipeline's weights, which every "
                "request shares (a change would alter the images of requests running or queued with it); start the "
                "server with dite serve --lora PATH[:SCALE] (GET /v1/models lists the loaded ones)")


@dataclasses.dataclass(frozen=True, eq=False)
class EditInput:
    """An edit's checked init image (and mask): compared by identity, so an edit never
    batches with another request (engine/serve/runner.py runs it as its own library call)."""

    image: Any  # PIL image
    mask: Any  # PIL image or None
    strength: float | None  # None: the library's default (0.6)


def pydantic_error(errors: list[dict]) -> BadRequest:
    """FastAPI's RequestValidationError list -> one BadRequest naming the first bad field."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid body"}
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return BadRequest("the request body is not valid JSON", None)
    if first.get("type") == "model_attributes_type" or not loc:
        return BadRequest("the request body must be a JSON object of the image generation fields", None)
    field = loc[0]
    if first.get("type") == "extra_forbidden":
        if field.startswith("lora"):
            return BadRequest(LORA_REFUSAL.format(field=field), field)
        if field in ("strength", "image", "mask"):
            return BadRequest(f"{field} belongs to image edits: POST /v1/images/edits (multipart/form-data)", field)
        return BadRequest(f"unknown field {field!r}: this server takes {FIELDS} (and for /v1/images/edits also "
                          "image, mask, strength)", field)
    return BadRequest(f"{field}: {first.get('msg', 'invalid value')}", field)


@dataclasses.dataclass(frozen=True)
class Spec:
    """One request, checked: what its images are made from and what it may batch with."""

    n: int
    seed: int
    height: int
    width: int
    steps: int
    guidance: float
    accel: str | None
    response_format: str
    prompt: str | None = None
    negative_prompt: str | None = None
    class_label: int | None = None
    slg: tuple | None = None  # (layers, scale, start, stop)
    edit: EditInput | None = None

    @property
    def key(self) -> tuple:
        """Requests with equal keys run as one pipeline call (the scheduler is the server's);
        an edit's key is its own (EditInput compares by identity)."""
        return (self.height, self.width, self.steps, self.guidance, self.accel, self.slg, self.edit)


# check_call's argument names -> the request field a message about them concerns
_PARAMS = {"height": "size", "width": "size", "num_inference_steps": "steps", "guidance_scale": "guidance",
           "seed": "seed", "accel": "accel", "class label": "class_label", "class_labels": "class_label",
           **{name: name for name in SLG_FIELDS}, "strength": "strength", "mask": "mask", "the mask": "mask",
           "a tensor mask": "mask", "inpainting": "mask", "the init image": "image"}


def _param_of(message: str) -> str | None:
    """The request field a library message is about: check_call's messages start with the
    argument's name; accel spec messages name a method or "accel"."""
    for prefix, field in _PARAMS.items():
        if message.startswith(prefix):
            return field
    if "accel" in message:
        return "accel"
    return None


def _size(text: str | None, pipe) -> tuple[int, int]:
    if text is None or text == "auto":
        cfg = pipe.transformer.config
        side = (cfg.input_size if pipe.family == "dit" else cfg.sample_size) * pipe.vae_scale_factor
        return side, side
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise BadRequest(f"size must look like 64x64 (width x height), got {text!r}", "size") from None
    return height, width


def _no_server_files(accel: str) -> None:
    """A request may not make the server read files (tuned(file=), fastattn(plan=))."""
    from dite.accel.spec import parse_spec

    for method in parse_spec(accel):
        for name in ("file", "plan"):
            if getattr(method, name, None):
                raise BadRequest(f"accel {accel!r}: {name}= names a file on the server, which a request may not "
                                 "do; start the server with --accel to use one", "accel")


def _check_memory(pipe, height: int, width: int, images: int, guided: bool) -> None:
    """On a CPU, refuse what would not fit in RAM, as `dite generate` does (its estimate of
    one step's peak); a request must not take the server down with it."""
    from dite.engine.cli import available_memory, step_memory

    if pipe.device.type != "cpu":
        return
    text = 0
    if pipe.family == "sd3":
        text = 77 + (pipe.defaults.get("max_sequence_length") or FAMILIES["sd3"].default_sequence_length)
    need, free = step_memory(pipe, height, width, images, guided, text), available_memory()
    if free is not None and need > free:
        raise InputError(f"height {height} x width {width}: {images} image(s) need about {need / 2**30:.1f} GiB "
                         f"for one step and {free / 2**30:.1f} GiB of RAM is available; ask for a smaller size")


def _prompt_or_label(body: GenerationBody, pipe) -> int | None:
    """The DiT class label (None for the text-to-image families); BadRequest if absent."""
    if pipe.family == "dit":
        if body.negative_prompt is not None:
            raise BadRequest("negative_prompt: this is a class-conditional DiT; it takes class_label (or a class "
                             "name as prompt), no prompts", "negative_prompt")
        given, field = (body.class_label, "class_label") if body.class_label is not None else (body.prompt, "prompt")
        if given is None:
            raise BadRequest("class_label is required: a class index, or a class name (also accepted as prompt)",
                             "class_label")
        if isinstance(given, str) and given.strip().isdigit():
            given = int(given)
        try:
            return pipe.label_ids([given])[0]
        except DiteError as exc:
            raise BadRequest(f"{field}: {exc}", field) from None
    if body.class_label is not None:
        raise BadRequest(f"class_label: this is a text-to-image model ({pipe.family}); give a prompt", "class_label")
    if not body.prompt or not body.prompt.strip():
        raise BadRequest("prompt is required: a non-empty string", "prompt")
    return None


def _slg(body: GenerationBody, pipe, guidance: float):
    """The SkipLayerGuidance of the request (None without skip_guidance_layers); SD3 only."""
    from dite.engine.runtime.slg import DEFAULT_SCALE, DEFAULT_START, DEFAULT_STOP, SkipLayerGuidance

    given = [name for name in SLG_FIELDS if getattr(body, name) is not None]
    if not given:
        return None
    if pipe.family != "sd3":
        raise BadRequest(f"{given[0]}: skip-layer guidance is for SD3 models; this server serves a {pipe.family} "
                         "model", given[0])
    if body.skip_guidance_layers is None:
        raise BadRequest(f"{given[0]} needs skip_guidance_layers (the blocks to skip, e.g. [7, 8, 9])", given[0])
    if guidance <= 1.0:
        raise BadRequest(f"guidance: skip-layer guidance works on the guided (CFG) prediction, and guidance is "
                         f"{guidance:g}; use a guidance above 1 or drop skip_guidance_layers", "guidance")
    pick = lambda value, default: default if value is None else value  # noqa: E731
    return SkipLayerGuidance.check(body.skip_guidance_layers, pick(body.skip_layer_guidance_scale, DEFAULT_SCALE),
                                   pick(body.skip_layer_guidance_start, DEFAULT_START),
                                   pick(body.skip_layer_guidance_stop, DEFAULT_STOP), depth=len(pipe.transformer.blocks))


def _init(edit: EditInput, body: GenerationBody, pipe, default_latent: int):
    """The library's InitImage for an edit (its image, mask and strength checked as a call
    checks them), the image's size checked against the model."""
    from dite.engine.pipelines import init_image

    height, width = _size(body.size, pipe) if body.size not in (None, "auto") else (None, None)  # auto: the image's
    init = init_image.check(edit.image, edit.strength, edit.mask, count=body.n, height=height, width=width,
                            masks=pipe.family in ("sd3", "pixart"), family=pipe.family)
    try:
        pipe.latent_size(init.height, init.width, default_latent)
    except DiteError as exc:
        raise BadRequest(f"image: it is {init.width}x{init.height} pixels: {exc}; resize or crop it", "image") from None
    return init


def check_body(body: GenerationBody, pipe, served_name: str, default_accel: str | None,
               edit: EditInput | None = None) -> Spec:
    """The meaning checks; raises BadRequest. Cheap: no prompt is encoded, no image encoded
    (an edit's image and mask are decoded and checked)."""
    if body.model is not None and body.model != served_name:
        raise BadRequest(f"model {body.model!r} is not served here; this server serves {served_name!r} "
                         "(GET /v1/models)", "model")
    height, width = _size(body.size, pipe)
    label = _prompt_or_label(body, pipe)
    accel = body.accel if body.accel is not None else default_accel
    family = FAMILIES[pipe.family]
    # Resolved here, so that a request leaving them out batches with one giving the defaults.
    steps = pipe.defaults.get("num_inference_steps", family.default_steps) if body.steps is None else body.steps
    guidance = pipe.defaults.get("guidance_scale", family.default_guidance) if body.guidance is None \
        else body.guidance
    seed = body.seed if body.seed is not None else random.randrange(0, 2**31 - 1)
    try:
        if body.accel:
            _no_server_files(body.accel)
        slg = _slg(body, pipe, float(guidance))
        cfg = pipe.transformer.config
        default_latent = cfg.input_size if pipe.family == "dit" else cfg.sample_size
        init = _init(edit, body, pipe, default_latent) if edit is not None else None
        # An edit generates at its image's size (no resolution binning); text-to-image at the size asked for.
        gen_height, gen_width = (init.height, init.width) if init else generated_size(pipe, height, width)
        pipe.check_call(images=body.n, height=gen_height, width=gen_width, default_latent=default_latent,
                        num_inference_steps=steps, guidance_scale=guidance, seed=seed, latents=None,
                        output_type="pil", accel=accel, progress=False, plan_hook=None, init=init)
        _check_memory(pipe, gen_height, gen_width, body.n, guidance > 1.0)
    except DiteError as exc:
        param = _param_of(str(exc))
        message = f"size {body.size}: {exc}" if param == "size" and body.size else str(exc)
        raise BadRequest(message, param) from None
    if init is not None:
        height, width = init.height, init.width
    return Spec(n=body.n, seed=seed, height=height, width=width, steps=steps, guidance=float(guidance),
                accel=accel, response_format=body.response_format, prompt=body.prompt,
                negative_prompt=body.negative_prompt, class_label=label,
                slg=(slg.layers, slg.scale, slg.start, slg.stop) if slg else None, edit=edit)
