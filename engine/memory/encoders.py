"""Text encoders released once the prompts are encoded (`release_encoders=True`,
`--low-memory`): SD3's CLIP-L, CLIP-G and T5 (T5-XXL alone is 4.7B parameters) and PixArt's
T5 are needed only before denoising, so their memory can serve the denoiser and the VAE.

The pipeline's `encode_prompts` is wrapped (on the instance): each request's conditioning
is kept (a few MB), and after `release_after` calls (the CLI: one per call of the run)
every encoder module is dropped.
Later calls with prompts already encoded are served from what was kept; a new prompt is an
InputError (load the model again to encode it).
"""

from __future__ import annotations

import gc

from torch import nn

from dite.engine.errors import InputError


def encoder_modules(pipe) -> list[str]:
    """Names of the text-encoder modules on `pipe.text` (empty for DiT, which has none)."""
    text = getattr(pipe, "text", None)
    if text is None:
        return []
    return [name for name, value in vars(text).items() if isinstance(value, nn.Module)]


def release_encoders(pipe, release_after: int = 1):
    """Wrap `pipe.encode_prompts` to drop the text encoders after `release_after` calls;
    returns the pipeline. A pipeline without text encoders (DiT) is returned as is."""
    if not encoder_modules(pipe):
        return pipe
    if release_after < 1:
        raise InputError(f"release_after must be at least 1, got {release_after}")
    encode = pipe.encode_prompts
    kept: dict = {}
    calls = [0]

    def encode_then_release(prompts, negatives, length):
        key = (tuple(prompts), tuple(negatives) if negatives is not None else None, length)
        calls[0] += 1  # every call counts, served from what was kept or not
        if key in kept:
            _release_when_due()
            return kept[key]
        if not encoder_modules(pipe):
            raise InputError("the text encoders were released after encoding (release_encoders / --low-memory): "
                             "this prompt was not encoded before; load the model again to encode new prompts")
        kept[key] = encode(prompts, negatives, length)
        _release_when_due()
        return kept[key]

    def _release_when_due():
        if calls[0] >= release_after:
            for name in encoder_modules(pipe):
                setattr(pipe.text, name, None)
            gc.collect()

    pipe.encode_prompts = encode_then_release
    return pipe
