"""`dite generate --from-image x.png`: the settings recorded in x.png become the defaults of
the command line, so that the same run is made again; an option given explicitly still wins.

Paths are never recorded (only a local model's folder or file name), so an image made from
a local model needs --model PATH (and --vae / --tokenizers PATH where it was made with
them); demo models and hub repo ids are re-used as recorded. The recorded model hash is
compared with the loaded model's (a difference is reported, not refused: the model may have
been converted to another layout).
"""

from __future__ import annotations

from typing import Any

from dite.engine.dtypes import LONG_NAMES
from dite.engine.errors import InputError
from dite.engine.outputs.writers import read_parameters

# Recorded key -> generate option dest, for values taken as they are.
AS_IS = {"negative_prompt": "negative_prompt", "seed": "seed", "steps": "steps", "guidance": "guidance",
         "max_sequence_length": "max_sequence_length", "accel_spec": "accel", "device": "device",
         "executor": "executor", "attention": "attention", "compile_backend": "compile_backend",
         "compile_mode": "compile_mode", "npu_route": "npu_route", "scheduler_option": "scheduler",
         "weights_dtype": "weights_dtype", "vae_tiling": "vae_tiling"}


def recorded_defaults(path: str, given_model: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(generate option defaults, the recorded parameters) from the image at `path`."""
    from dite.engine.loading.hub import DEMO_MODELS, looks_like_repo_id

    params = read_parameters(path)
    if params.get("latents") == "given":
        raise InputError(f"--from-image {path} was made from latents passed in by a program, which images do not "
                         "record; it cannot be re-run")
    defaults: dict[str, Any] = {dest: params[key] for key, dest in AS_IS.items() if params.get(key) is not None}
    if "prompt" in params:
        defaults["prompt"] = [params["prompt"]]
    if "class_label" in params:
        defaults["class_label"] = [str(params["class_label"])]
    if "size" in params:
        width, height = (int(v) for v in str(params["size"]).split("x"))
        defaults["size"] = (width, height)
    if params.get("t5") is False:
        defaults["no_t5"] = True
    if "dtype" in params:
        defaults["dtype"] = LONG_NAMES.get(params["dtype"], params["dtype"])
    model = params.get("model")
    if given_model is None:
        if model in DEMO_MODELS or (isinstance(model, str) and looks_like_repo_id(model)):
            defaults["model"] = model
        else:
            raise InputError(f"--from-image {path} was made with the local model {model!r}, whose path images do not "
                             "record: give --model PATH")
    for key, flag in (("vae_option", "--vae"), ("tokenizers_option", "--tokenizers")):
        if params.get(key):
            defaults[f"needs_{key}"] = (flag, params[key])
    return defaults, params


def check_needed_paths(args, defaults: dict[str, Any], path: str) -> None:
    """An image made with --vae / --tokenizers needs the same option again (paths are not recorded)."""
    for key, dest in (("needs_vae_option", "vae"), ("needs_tokenizers_option", "tokenizers")):
        if key in defaults and getattr(args, dest) is None:
            flag, name = defaults[key]
            raise InputError(f"--from-image {path} was made with {flag} {name!r}, whose path images do not record: "
                             f"give {flag} PATH")
