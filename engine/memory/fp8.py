"""fp8 weight storage: the linear layers' weights stay in float8 (e4m3fn or e5m2, as Stability
and ComfyUI ship fp8 checkpoints: plain casts, no scales) and are upcast to the compute dtype
one layer at a time, as the layer runs. Half the memory of bf16 weights for the linear
layers (nearly all of a DiT's parameters); the arithmetic stays in the compute dtype.

Which weights: every `nn.Linear` of the denoiser and the text encoders. A checkpoint already
in fp8 is read as is (`keeping_fp8()` around `load()`: loading/streaming.py keeps stored fp8
tensors of 2-D weights instead of casting them); any other is cast after loading. Other fp8
tensors (norms, embeddings, the VAE's convolutions) are upcast to the compute dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from dite.engine.errors import InputError

FP8 = {"fp8": torch.float8_e4m3fn, "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


class FP8Linear(nn.Linear):
    """A Linear whose weight is stored in fp8 (`_parameters["weight"]`: what state_dict and
    parameters() hold) and upcast to `compute_dtype` per call. Reading `.weight` gives the
    upcast weight: model code that casts its input to `layer.weight.dtype` (the timestep
    embedders, T5's `wo`) then casts to the compute dtype, never to fp8."""

    compute_dtype: torch.dtype = torch.bfloat16

    @property
    def weight(self) -> torch.Tensor:
        return self._parameters["weight"].to(self.compute_dtype)

    @weight.setter
    def weight(self, value) -> None:
        self._parameters["weight"] = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stored = self._parameters["weight"]
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return nn.functional.linear(x, stored.to(x.dtype), bias)


def fp8_dtype(name: str) -> torch.dtype:
    try:
        return FP8[name]
    except KeyError:
        raise InputError(f"weights dtype {name!r} is unknown; use {', '.join(FP8)}") from None


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of most of `module`'s floating, non-fp8 parameters (bf16 if it has none)."""
    counts: dict[torch.dtype, int] = {}
    for param in module.parameters():
        if param.is_floating_point() and param.dtype not in FP8_DTYPES:
            counts[param.dtype] = counts.get(param.dtype, 0) + param.numel()
    return max(counts, key=counts.get) if counts else torch.bfloat16


def _modules(pipe) -> list[nn.Module]:
    text = getattr(pipe, "text", None)
    encoders = [m for m in vars(text).values() if isinstance(m, nn.Module)] if text is not None else []
    return [pipe.transformer, *encoders]


@torch.no_grad()
def store_fp8(pipe, dtype: torch.dtype = torch.float8_e4m3fn) -> dict[str, int]:
    """Keep the linear weights of `pipe`'s denoiser and text encoders in `dtype` (fp8);
    returns {"fp8_bytes", "linear_layers"}."""
    if dtype not in FP8_DTYPES:
        raise InputError(f"fp8 storage takes float8_e4m3fn or float8_e5m2, not {dtype}")
    compute = compute_dtype(pipe.transformer)
    count, stored = 0, 0
    for root in _modules(pipe):
        for module in root.modules():
            if type(module) is nn.Linear or isinstance(module, FP8Linear):
                weight = module._parameters["weight"]
                if weight.dtype not in FP8_DTYPES:  # cast here; an fp8 file's weights came as they are
                    weight = weight.to(dtype)
                module._parameters["weight"] = nn.Parameter(weight, requires_grad=False)
                module.__class__ = FP8Linear
                module.compute_dtype = compute
                count, stored = count + 1, stored + weight.numel() * weight.element_size()
        for name, param in list(root.named_parameters()):
            owner_name, _, attr = name.rpartition(".")
            owner = root.get_submodule(owner_name)
            if param.dtype in FP8_DTYPES and not (isinstance(owner, FP8Linear) and attr == "weight"):
                setattr(owner, attr, nn.Parameter(param.to(compute), requires_grad=False))
    for name, param in list(pipe.vae.named_parameters()):
        if param.dtype in FP8_DTYPES:
            owner = pipe.vae.get_submodule(name.rpartition(".")[0])
            setattr(owner, name.rpartition(".")[2], nn.Parameter(param.to(torch.float32), requires_grad=False))
    return {"fp8_bytes": stored, "linear_layers": count}
