"""Loading casts tensor by tensor through one small buffer (engine/loading/streaming.py):
the result equals reading whole and casting, bit for bit, for every dtype pair and size."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from dite.engine.errors import CheckpointError
from dite.engine.loading import weights
from dite.engine.loading.loader import load
from dite.engine.loading.streaming import ChunkBuffer, read_as
from dite.engine.loading.weights import SafetensorsReader, open_weights


@pytest.fixture
def checkpoint(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"w32": torch.randn(37, 11, generator=g) * 100, "w16": torch.randn(5, 7, generator=g).half(),
               "wbf": torch.randn(13, generator=g).bfloat16(), "ids": torch.arange(9), "empty": torch.zeros(0, 3),
               "flags": torch.tensor([True, False])}
    path = tmp_path / "t.safetensors"
    save_file(tensors, path)
    return path, tensors


@pytest.mark.parametrize("size", [4, 12, 100, 2**20])  # chunks of 1 fp32 element, a partial last chunk, one chunk
@pytest.mark.parametrize("dtype", [None, torch.float32, torch.float16, torch.bfloat16])
def test_streamed_cast_equals_whole_cast(checkpoint, size, dtype):
    path, tensors = checkpoint
    reader = SafetensorsReader([path])
    buffer = ChunkBuffer(size)
    for key, tensor in tensors.items():
        got = read_as(reader, key, dtype, buffer)
        want = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        assert got.dtype == want.dtype and got.shape == want.shape, key
        assert torch.equal(got, want), key


def test_truncated_tensor_is_one_error(checkpoint, tmp_path):
    path, _ = checkpoint
    reader = SafetensorsReader([path])
    file, header_len, entry = reader.location("w32")
    # Cut the file inside w32 after the reader opened it (a file changing under a running load).
    data = path.read_bytes()
    path.write_bytes(data[:8 + header_len + entry["data_offsets"][0] + 10])
    with pytest.raises(CheckpointError, match="truncated inside w32"):
        read_as(reader, "w32", torch.bfloat16, ChunkBuffer(8))


def test_load_streamed_equals_memory_mapped(monkeypatch):
    streamed = load("demo-dit", dtype="bf16")
    monkeypatch.setattr(weights, "LOAD_WITH_MMAP", True)
    mapped = load("demo-dit", dtype="bf16")
    for (name, a), (_, b) in zip(streamed.transformer.state_dict().items(), mapped.transformer.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert isinstance(open_weights(streamed.source_path / "transformer"), SafetensorsReader)
