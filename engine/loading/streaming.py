"""Reading a checkpoint tensor already in the dtype the model wants, through one small
reusable buffer, so that loading an fp32 file as bf16 never holds an fp32 copy of the
model, nor even of a whole tensor.

A safetensors tensor whose stored dtype differs from the wanted one is read in chunks of
`CHUNK_BYTES` into one buffer and converted chunk by chunk into its final tensor; one of the
same dtype is read with positioned reads straight into its final buffer. Either way nothing
is memory-mapped: a map's touched pages stay resident until the file is closed. And nothing
temporary of the tensor's size is allocated, which matters as much: freed temporaries leave
holes in the C heap that stay resident (fp32 -> bf16 loading of DiT-XL kept 0.24 GiB of them
when each tensor was read whole and then cast; tools/bench_load_memory.py).
"""

from __future__ import annotations

import torch

from dite.engine.dtypes import safetensors_dtypes
from dite.engine.errors import CheckpointError

CHUNK_BYTES = 4 * 2**20


class ChunkBuffer:
    """The one staging buffer of a load (allocated on first use)."""

    def __init__(self, size: int = CHUNK_BYTES):
        self.size = size
        self._data: bytearray | None = None

    @property
    def data(self) -> bytearray:
        if self._data is None:
            self._data = bytearray(self.size)
        return self._data


def read_as(reader, key: str, dtype: torch.dtype | None, buffer: ChunkBuffer) -> torch.Tensor:
    """Tensor `key` of `reader`, floating tensors in `dtype` (None: as stored). Safetensors
    files are streamed as described above; other readers give their tensor, then cast."""
    from dite.engine.loading.weights import SafetensorsReader

    if not isinstance(reader, SafetensorsReader):
        tensor = reader.get(key)
        return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    file, header_len, entry = reader.location(key)
    stored = safetensors_dtypes()[entry["dtype"]]
    shape, (begin, end) = entry["shape"], entry["data_offsets"]
    wanted = dtype if dtype is not None and stored.is_floating_point else stored
    out = torch.empty(shape, dtype=wanted)
    if end == begin:
        return out
    flat = out.view(-1)
    with open(file, "rb") as f:
        f.seek(8 + header_len + begin)
        if wanted == stored:  # straight into the final tensor
            target = flat.view(torch.uint8).numpy()
            if f.readinto(memoryview(target)) != end - begin:
                raise CheckpointError(f"{file} is truncated inside {key}; download it again")
            return out
        item = stored.itemsize
        per_chunk = max(1, buffer.size // item)
        data = buffer.data
        for start in range(0, flat.numel(), per_chunk):
            count = min(per_chunk, flat.numel() - start)
            view = memoryview(data)[:count * item]
            if f.readinto(view) != count * item:
                raise CheckpointError(f"{file} is truncated inside {key}; download it again")
            flat[start:start + count].copy_(torch.frombuffer(data, dtype=stored, count=count))
    return out
