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

    from dite.accel.fastattn import write_plan
    from dite.engine import load
    from dite.engine.parallel import disable, enable

    torch.set_num_threads(1)
    results = []
    for case in cases:
        pipe = load(case["folder"])
        if case.get("fastattn"):  # a DiTFastAttn plan written here: (window, labels per step) for every layer
            window, labels = case["fastattn"]
            path = os.path.join(case["tmp"], f"fastattn-{abs(hash(case['name']))}-{rank}.json")
            write_plan(path, [list(labels)] * len(pipe.transformer.blocks),
                       {"steps": len(labels), "model_id": pipe.model_id, "window": window})
            accel = f"fastattn(plan={path})"
            accel = "+".join(filter(None, [case["call"].get("accel"), accel]))
            case = {**case, "call": {**case["call"], "accel": accel}}
        enable(pipe, case["parallel"])
        out = _call(pipe, case)
        if rank:
            continue  # rank 0 compares (the machine has fewer cores than ranks)
        disable(pipe)  # one process again
        reference = _call(pipe, case)
        # How far acceleration moves the image: a case whose methods changed nothing tests nothing.
        accelerated = float((_call(pipe, {**case, "call": {**case["call"], "accel": None}}).latents
                             - reference.latents).abs().max()) if case["call"].get("accel") else None
        # Relative to the latents' scale: PixArt's final latents reach ~1e2 in model space.
        latents = float((out.latents - reference.latents).abs().max() / reference.latents.abs().max().clamp(min=1))
        images = float(np.abs(out.images - reference.images).max())
        results.append({"name": case["name"], "latents": latents, "images": images, "accel_effect": accelerated,
                        "stats": out.stats["executor"]["parallel"], "parameters": out.parameters[0],
                        "decisions": (out.stats.get("adaptive_decisions"), reference.stats.get("adaptive_decisions"))})
    return results


def fail_mid_generation(rank: int, folder: str, victim: int, step: int, how: str, timeout_s: float):
    """Rank `victim` kills itself (SIGKILL), raises or hangs at denoising step `step`; the others go on."""
    import signal

    import torch

    from dite.engine import load
    from dite.engine.parallel import enable

    torch.set_num_threads(1)
    pipe = enable(load(folder), {"cfg": 2}, timeout_s=timeout_s)

    def hook(i, model_in, t, cond, plan, state):
        if rank == victim and i == step:
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if how == "hang":
                import time

                time.sleep(600)
            raise RuntimeError(f"injected failure at step {i}")
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


def enable_only(rank: int, folder: str, parallel):
    from dite.engine import load
    from dite.engine.parallel import enable

    enable(load(folder), parallel, timeout_s=15)
    return "enabled"
