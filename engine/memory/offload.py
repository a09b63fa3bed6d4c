"""Offloading: weights kept on a storage device (the CPU) and moved to the execution device
(a GPU) when they run, so a model larger than the GPU's memory can run on it.

- "model": one component at a time on the execution device (the text encoders, the
  denoiser, the VAE): a component is moved there when any of its modules is called, and
  whichever component was there goes back to storage. Costs one transfer per component per
  call.
- "sequential": the denoiser is streamed piece by piece (each block, and each other child
  module, moved in before it runs and back out after), so only one block's weights are on
  the execution device; the other components are offloaded as in "model". Far slower (every
  step moves every block), for models that do not fit otherwise.

Hooks (forward pre- and post-hooks on the modules) do the moving, and move tensor arguments
to the execution device (the text encoders build their inputs where their weights are). The
pipeline's `device` then reports the execution device, where latents and conditioning are made.
The moving itself is a function (`move`), so the logic is tested on a CPU with both devices
the CPU and a recording `move`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from dite.engine.errors import InputError

MODES = ("model", "sequential")


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


class Offloader:
    """Keeps track of which component is on the execution device and moves them."""

    def __init__(self, execution: torch.device, storage: torch.device,
                 move: Callable[[nn.Module, torch.device], None] | None = None):
        self.execution, self.storage = execution, storage
        self.move = move or (lambda module, device: module.to(device))
        self.resident: nn.Module | None = None
        self.handles: list = []

    def bring(self, component: nn.Module) -> None:
        if self.resident is component:
            return
        if self.resident is not None:
            self.move(self.resident, self.storage)
        self.move(component, self.execution)
        self.resident = component

    def component_hooks(self, component: nn.Module, skip: tuple[nn.Module, ...] = ()) -> None:
        """Bring `component` in whenever any of its modules runs (modules in `skip` excepted)."""
        skipped = {id(m) for s in skip for m in s.modules()}

        def before(module, args, kwargs):
            self.bring(component)
            return _to(args, self.execution), _to(kwargs, self.execution)

        for module in component.modules():
            if id(module) not in skipped:
                self.handles.append(module.register_forward_pre_hook(before, with_kwargs=True))

    def streamed_hooks(self, pieces: list[nn.Module], owner: nn.Module) -> None:
        """Each piece moved in before it runs and out after; the owner's own parameters
        (outside the pieces) counted as resident with nothing else."""
        def before(module, args, kwargs):
            if self.resident is not None and self.resident is not owner:
                self.move(self.resident, self.storage)
            self.resident = owner
            self.move(module, self.execution)
            return _to(args, self.execution), _to(kwargs, self.execution)

        def after(module, args, output):
            self.move(module, self.storage)

        for piece in pieces:
            self.handles.append(piece.register_forward_pre_hook(before, with_kwargs=True))
            self.handles.append(piece.register_forward_hook(after))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def denoiser_pieces(transformer: nn.Module) -> list[nn.Module]:
    """The denoiser's streamed pieces: each block, and each other child module with weights."""
    pieces = []
    for child in transformer.children():
        if isinstance(child, nn.ModuleList):
            pieces.extend(child)
        elif any(True for _ in child.parameters()):
            pieces.append(child)
    return pieces


def enable_offload(pipe, mode: str = "model", execution="cuda", storage="cpu",
                   move: Callable[[nn.Module, torch.device], None] | None = None) -> Offloader:
    """Offload `pipe` (loaded on `storage`) to run on `execution` (see the module docstring)."""
    if mode not in MODES:
        raise InputError(f"offload {mode!r} is unknown; use one of {', '.join(MODES)}")
    offloader = Offloader(torch.device(execution), torch.device(storage), move)
    text = getattr(pipe, "text", None)
    encoders = [m for m in vars(text).values() if isinstance(m, nn.Module)] if text is not None else []
    for encoder in encoders:
        offloader.component_hooks(encoder)
    offloader.component_hooks(pipe.vae)
    if mode == "model":
        offloader.component_hooks(pipe.transformer)
    else:
        pieces = denoiser_pieces(pipe.transformer)
        offloader.streamed_hooks(pieces, pipe.transformer)
        # What the denoiser holds outside its pieces (small: tables, scales) lives on the
        # execution device for good.
        own = [*pipe.transformer.named_parameters(recurse=False), *pipe.transformer.named_buffers(recurse=False)]
        for name, tensor in own:
            tensor.data = tensor.data.to(offloader.execution)
    base = type(pipe)
    execution_device = torch.device(execution)
    pipe.__class__ = type(f"Offloaded{base.__name__}", (base,), {"device": property(lambda self: execution_device)})
    pipe.offloader = offloader
    return offloader
