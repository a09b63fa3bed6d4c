"""Worker functions for tests/test_parallel*.py: run in spawned ranks (module level, so
they pickle by reference). Each rank makes the call once on one device (the reference)
and once under the parallel plan; rank 0 returns the largest differences and stats."""

from __future__ import annotations

import os


def _call(pipe, case: dict):
    kwargs = dict(case["call"])
    if pipe.family == "dit":
        return pipe(kwargs.pop("labels"), output_type="np", progress=False, **kwargs)
    return pipe(kwargs.pop("prompts"), output_type="np", progress=False, **kwargs)


def compare_cases(rank: int, cases: list[dict]):
    """[(case name, max |latents diff|, max |image diff|, parallel stats)] on rank 0."""
    import numpy as np
    import torch

    from dite.engine import load
    from dite.engine.parallel import enable

    torch.set_num_threads(1)
    results = []
    for case in cases:
        pipe = load(case["folder"])
        reference = _call(pipe, case)
        enable(pipe, case["parallel"])
        out = _call(pipe, case)
        latents = float((out.latents - reference.latents).abs().max())
        images = float(np.abs(out.images - reference.images).max())
        results.append((case["name"], latents, images, out.stats["executor"]["parallel"]))
    return results


def die_mid_generation(rank: int, folder: str, victim: int, step: int):
    """Rank `victim` kills itself (SIGKILL) at denoising step `step`; the others go on."""
    import signal

    import torch

    from dite.engine import load
    from dite.engine.parallel import enable

    torch.set_num_threads(1)
    pipe = enable(load(folder), {"cfg": 2}, timeout_s=15)

    def hook(i, model_in, t, cond, plan, state):
        if rank == victim and i == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return plan

    pipe(0, num_inference_steps=6, guidance_scale=4.0, output_type="np", progress=False, plan_hook=hook)
    return "finished"


def mismatched_call(rank: int, folder: str):
    """Rank 1 asks for another seed: every rank must refuse at the start of the call."""
    import torch

    from dite.engine import load
    from dite.engine.parallel import enable

    torch.set_num_threads(1)
    pipe = enable(load(folder), {"cfg": 2}, timeout_s=15)
    pipe(0, num_inference_steps=2, guidance_scale=4.0, seed=rank, output_type="np", progress=False)
