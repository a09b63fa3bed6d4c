"""Reading checkpoint files lazily and filling meta-device modules from them.

Readers expose the same small interface over safetensors files (single or sharded) and
torch `.pt/.pth/.bin` files: `keys()`, `shape(key)`, `get(key)`, `where(key)`. Safetensors
are memory-mapped and read tensor by tensor; torch files are opened with
`weights_only=True, mmap=True`, so no arbitrary code is unpickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

from dite.engine.dtypes import safetensors_dtypes, safetensors_names
from dite.engine.errors import CheckpointError, ConfigError, NonFiniteError
from dite.models.checkpoint import KeyMap

SAFETENSORS_SUFFIXES = (".safetensors",)
# load_weights streams each safetensors tensor into its final dtype (loading/streaming.py):
# through a memory map, touched pages stay resident until the reader closes, so an fp32 file
# loaded as bf16 held both (peak = file + model); streamed, the peak is the model + a 4 MiB
# buffer (tools/bench_load_memory.py measures both; True restores the map for that).
LOAD_WITH_MMAP = False
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


class WeightReader:
    """Lazy access to the tensors of one checkpoint (possibly several shard files)."""

    def keys(self) -> list[str]:
        raise TypeError

    def shape(self, key: str) -> tuple[int, ...]:
        raise TypeError

    def get(self, key: str, *, mmap: bool = True) -> torch.Tensor:
        """The tensor `key`. mmap=False reads a safetensors tensor with plain positioned reads
        instead of through the file's memory map, whose touched pages stay in the process's
        resident set: conversion, which reads every tensor once, passes it so that a whole
        file never counts against it (tools/bench_convert_memory.py measures both)."""
        raise TypeError

    def where(self, key: str) -> str:
        raise TypeError

    def dtype(self, key: str) -> str:
        """The stored dtype's short name ("F32", "BF16", ...), without reading the data."""
        raise TypeError

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: self.shape(k) for k in self.keys()}


class SafetensorsReader(WeightReader):
    def __init__(self, files: Iterable[str | os.PathLike], key_prefix: str = ""):
        from safetensors import safe_open

        self._headers: dict[str, tuple[int, dict]] = {}  # file -> (header length, header), for pread
        self._handles = {}
        self._file_of: dict[str, str] = {}
        self._prefix = key_prefix
        for file in files:
            file = str(file)
            if not os.path.isfile(file):
                raise CheckpointError(f"{file}: no such file")
            try:
                handle = safe_open(file, framework="pt")
            except Exception as exc:  # safetensors raises its own error types
                raise CheckpointError(
                    f"{file} is not a readable safetensors file ({exc}); it may be truncated or "
                    "corrupt: download it again"
                ) from None
            self._handles[file] = handle
            size = os.path.getsize(file)
            for key in handle.keys():
                # A truncated file can have an intact header; check every tensor's extent.
                self._file_of[key] = file
            _check_extent(file, size)
        self._keys = [k for k in self._file_of if k.startswith(key_prefix)]

    def keys(self) -> list[str]:
        return [k[len(self._prefix):] for k in self._keys]

    def _handle(self, key: str):
        full = self._prefix + key
        try:
            return self._handles[self._file_of[full]], full
        except KeyError:
            raise CheckpointError(f"tensor {key!r} is not in {sorted(self._handles)}") from None

    def shape(self, key: str) -> tuple[int, ...]:
        handle, full = self._handle(key)
        return tuple(handle.get_slice(full).get_shape())

    def dtype(self, key: str) -> str:
        handle, full = self._handle(key)
        return handle.get_slice(full).get_dtype()

    def get(self, key: str, *, mmap: bool = True) -> torch.Tensor:
        handle, full = self._handle(key)
        if not mmap:
            file = self._file_of[full]
            if file not in self._headers:
                self._headers[file] = _read_header(file)
            return _pread_tensor(file, *self._headers[file], full)
        try:
            return handle.get_tensor(full)
        except Exception as exc:
            raise CheckpointError(f"cannot read {key!r} from {self.where(key)}: {exc}") from None

    def where(self, key: str) -> str:
        return self._file_of.get(self._prefix + key, "?")

    def location(self, key: str) -> tuple[str, int, dict]:
        """(file, header length, header entry) of `key`, for positioned reads (loading/streaming.py)."""
        _, full = self._handle(key)
        file = self._file_of[full]
        if file not in self._headers:
            self._headers[file] = _read_header(file)
        header_len, header = self._headers[file]
        return file, header_len, header[full]


def _read_header(file: str) -> tuple[int, dict]:
    with open(file, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        return header_len, json.loads(f.read(header_len))


def _pread_tensor(file: str, header_len: int, header: dict, key: str) -> torch.Tensor:
    """One tensor of a safetensors file read with positioned reads (no memory map)."""
    entry = header[key]
    begin, end = entry["data_offsets"]
    dtype, shape = safetensors_dtypes()[entry["dtype"]], entry["shape"]
    if end == begin:
        return torch.empty(shape, dtype=dtype)
    data = bytearray(end - begin)
    with open(file, "rb") as f:
        f.seek(8 + header_len + begin)
        if f.readinto(data) != end - begin:
            raise CheckpointError(f"{file} is truncated inside {key}; download it again")
    return torch.frombuffer(data, dtype=dtype).reshape(shape)


def _check_extent(file: str, size: int) -> None:
    """Raise if the data section of a safetensors file ends before its header says."""
    with open(file, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        raise CheckpointError(
            f"{file} is truncated: its header describes {8 + header_len + end} bytes but the file "
            f"has {size}; download it again"
        )


class StateDictReader(WeightReader):
    """A state dict already in memory (or memory-mapped by torch.load)."""

    def __init__(self, state: Mapping[str, torch.Tensor], origin: str):
        self._state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        self._origin = origin

    def keys(self) -> list[str]:
        return list(self._state)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._state[key].shape)

    def get(self, key: str, *, mmap: bool = True) -> torch.Tensor:
        return self._state[key]  # torch.load already chose how to read it

    def dtype(self, key: str) -> str:
        return safetensors_names().get(self._state[key].dtype, str(self._state[key].dtype))

    def where(self, key: str) -> str:
        return self._origin


# Wrapper keys of training checkpoints, in the order we prefer them (EMA weights first).
_WRAPPERS = ("ema", "state_dict", "model", "module")


def read_torch_file(path: str | os.PathLike) -> StateDictReader:
    path = str(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "zip" in str(exc).lower() or "mmap" in str(exc).lower():
            # Legacy (non-zip) torch files cannot be memory-mapped.
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as inner:
                raise _unsafe_or_corrupt(path, inner) from None
        else:
            raise _unsafe_or_corrupt(path, exc) from None
    except Exception as exc:
        raise _unsafe_or_corrupt(path, exc) from None
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict")
    for wrapper in _WRAPPERS:
        if wrapper in state and isinstance(state[wrapper], Mapping):
            state = state[wrapper]
            break
    return StateDictReader(state, path)


def _unsafe_or_corrupt(path: str, exc: Exception) -> CheckpointError:
    text = str(exc).split("\n")[0]
    if "weights_only" in str(exc) or "Unsupported global" in str(exc):
        return CheckpointError(
            f"{path} contains Python objects besides tensors ({text[:200]}); dite loads .pt files "
            "with weights_only=True and never unpickles code. Save just the state dict "
            "(e.g. torch.save(ckpt['ema'], 'weights.pt')) or convert it to safetensors"
        )
    return CheckpointError(f"{path} is not a readable torch checkpoint ({text[:200]}); it may be truncated")


def open_weights(path: str | os.PathLike) -> WeightReader:
    """A reader for a weights file, a sharded index json, or a folder holding one of these."""
    path = Path(path)
    if path.is_dir():
        return open_weights(find_weights_file(path))
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    name = path.name
    if name.endswith(".index.json") or (name.endswith(".json") and ".index." in name):
        return _open_index(path)
    if name.endswith(SAFETENSORS_SUFFIXES):
        return SafetensorsReader([path])
    if name.endswith(TORCH_SUFFIXES):
        return read_torch_file(path)
    raise CheckpointError(f"{path}: unknown weights format (expected .safetensors, .pt, .pth, .bin or .ckpt)")


def _open_index(index: Path) -> WeightReader:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except Exception as exc:
        raise CheckpointError(f"{index} is not a valid shard index ({exc})") from None
    files = sorted({index.parent / f for f in weight_map.values()})
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise CheckpointError(f"shard index {index} names missing files: {', '.join(missing)}")
    if all(f.name.endswith(SAFETENSORS_SUFFIXES) for f in files):
        return SafetensorsReader(files)
    merged: dict[str, torch.Tensor] = {}
    for f in files:
        merged.update(read_torch_file(f)._state)
    return StateDictReader(merged, str(index))


def find_weights_file(folder: Path, stem: str | None = None, variant: str | None = None) -> Path:
    """The weights of a diffusers/transformers component folder, preferring safetensors.

    Looks for `<stem>[.<variant>].safetensors`, its sharded index, then the `.bin` forms, for
    the stems diffusers (`diffusion_pytorch_model`) and transformers (`model`,
    `pytorch_model`) use.
    """
    stems = [stem] if stem else ["diffusion_pytorch_model", "model", "pytorch_model"]
    variants = [variant, None] if variant else [None]
    for var in variants:
        for s in stems:
            infix = f".{var}" if var else ""
            for candidate in (
                f"{s}{infix}.safetensors",
                f"{s}.safetensors.index{infix}.json",
                f"{s}{infix}.safetensors.index.json",
                f"{s}{infix}.bin",
                f"{s}.bin.index{infix}.json",
                f"{s}{infix}.bin.index.json",
            ):
                if (folder / candidate).exists():
                    return folder / candidate
    found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise CheckpointError(
        f"no weights file in {folder} (looked for {stems[0]}.safetensors and its variants; "
        f"the folder has: {', '.join(found) or 'nothing'})"
    )


def open_component(folder: Path, classes: Iterable[str], detect, what: str, variant: str | None = None):
    """(config.json dict, weights reader) of one diffusers component folder, checked to hold
    one of `classes` whose weights `detect(keys)` calls the "diffusers" layout."""
    config_file = folder / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{folder} has no config.json")
    from dite.engine.loading.config_files import read_config

    config = read_config(config_file, f"{what} config")
    classes = tuple(classes)
    if config.get("_class_name") not in classes:
        raise ConfigError(f"{config_file}: _class_name is {config.get('_class_name')!r}, not a {what} "
                          f"({' or '.join(classes)})")
    reader = open_weights(find_weights_file(folder, variant=variant))
    if detect(reader.keys()) != "diffusers":
        raise CheckpointError(f"the weights in {folder} are not a diffusers {what}")
    return config, reader


def key_differences(expected: Iterable[str], available: Iterable[str], ignore: Iterable[str] = (),
                    scope: Iterable[str] | None = None) -> tuple[list[str], list[str]]:
    """(missing, unexpected), each sorted: the `expected` checkpoint keys not `available`,
    and the keys of `scope` (default: all `available`) neither expected nor in `ignore`.
    Loading (load_weights) and conversion and `dite inspect` (tensor_stream.key_report)
    judge a checkpoint by this one rule."""
    expected, available = set(expected), set(available)
    missing = sorted(expected - available)
    unexpected = sorted(set(available if scope is None else scope) - expected - set(ignore))
    return missing, unexpected


def load_weights(
    module: nn.Module,
    keymap: KeyMap,
    reader: WeightReader,
    *,
    ignore: Iterable[str] = (),
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Fill `module` (built on the meta device) from `reader` through `keymap`.

    Every parameter and persistent buffer of the module must have a source; every tensor of
    the checkpoint must be used by the map or listed in `ignore`. Floating tensors are cast
    to `dtype`. Errors name the key, the file and the expected shape.
    """
    expected = module.state_dict(keep_vars=True)
    available = set(reader.keys())

    unmapped = sorted(set(expected) - set(keymap))
    if unmapped:
        raise CheckpointError(f"internal key map misses module tensors: {', '.join(unmapped[:5])}")
    missing, unexpected = key_differences((k for name in expected for k in keymap[name].keys), available, ignore)
    if missing:
        origin = reader.where(next(iter(available))) if available else "the checkpoint"
        raise CheckpointError(
            f"{len(missing)} tensor(s) missing from {origin}, e.g. {', '.join(missing[:5])}; "
            "the file is incomplete or belongs to another model"
        )
    if unexpected:
        raise CheckpointError(
            f"{len(unexpected)} unexpected tensor(s) in {reader.where(unexpected[0])}, e.g. "
            f"{', '.join(unexpected[:5])}; the checkpoint does not fit the detected model config"
        )

    from dite.engine.loading.streaming import ChunkBuffer, keeps, read_as
    from dite.engine.runtime.progress import track  # a bar only while a caller reports progress

    state, buffer = {}, ChunkBuffer()
    for name, target in track(expected.items(), len(expected), f"load {type(module).__name__}"):
        source = keymap[name]
        # Cast while reading (key maps only concatenate, split, reshape, transpose: all commute with a cast).
        cast = dtype if dtype is not None else (target.dtype if target.is_floating_point() else None)
        try:
            tensor = source.build([reader.get(k) if LOAD_WITH_MMAP else read_as(reader, k, cast, buffer)
                                   for k in source.keys])
        except RuntimeError as exc:  # e.g. concatenating or reshaping tensors of the wrong size
            shapes = ", ".join(f"{k} {reader.shape(k)}" for k in source.keys)
            raise CheckpointError(
                f"cannot build {name} (expected shape {tuple(target.shape)}) from {shapes} in "
                f"{reader.where(source.keys[0])} by {source.what}: {str(exc).splitlines()[0]}"
            ) from None
        if tuple(tensor.shape) != tuple(target.shape):
            keys = " + ".join(source.keys)
            raise CheckpointError(
                f"{keys} in {reader.where(source.keys[0])} has shape {tuple(tensor.shape)} but "
                f"the model expects {tuple(target.shape)} for {name}"
            )
        if keeps(tensor):  # an fp8 weight loaded for fp8 storage (engine/memory/fp8.py)
            pass
        elif dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        elif tensor.is_floating_point() and target.is_floating_point():
            tensor = tensor.to(target.dtype)
        state[name] = tensor.to(device)
        check_finite(name, source.keys, reader, state[name])
    module.load_state_dict(state, strict=True, assign=True)
    _materialize_computed_buffers(module, device, dtype)
    return module.eval().requires_grad_(False)


def build_module(factory, keymap: KeyMap, reader: WeightReader, *, ignore: Iterable[str] = (),
                 dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> nn.Module:
    """Build `factory()` on the meta device (no memory) and fill it from `reader`."""
    with torch.device("meta"):
        module = factory()
    return load_weights(module, keymap, reader, ignore=ignore, dtype=dtype, device=device)


def _materialize_computed_buffers(module: nn.Module, device, dtype) -> None:
    """Modules with non-persistent buffers (computed, not stored) rebuild them here."""
    for sub in module.modules():
        init = getattr(sub, "init_computed_buffers", None)
        if init is not None:
            init(device=torch.device(device))


def _float32_sum(tensor: torch.Tensor, chunk: int = 2**20) -> torch.Tensor:
    """The float32 sum of a tensor, over chunks of a million elements: summing a bf16 / fp16
    tensor with dtype=float32 converts all of it first, a temporary as large as the tensor
    in float32 whose freed heap space stays resident (tools/bench_load_memory.py)."""
    flat = tensor.reshape(-1)
    if tensor.dtype == torch.float32:
        return flat.sum()
    # .to() per chunk: fp8 tensors have no sum kernel of their own
    return torch.stack([part.to(torch.float32).sum() for part in flat.split(chunk)]).sum()


def check_finite(name: str, keys: list[str], reader: WeightReader, tensor: torch.Tensor) -> None:
    """Raise NonFiniteError if a loaded floating tensor holds NaN or infinity, naming the
    checkpoint tensor and file, and whether the file holds them or the cast to a narrower
    dtype overflowed. One float32 sum per tensor where it was loaded (a NaN or an infinity
    makes it non-finite; a sum is a vectorised pass, where CPU isfinite() is ~20x slower),
    and one sync per tensor on an accelerator; only a non-finite sum (also the rare finite
    overflow of one) pays the exact element check, and only a failure looks for the cause."""
    if not tensor.is_floating_point() or bool(torch.isfinite(_float32_sum(tensor))):
        return
    if bool(torch.isfinite(tensor).all()):
        return
    file = reader.where(keys[0])
    for key in keys:
        stored = reader.get(key)
        if stored.is_floating_point() and not bool(torch.isfinite(stored).all()):
            nan, inf = int(torch.isnan(stored).sum()), int(torch.isinf(stored).sum())
            raise NonFiniteError(f"tensor {key!r} in {file} holds {nan} NaN and {inf} infinite of {stored.numel()} "
                                 "values: the file is damaged; download or convert it again")
    largest = max(float(reader.get(key).float().abs().max()) for key in keys)
    raise NonFiniteError(f"tensor {' + '.join(keys)!r} in {file} has values up to {largest:.4g}, beyond what "
                         f"{tensor.dtype} holds ({name} overflows to infinity); load the model with dtype='bf16' "
                         "or 'fp32' (CLI: --dtype bf16 / --dtype fp32)")
