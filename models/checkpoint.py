"""Key maps: how a checkpoint's tensors become a module's parameters.

Each model family describes every release layout it accepts as a KeyMap: for each of the
module's own parameter names, the Source it is built from (one key as is, several keys
concatenated, identical copies of which one is kept, a reshaped key). The engine's loader
reads only the keys a map asks for, lazily, and reports missing, unexpected and mis-shaped
keys by name. Conversion tools run the same maps the other way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from dite.engine.errors import CheckpointError


@dataclass(frozen=True)
class Source:
    """Where one module tensor comes from: `keys` of the checkpoint, combined by `combine`."""

    keys: tuple[str, ...]
    combine: Callable[[list[torch.Tensor]], torch.Tensor] | None = field(default=None, compare=False)
    what: str = "copy"

    def build(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        if self.combine is None:
            return tensors[0]
        return self.combine(tensors)


KeyMap = dict[str, Source]


def take(key: str) -> Source:
    return Source((key,))


def concat(keys: Iterable[str], dim: int = 0) -> Source:
    keys = tuple(keys)
    return Source(keys, lambda ts: torch.cat(ts, dim=dim), what=f"concat(dim={dim})")


def reshaped(key: str, shape: tuple[int, ...]) -> Source:
    """A tensor stored in another shape of the same size (a 1x1 conv kernel as a matrix)."""
    return Source((key,), lambda ts: ts[0].reshape(shape), what=f"reshape{tuple(shape)}")


def identical_copies(keys: Iterable[str]) -> Source:
    """A tensor a layout stores several times (diffusers' DiT keeps one timestep embedder
    per block); all copies must be equal, since the module has one."""
    keys = tuple(keys)

    def first_if_equal(tensors: list[torch.Tensor]) -> torch.Tensor:
        for key, tensor in zip(keys[1:], tensors[1:]):
            if not torch.equal(tensor, tensors[0]):
                raise CheckpointError(
                    f"{key} differs from {keys[0]}: this layout stores copies of one tensor, and "
                    "dite's module keeps a single one, so differing copies cannot be represented. "
                    "Was this checkpoint fine-tuned with untied copies?"
                )
        return tensors[0]

    return Source(keys, first_if_equal, what=f"identical copies x{len(keys)}")


def count_indexed(keys: Iterable[str], prefix: str) -> int:
    """Number of blocks under `prefix` ("blocks." -> max index + 1; 0 if none)."""
    indices = [int(k[len(prefix):].split(".", 1)[0]) for k in keys if k.startswith(prefix) and k[len(prefix):].split(".", 1)[0].isdigit()]
    return max(indices) + 1 if indices else 0
