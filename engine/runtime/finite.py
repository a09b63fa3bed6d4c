"""NaN and infinity, caught where they arise and named.

A non-finite value anywhere in a generation ends as a black (or noise) image that says
nothing about its cause. dite stops with a NonFiniteError at the first place it can see
one, naming it: given `latents=`, the guided prediction of the transformer or the scheduler
step of a named sampling step, the VAE's decoded images. (Weights are checked as they are
read, in engine/loading/weights.py, which must not import the runtime.)

Cost while sampling: `StepWatch.step` adds two reductions per step over tensors the size
of the latents (isfinite(...).all() of the prediction and of the new latents, written into
a small device tensor), about 1/1000 of a step's activations, and NO host synchronisation
per step: the flags are read once, after the last step (`StepWatch.check`), so the GPU
queue never drains mid-loop. The price is that a NaN at step 2 of 28 is reported when the
loop ends (the steps after it run on NaN), which only the failing call pays.
"""

from __future__ import annotations

import math
import numbers

import torch

from dite.engine.errors import DiteError, InputError, NonFiniteError


def dtype_hint(dtype: torch.dtype) -> str:
    """What to try when a model running in `dtype` produced a NaN or an infinity."""
    if dtype == torch.float16:
        return ("float16 overflow is the usual cause: load the model with dtype='bf16' or 'fp32' "
                "(CLI: --dtype bf16 / --dtype fp32)")
    if dtype == torch.bfloat16:
        return "try dtype='fp32' (CLI: --dtype fp32); if it persists the weights are damaged"
    return "the weights or the inputs are damaged (check the checkpoint, or try another scheduler)"


def count_bad(tensor: torch.Tensor) -> str:
    """'3 NaN and 1 infinite of 4096 values' (one sync; for error messages only)."""
    nan = int(torch.isnan(tensor).sum())
    inf = int(torch.isinf(tensor).sum())
    return f"{nan} NaN and {inf} infinite of {tensor.numel()} values"


def check_tensor(tensor: torch.Tensor, what: str, hint: str) -> None:
    """Raise NonFiniteError naming `what` if `tensor` holds a NaN or an infinity (one sync)."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise NonFiniteError(f"{what} contains {count_bad(tensor)}; {hint}")


def check_number(name: str, value, error: type[DiteError] = InputError) -> float:
    """`value` as a float if it is a finite real number (not bool, not str); else `error`
    naming `name`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        text = " ".join(repr(value).split())[:60]
        raise error(f"{name} must be a real number, got {text} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise error(f"{name} must be a finite number, got {value}")
    return value


class StepWatch:
    """Per-step finiteness flags of one sampling loop, read once at its end.

    `step(i, prediction, latents)` right after the scheduler step records whether the
    (guided) prediction the scheduler received and the latents it returned are finite;
    `check()` after the loop raises for the first step where either is not, naming the
    step and which of the two produced it.
    """

    def __init__(self, num_steps: int, device: torch.device | str):
        # [step, (prediction, latents)]: True where finite. Steps never run stay True.
        self.flags = torch.ones(num_steps, 2, dtype=torch.bool, device=device)
        self.dtype = torch.float32  # the prediction's, for the hint

    def step(self, i: int, prediction: torch.Tensor, latents: torch.Tensor) -> None:
        # Two reductions, written on the device: no host sync here.
        self.dtype = prediction.dtype
        torch.all(torch.isfinite(prediction), out=self.flags[i, 0])
        torch.all(torch.isfinite(latents), out=self.flags[i, 1])

    def check(self) -> None:
        """The loop's one host sync: raise for the first step that went non-finite."""
        flags = self.flags.cpu()
        if bool(flags.all()):
            return
        bad = (~flags).any(dim=1).nonzero()[0, 0].item()
        step = f"step {bad} (steps 0..{flags.shape[0] - 1})"
        if not flags[bad, 0]:
            where = f"the transformer's prediction (after guidance) at {step}"
        else:
            where = f"the scheduler step at {step}, from a finite prediction"
        raise NonFiniteError(f"sampling produced NaN or infinite values: {where}; {dtype_hint(self.dtype)}")
