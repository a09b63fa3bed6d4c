"""Writing safetensors files tensor by tensor, so no whole model is ever held in memory.

A safetensors file is an 8-byte header length, a JSON header giving every tensor's dtype,
shape and byte range, then the raw bytes (docs/checkpoints.md §0). Since conversion knows
every output tensor's shape and dtype before reading any data (the key maps run on the
meta device), the header is written first and each tensor's bytes are appended as soon as
that tensor exists. Shards split the planned tensors in order by a size limit and get the
`*.safetensors.index.json` that diffusers and transformers read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from dite.engine.dtypes import safetensors_names
from dite.engine.errors import CheckpointError, InputError



@dataclass(frozen=True)
class PlannedTensor:
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


def parse_size(text: str | int | None) -> int | None:
    """'5GB', '500MB', '10KB' or a byte count -> bytes (decimal units, as diffusers uses)."""
    if text is None or isinstance(text, int):
        return text
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    upper = str(text).strip().upper()
    for unit, factor in units.items():
        if upper.endswith(unit) and upper[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(upper[: -len(unit)]) * factor)
    if upper.isdigit():
        return int(upper)
    raise InputError(f"cannot read the size {text!r}; write it like 5GB, 500MB or 1000000")


class SafetensorsWriter:
    """One safetensors file whose tensors are announced up front and then written in order."""

    def __init__(self, path: Path, planned: list[PlannedTensor], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self._planned = planned
        self._next = 0
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        for item in planned:
            header[item.key] = {"dtype": safetensors_names()[item.dtype], "shape": list(item.shape),
                                "data_offsets": [offset, offset + item.nbytes]}
            offset += item.nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors pads
        self._file = open(self.path, "wb")
        self._file.write(len(text).to_bytes(8, "little"))
        self._file.write(text)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._planned):
            raise CheckpointError(f"{self.path}: {key} was not planned for this file")
        item = self._planned[self._next]
        if key != item.key or tuple(tensor.shape) != item.shape or tensor.dtype != item.dtype:
            raise CheckpointError(f"{self.path}: expected {item.key} {item.shape} {item.dtype} next, got {key} "
                                  f"{tuple(tensor.shape)} {tensor.dtype} (the source changed while converting?)")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(data.numpy()))
        self._next += 1

    def close(self) -> None:
        self._file.close()
        if self._next != len(self._planned):
            missing = [p.key for p in self._planned[self._next:]]
            raise CheckpointError(f"{self.path}: {len(missing)} planned tensor(s) were never written, e.g. {missing[:3]}")


def shard_names(stem: str, count: int) -> list[str]:
    if count == 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def split_into_shards(planned: list[PlannedTensor], max_shard_size: int | None) -> list[list[PlannedTensor]]:
    """Consecutive runs of `planned` of at most `max_shard_size` bytes each (a tensor larger
    than the limit gets a shard of its own, as diffusers and transformers do)."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for item in planned:
        if max_shard_size is not None and shards[-1] and size + item.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item.nbytes
    return shards


class ShardedWriter:
    """`<stem>.safetensors`, or `<stem>-0000k-of-0000n.safetensors` plus
    `<stem>.safetensors.index.json` when the tensors exceed `max_shard_size`."""

    def __init__(self, folder: Path, stem: str, planned: list[PlannedTensor], max_shard_size: int | None,
                 metadata: dict[str, str] | None = None):
        self.folder = Path(folder)
        self._shards = split_into_shards(planned, max_shard_size)
        self._names = shard_names(stem, len(self._shards))
        self._metadata = metadata
        self._index = 0
        self._left = len(self._shards[0])
        self._writer = SafetensorsWriter(self.folder / self._names[0], self._shards[0], metadata)
        if len(self._shards) > 1:
            weight_map = {item.key: name for shard, name in zip(self._shards, self._names) for item in shard}
            index = {"metadata": {"total_size": sum(item.nbytes for item in planned)}, "weight_map": weight_map}
            (self.folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    @property
    def files(self) -> list[Path]:
        return [self.folder / name for name in self._names]

    def write(self, key: str, tensor: torch.Tensor) -> None:
        while self._left == 0:  # the current shard is full: the next one starts
            self._writer.close()
            self._index += 1
            self._writer = SafetensorsWriter(self.folder / self._names[self._index], self._shards[self._index],
                                             self._metadata)
            self._left = len(self._shards[self._index])
        self._writer.write(key, tensor)
        self._left -= 1

    def close(self) -> None:
        self._writer.close()
        if self._index != len(self._shards) - 1:
            raise CheckpointError(f"{self.folder}: only {self._index + 1} of {len(self._shards)} shards were written")
