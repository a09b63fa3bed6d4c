"""Key maps: how a checkpoint's tensors become a module's parameters.

Each model family describes every release layout it accepts as a KeyMap: for each of the
module's own parameter names, the Source it is built from (one key as is, several keys
concatenated, identical copies of which one is kept, a reshaped key). The engine's loader
reads only the keys a map asks for, lazily, and reports missing, unexpected and mis-shaped
keys by name. Export (conversion, the demo models) runs the same maps the other way: every
Source knows its inverse, so there is one table per layout, never a second one to drift.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import torch

from dite.engine.errors import CheckpointError


Tensors = list[torch.Tensor]


@dataclass(frozen=True)
class Source:
    """Where one module tensor comes from: `keys` of the checkpoint, combined by `combine`.

    `split` is the inverse: the module tensor -> one tensor per key. A source that is one
    piece of a stored tensor (OpenCLIP's fused in_proj holds q, k and v) sets `piece` =
    (index, count, dim) instead; export stacks the pieces of a key back together.
    """

    keys: tuple[str, ...]
    combine: Callable[[Tensors], torch.Tensor] | None = field(default=None, compare=False)
    what: str = "copy"
    split: Callable[[torch.Tensor], Tensors] | None = field(default=None, compare=False)
    piece: tuple[int, int, int] | None = None

    def build(self, tensors: Tensors) -> torch.Tensor:
        if self.combine is None:
            return tensors[0]
        return self.combine(tensors)

    def unbuild(self, tensor: torch.Tensor) -> Tensors:
        if self.split is None:
            return [tensor]
        return self.split(tensor)


KeyMap = dict[str, Source]


def take(key: str) -> Source:
    return Source((key,))


def concat(keys: Iterable[str], dim: int = 0) -> Source:
    """Equal parts stored separately (q, k, v), one fused module tensor."""
    keys = tuple(keys)
    return Source(keys, lambda ts: torch.cat(ts, dim=dim), what=f"concat(dim={dim})",
                  split=lambda t: list(t.chunk(len(keys), dim=dim)))


def piece_of(key: str, index: int, count: int, dim: int = 0) -> Source:
    """The `index`-th of `count` equal pieces of one stored tensor."""
    return Source((key,), lambda ts: ts[0].chunk(count, dim=dim)[index],
                  what=f"piece {index} of {count} (dim {dim})", piece=(index, count, dim))


def transformed(key: str, forward: Callable[[torch.Tensor], torch.Tensor],
                inverse: Callable[[torch.Tensor], torch.Tensor], what: str) -> Source:
    """One stored tensor through an invertible map (transpose, reshape, a half swap)."""
    return Source((key,), lambda ts: forward(ts[0]), what=what, split=lambda t: [inverse(t)])


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

    return Source(keys, first_if_equal, what=f"identical copies x{len(keys)}", split=lambda t: [t] * len(keys))


def export_state_dict(keymap: KeyMap, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A module's state dict (its own names) -> the checkpoint keys of the layout `keymap`
    reads: the loader's map run backwards. Every module tensor must be in the map, and
    every key is written once (pieces of one key are stacked in order)."""
    missing = sorted(set(keymap) - set(state))
    unmapped = sorted(set(state) - set(keymap))
    if missing or unmapped:
        raise CheckpointError(f"state dict and key map disagree: missing from the state {missing[:5]}, "
                              f"not in the key map {unmapped[:5]}")
    out: dict[str, torch.Tensor] = {}
    pieces: dict[str, dict[int, torch.Tensor]] = {}
    layout_of_piece: dict[str, tuple[int, int]] = {}
    for name, source in keymap.items():
        tensor = state[name]
        if source.piece is not None:
            index, count, dim = source.piece
            (key,) = source.keys
            pieces.setdefault(key, {})[index] = tensor
            layout_of_piece[key] = (count, dim)
            continue
        for key, part in zip(source.keys, source.unbuild(tensor), strict=True):
            if key in out and not torch.equal(out[key], part):
                raise CheckpointError(f"{key} would be written twice with different values (from {name})")
            out[key] = part.contiguous()
    for key, parts in pieces.items():
        count, dim = layout_of_piece[key]
        if sorted(parts) != list(range(count)):
            raise CheckpointError(f"{key}: pieces {sorted(parts)} of {count} in the key map")
        out[key] = torch.cat([parts[i] for i in range(count)], dim=dim).contiguous()
    return out


def count_indexed(keys: Iterable[str], prefix: str) -> int:
    """Number of blocks under `prefix` ("blocks." -> max index + 1; 0 if none)."""
    indices = [int(k[len(prefix):].split(".", 1)[0]) for k in keys if k.startswith(prefix) and k[len(prefix):].split(".", 1)[0].isdigit()]
    return max(indices) + 1 if indices else 0
