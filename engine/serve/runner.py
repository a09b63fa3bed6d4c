"""One batch of requests as one pipeline call, each image exactly its request's own.

A library call draws image k's noise from seed + k of the call. A batch mixes requests
with their own seeds, so the runner draws each image's noise from its request's seed the
same way (one CPU generator per image, `noise.image_generators`) and passes it as
`latents=`; a stochastic scheduler's per-step noise then continues from those same
generators, installed in the call's scheduler state before the first step (the pipeline
made its own from the batch's first seed). The image a request gets in a batch is therefore
the image it gets alone, up to the rounding of batched matmuls (README: ±1/255).

An image edit (POST /v1/images/edits) runs alone, as exactly the library call
`pipe(prompt, image=, strength=, mask_image=, seed=)`: img2img draws each image's VAE
posterior sample from its generator before the noise, which the seeded-noise scheme above
does not reproduce, and two edits have different init images anyway (validation.Spec.key).

Each batch is one library call: its GenerationState is its own, and nothing of it outlives
the call. A failing batch is re-run one request at a time, so an error reaches only the
request that causes it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from dite.engine.pipelines.images import png_bytes
from dite.engine.pipelines.noise import image_generators


class Cancelled(Exception):
    """Every request of a running batch was cancelled: the call stops between two steps."""


@dataclasses.dataclass
class Result:
    """What one request gets: a PNG (with dite's metadata) and parameters per image."""

    pngs: list[bytes]
    parameters: list[dict[str, Any]]
    batch_images: int
    timings: dict[str, float]


def generated_size(pipe, height: int, width: int) -> tuple[int, int]:
    """The size the call generates at: PixArt's resolution binning picks its nearest bin
    (and scales the image back to the size asked for); the others, the size itself."""
    if hasattr(pipe, "resolve_size"):
        return pipe.resolve_size(height, width, True)[:2]
    return height, width


def _noise(pipe, spec) -> tuple[torch.Tensor, list[torch.Generator]]:
    """The request's initial noise, drawn as a lone library call would draw it."""
    generators = image_generators(spec.seed, spec.n)
    factor = pipe.vae_scale_factor
    height, width = generated_size(pipe, spec.height, spec.width)
    shape = (pipe.transformer.config.in_channels, height // factor, width // factor)
    rows = [torch.randn(shape, generator=g, dtype=torch.float32) for g in generators]
    return torch.stack(rows), generators


def _call(pipe, specs, latents, hook):
    """The library call for these requests (all with one key)."""
    first = specs[0]
    common = dict(height=first.height, width=first.width, num_inference_steps=first.steps,
                  guidance_scale=first.guidance, accel=first.accel, seed=first.seed, latents=latents,
                  progress=False, plan_hook=hook)
    if first.slg is not None:
        layers, scale, start, stop = first.slg
        common.update(skip_guidance_layers=list(layers), skip_layer_guidance_scale=scale,
                      skip_layer_guidance_start=start, skip_layer_guidance_stop=stop)
    if first.edit is not None:  # its image's size; the pipeline draws its own seeded noise
        common.update(image=first.edit.image, strength=first.edit.strength, latents=None, height=None, width=None)
        if first.edit.mask is not None:
            common["mask_image"] = first.edit.mask
    if pipe.family == "dit":
        return pipe(class_labels=[s.class_label for s in specs for _ in range(s.n)], **common)
    if first.edit is not None:  # one prompt, n images: image k from seed + k, as the library call alone
        return pipe(prompt=first.prompt, negative_prompt=first.negative_prompt, num_images_per_prompt=first.n,
                    **common)
    prompts = [s.prompt for s in specs for _ in range(s.n)]
    negatives = [s.negative_prompt or "" for s in specs for _ in range(s.n)]
    return pipe(prompt=prompts, negative_prompt=negatives, **common)


def run_together(pipe, specs, is_cancelled: Callable[[], bool]) -> list[Result]:
    """One pipeline call for all `specs`; raises Cancelled when is_cancelled() turns true."""
    edit = specs[0].edit is not None
    if edit and len(specs) > 1:
        raise ValueError("an image edit runs alone (its Spec.key is its own)")
    if edit:  # the library call itself: its generators and noise are the request's (seed + k)
        noise, generators = None, None
    else:
        noise, generators = zip(*(_noise(pipe, s) for s in specs))
        noise, generators = torch.cat(noise), [g for group in generators for g in group]

    def hook(step, model_in, t, cond, plan, state):
        if is_cancelled():
            raise Cancelled()
        if step == 0 and generators is not None:
            state.scheduler.generators = generators  # per-step noise from each request's own seeds
        return plan

    out = _call(pipe, specs, noise, hook)
    results, start = [], 0
    for spec in specs:
        params = []
        for k in range(spec.n):
            # Text-to-image calls were given latents: this request's seeded noise.
            seeded = {} if edit else {"seed": spec.seed + k, "latents": "seeded"}
            params.append({**out.parameters[start + k], **seeded})
        pngs = [png_bytes(out.images[start + k], p) for k, p in enumerate(params)]
        results.append(Result(pngs, params, len(out.images), dict(out.timings)))
        start += spec.n
    return results


def run_batch(pipe, jobs) -> list[Result | BaseException]:
    """A result or an exception per job. Jobs cancelled before they start are not run."""
    live = [job for job in jobs if not job.cancelled]
    outcomes: dict[int, Result | BaseException] = {id(job): Cancelled() for job in jobs}
    if not live:
        return [outcomes[id(job)] for job in jobs]
    try:
        for job, result in zip(live, run_together(pipe, [j.spec for j in live],
                                                  lambda: all(j.cancelled for j in live))):
            outcomes[id(job)] = result
    except Cancelled as exc:
        for job in live:
            outcomes[id(job)] = exc
    except Exception as exc:  # noqa: BLE001 - isolated below: each request alone
        if len(live) == 1:
            outcomes[id(live[0])] = exc
        else:
            for job in live:
                outcomes[id(job)] = run_batch(pipe, [job])[0]
    return [outcomes[id(job)] for job in jobs]
