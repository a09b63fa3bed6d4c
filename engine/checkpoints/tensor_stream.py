"""Converting one model component tensor by tensor: source keys -> module tensors -> target keys.

A component is a module config plus the loader's key map from a checkpoint onto it (the
`Component`); a layout to write is the same family's key map for another layout (the
`Target`). Module tensors that share a stored key (q, k, v fused in one OpenCLIP in_proj,
or pieces of one target key) are converted together as a group; everything else one at a
time. So memory holds one group's tensors, never the model.

The same walk runs on the meta device first (`plan`), which gives every output tensor's
key, shape and dtype before any data is read: the safetensors header is written from it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from dite.engine.dtypes import safetensors_dtypes
from dite.engine.errors import CheckpointError
from dite.engine.checkpoints.safetensors_writer import PlannedTensor
from dite.engine.loading.weights import WeightReader, key_differences
from dite.models.checkpoint import KeyMap, export_state_dict

FP16_MAX = torch.finfo(torch.float16).max


class PrecisionWarning(UserWarning):
    """A converted tensor does not fit the requested dtype (named in the message)."""


def module_factory(kind: str) -> Callable[[Any], torch.nn.Module]:
    from dite.models import dit, mmdit, pixart
    from dite.models.clip import CLIPTextModel
    from dite.models.t5 import T5Encoder
    from dite.models.vae import AutoencoderKL

    return {"dit": dit.DiT, "mmdit": mmdit.MMDiT, "pixart": pixart.PixArt, "vae": AutoencoderKL, "clip": CLIPTextModel,
            "t5": T5Encoder}[kind]


def meta_state(kind: str, config) -> dict[str, torch.Tensor]:
    """The module's tensors (names, shapes) on the meta device: no memory."""
    with torch.device("meta"):
        return dict(module_factory(kind)(config).state_dict())


@dataclass
class Component:
    """One model part as found in a checkpoint: `keymap` builds each module tensor of
    `kind(config)` from `reader`'s keys; `synthesized` are module tensors the checkpoint
    does not hold and conversion makes (CLIP-L's identity projection); `notes` say what
    was dropped or made and why."""

    name: str
    kind: str
    config: Any
    reader: WeightReader
    keymap: KeyMap
    ignore: set[str] = field(default_factory=set)
    synthesized: dict[str, torch.Tensor] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # Stored tensors that are not module tensors but must survive conversion, by name
    # (PixArt's learned null caption): (reader holding it, its key there).
    side: dict[str, tuple[WeightReader, str]] = field(default_factory=dict)

    def expected(self) -> dict[str, torch.Tensor]:
        return meta_state(self.kind, self.config)


@dataclass
class Target:
    """A layout to write: the family's key map for it, module tensors it leaves out
    (`drop`), and tensors it stores that the module computes (`extras`, e.g. DiT's pos_embed)."""

    keymap: KeyMap
    drop: set[str] = field(default_factory=set)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class KeyReport:
    """How a checkpoint's keys fit a component's key map."""

    missing: list[str]
    unexpected: list[str]
    misshaped: list[dict]  # {"key", "shape", "expected"}

    @property
    def clean(self) -> bool:
        return not (self.missing or self.unexpected or self.misshaped)

    def as_dict(self) -> dict:
        return {"missing": self.missing, "unexpected": self.unexpected, "misshaped": self.misshaped}


def expected_key_shapes(keymap: KeyMap, state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Every checkpoint key `keymap` reads, with the shape the module needs it to have."""
    sub = {name: source for name, source in keymap.items() if name in state}
    return {k: tuple(t.shape) for k, t in export_state_dict(sub, {n: state[n] for n in sub}).items()}


def key_report(component: Component, keys: list[str] | None = None) -> KeyReport:
    """Missing, unexpected and mis-shaped keys of `component` in its reader (names only:
    no tensor data is read). `keys` restricts "unexpected" to a part of a shared file."""
    state = {n: t for n, t in component.expected().items() if n not in component.synthesized}
    expected = expected_key_shapes(component.keymap, state)
    available = set(component.reader.keys())
    missing, unexpected = key_differences(expected, available, component.ignore, scope=keys)
    misshaped = [{"key": k, "shape": list(component.reader.shape(k)), "expected": list(shape)}
                 for k, shape in expected.items() if k in available and tuple(component.reader.shape(k)) != shape]
    return KeyReport(missing, unexpected, misshaped)


def require_clean(component: Component) -> None:
    report = key_report(component)
    if report.clean:
        return
    where = component.reader.where(next(iter(component.reader.keys()), ""))
    parts = []
    if report.missing:
        parts.append(f"{len(report.missing)} missing (e.g. {', '.join(report.missing[:3])})")
    if report.unexpected:
        parts.append(f"{len(report.unexpected)} unexpected (e.g. {', '.join(report.unexpected[:3])})")
    if report.misshaped:
        bad = report.misshaped[0]
        parts.append(f"{len(report.misshaped)} mis-shaped (e.g. {bad['key']} is {tuple(bad['shape'])}, "
                     f"expected {tuple(bad['expected'])})")
    raise CheckpointError(f"the {component.name} in {where} does not fit a {component.kind} of the detected config: "
                          f"{'; '.join(parts)}. `dite inspect` lists every problem key")


def groups(source: KeyMap, target: KeyMap, names: list[str]) -> list[list[str]]:
    """`names` in groups that must be converted together: names linked by a shared source
    key or a shared target key (pieces of one stored tensor). Ordered by first member."""
    parent = {n: n for n in names}

    def root(n: str) -> str:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for keymap in (source, target):
        owner: dict[str, str] = {}
        for name in names:
            if name not in keymap:
                continue
            for key in keymap[name].keys:
                if key in owner:
                    parent[root(name)] = root(owner[key])
                else:
                    owner[key] = name
    grouped: dict[str, list[str]] = {}
    for name in names:
        grouped.setdefault(root(name), []).append(name)
    return list(grouped.values())


def _source_dtype(reader: WeightReader, key: str) -> torch.dtype:
    name = reader.dtype(key)
    if name not in safetensors_dtypes():
        raise CheckpointError(f"{key} in {reader.where(key)} has dtype {name}, which dite cannot convert")
    return safetensors_dtypes()[name]


def output_dtype(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is None or not tensor.is_floating_point():
        return tensor.dtype
    return dtype


def _cast(key: str, tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    target = output_dtype(tensor, dtype)
    if target == tensor.dtype:
        return tensor
    if target == torch.float16 and tensor.device.type != "meta" and tensor.abs().max() > FP16_MAX:
        warnings.warn(f"{key} has values beyond fp16's range (max |x| = {tensor.abs().max().item():.4g}); they are "
                      f"clamped to ±{FP16_MAX:.0f}. Convert with --dtype bf16 or fp32 to keep them",
                      PrecisionWarning, stacklevel=4)
        tensor = tensor.clamp(-FP16_MAX, FP16_MAX)
    return tensor.to(target)


def iter_tensors(component: Component, target: Target, *, dtype: torch.dtype | None = None,
                 meta: bool = False, keep: Callable[[str], bool] = lambda key: False,
                 mmap: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """(target key, tensor) pairs of `component` written in `target`'s layout, in a fixed
    order. meta=True yields meta tensors of the right shapes and dtypes without reading.
    `keep(key)` tensors keep their dtype (fp32-only tensors under a half-precision dtype).
    `mmap`: how the reader reads each tensor (WeightReader.get)."""
    expected = component.expected()
    names = [n for n in expected if n not in target.drop]
    unmapped = [n for n in names if n not in target.keymap]
    if unmapped:
        raise CheckpointError(f"internal: the {component.kind} target layout misses {unmapped[:3]}")
    reader = component.reader
    for group in groups(component.keymap, target.keymap, names):
        cache: dict[str, torch.Tensor] = {}
        state = {}
        for name in group:
            if name in component.synthesized:
                tensor = component.synthesized[name]
                state[name] = tensor.to("meta") if meta else tensor
                continue
            source = component.keymap[name]
            if meta:
                state[name] = torch.empty(expected[name].shape, dtype=_source_dtype(reader, source.keys[0]),
                                          device="meta")
                continue
            for key in source.keys:
                if key not in cache:
                    cache[key] = reader.get(key, mmap=mmap)
            tensor = source.build([cache[k] for k in source.keys])
            if tuple(tensor.shape) != tuple(expected[name].shape):
                raise CheckpointError(f"{' + '.join(source.keys)} in {reader.where(source.keys[0])} gives shape "
                                      f"{tuple(tensor.shape)}, but {name} needs {tuple(expected[name].shape)}")
            state[name] = tensor
        for key, tensor in export_state_dict({n: target.keymap[n] for n in group}, state).items():
            yield key, tensor if keep(key) else _cast(key, tensor, dtype)
        del cache, state
    for key, tensor in target.extras.items():
        tensor = tensor.to("meta") if meta else tensor
        yield key, tensor if keep(key) else _cast(key, tensor, dtype)


def plan(component: Component, target: Target, **options) -> list[PlannedTensor]:
    return [PlannedTensor(key, tuple(t.shape), t.dtype) for key, t in iter_tensors(component, target, meta=True, **options)]
