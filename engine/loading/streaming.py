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

from contextlib import contextmanager
from contextvars import ContextVar

import torch

from dite.engine.dtypes import safetensors_dtypes
from dite.engine.errors import CheckpointError

CHUNK_BYTES = 4 * 2**20
_keep_fp8: ContextVar[bool] = ContextVar("dite_keep_fp8", default=False)


@contextmanager
def keeping_fp8():
    """Within the block, 2-D weights stored in fp8 are loaded as stored (engine/memory/fp8.py
    upcasts them per layer), not cast to the load dtype."""
    token = _keep_fp8.set(True)
    try:
        yield
    finally:
        _keep_fp8.reset(token)


def keeps(tensor: torch.Tensor) -> bool:
    """Whether `tensor` (as read) is an fp8 weight to be kept as it is."""
    return _keep_fp8.get() and tensor.dim() == 2 and tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


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
        return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() and not keeps(tensor) else tensor
    file, header_len, entry = reader.location(key)
    stored = safetensors_dtypes()[entry["dtype"]]
    shape, (begin, end) = entry["shape"], entry["data_offsets"]
    wanted = dtype if dtype is not None and stored.is_floating_point else stored
    if _keep_fp8.get() and len(shape) == 2 and stored in (torch.float8_e4m3fn, torch.float8_e5m2):
        wanted = stored
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
