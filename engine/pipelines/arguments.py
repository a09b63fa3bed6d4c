"""The checks of a generation call's arguments, shared by every family's pipeline.

Each takes the argument's name and value and returns it normalised, or raises an
InputError that names the argument, what it got and what it accepts, in one line. They run
before any prompt is encoded (Pipeline.check_call gathers them).

Integers: Python ints and anything that is an integer to numpy or torch (np.int64(4), a
0-dim integer tensor) are accepted; bool, float (64.0) and str are not.
"""

from __future__ import annotations

import operator
from typing import Any, Sequence

import numpy as np
import torch

from dite.engine.errors import InputError
from dite.engine.runtime.finite import check_number, check_tensor

# One call's images and steps: beyond these a typo (an extra 0) would exhaust memory or
# time before saying anything; generate in several calls instead.
MAX_IMAGES = 4096
MAX_STEPS = 10_000
# torch.Generator.manual_seed takes seeds in [0, 2**64 - 1]; image k uses seed + k.
SEED_END = 2**64


def shown(value: Any, limit: int = 60) -> str:
    """A short one-line rendering of a bad value for a message: repr and type."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    text = " ".join(repr(value).split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{text} ({type(value).__name__})"


def integer(name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """`value` as an int within [minimum, maximum]."""
    number = None
    if not isinstance(value, (bool, np.bool_, float, str, bytes)) and getattr(value, "dtype", None) != torch.bool:
        try:
            number = operator.index(value)
        except TypeError:
            pass
    if number is None:
        kind = "a positive integer" if minimum == 1 else "an integer"
        raise InputError(f"{name} must be {kind}, got {shown(value)}")
    if minimum is not None and number < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise InputError(f"{name} must be {kind}, got {number}")
    if maximum is not None and number > maximum:
        raise InputError(f"{name} must be at most {maximum}, got {number}")
    return number


def steps(value: Any) -> int:
    return integer("num_inference_steps", value, minimum=1, maximum=MAX_STEPS)


def guidance(value: Any) -> float:
    """A finite real number >= 1; exactly 1 turns classifier-free guidance off (the
    unconditional branch is not run). Below 1 (0, 0.5, negatives) is refused rather than
    silently read as 1, which is what diffusers does with any value <= 1."""
    scale = check_number("guidance_scale", value)
    if scale < 1:
        raise InputError(f"guidance_scale must be >= 1 (1 turns classifier-free guidance off), got {value!r}")
    return scale


def flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InputError(f"{name} must be True or False, got {shown(value)}")
    return value


def seed(value: Any, count: int) -> int:
    """The first image's seed (image k uses seed + k, all of which must fit a 64-bit
    generator seed); None draws a fresh one (recorded in the output's parameters)."""
    if value is None:
        return int(torch.randint(0, 2**31 - 1, ()).item())
    try:
        number = integer("seed", value)
    except InputError:
        number = None
    if number is None or number < 0:
        raise InputError(f"seed must be a non-negative integer or None (a fresh seed), got {shown(value)}")
    if number > SEED_END - count:
        raise InputError(f"seed {number} is too large for {count} image(s): image k uses seed + k, which must "
                         f"stay below 2**64, so seed must be at most {SEED_END - count}")
    return number


def images(count: int) -> int:
    if count > MAX_IMAGES:
        raise InputError(f"{count} images in one call; at most {MAX_IMAGES} (prompts x num_images_per_prompt): "
                         "generate in several calls")
    return count


def prompt_list(name: str, value: Any, *, required: bool = True) -> list[str]:
    """A string or a non-empty list/tuple of strings, as a list."""
    if value is None and required:
        raise InputError(f"{name} is required: give a string or a non-empty list of strings")
    if isinstance(value, str):
        return [value]
    if not isinstance(value, (list, tuple)):
        raise InputError(f"{name} must be a string or a non-empty list of strings, got {shown(value)}")
    if not value:
        raise InputError(f"{name} must be a string or a non-empty list of strings, got an empty {type(value).__name__}")
    for k, item in enumerate(value):
        if not isinstance(item, str):
            raise InputError(f"{name} must be a string or a non-empty list of strings: {name}[{k}] is {shown(item)}")
    return list(value)


def negative_prompts(value: Any, count: int) -> list[str]:
    """One negative prompt per prompt: a string or one-element list is repeated; None is ""."""
    negatives = prompt_list("negative_prompt", "" if value is None else value)
    if len(negatives) == 1:
        negatives = negatives * count
    if len(negatives) != count:
        raise InputError(f"{len(negatives)} negative prompts for {count} prompts: give one, or one per prompt")
    return negatives


def max_sequence_length(value: Any, limit: int) -> int:
    return integer("max_sequence_length", value, minimum=1, maximum=limit)


def output_type(value: Any) -> str:
    from dite.engine.pipelines.images import OUTPUT_TYPES

    if not isinstance(value, str) or value not in OUTPUT_TYPES:
        raise InputError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {shown(value)}")
    return value


def accel(value: Any) -> Any:
    """The kinds `accel=` takes; what a spec string or method means is checked when the
    plans are built (also before any encoding)."""
    from dite.accel.methods import Method

    if value is None or isinstance(value, (str, Method)):
        return value
    if isinstance(value, (list, tuple)):
        for k, item in enumerate(value):
            if not isinstance(item, Method):
                raise InputError(f"accel[{k}] is {shown(item)}; a list given as accel must hold dite.accel method "
                                 "objects (e.g. accel.BlockCache(...))")
        return value
    raise InputError(f"accel must be None, a spec string (e.g. 'blockcache'), a dite.accel method or a list of "
                     f"them, got {shown(value)}")


def callable_or_none(name: str, value: Any) -> Any:
    if value is not None and not callable(value):
        raise InputError(f"{name} must be a function or None, got {shown(value)}")
    return value


def latents(value: Any, expected: Sequence[int]) -> torch.Tensor | None:
    """Given initial latents: a real floating tensor of exactly `expected` shape, with data
    (not on the meta device), every value finite. Any device: they are moved to the model's."""
    if value is None:
        return None
    if not isinstance(value, torch.Tensor):
        raise InputError(f"latents must be a torch.Tensor, got {shown(value)}")
    if not value.is_floating_point():
        raise InputError(f"latents must be a floating-point tensor, got dtype {value.dtype}")
    if value.device.type == "meta":
        raise InputError("latents are on the meta device (a shape without data); give a tensor with values")
    expected = tuple(expected)
    if tuple(value.shape) != expected:
        raise InputError(f"latents have shape {tuple(value.shape)}, expected {expected} "
                         "(images, latent channels, height / VAE factor, width / VAE factor)")
    check_tensor(value, "latents", "give finite initial latents (e.g. torch.randn)")
    return value

