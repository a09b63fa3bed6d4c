"""Merging LoRAs into a pipeline's denoiser (and SD3's text encoders), and taking them out again exactly.

W = W0 + sum over loaded LoRAs of scale * (alpha / rank) * up @ down, computed in float32 from
the ORIGINAL weight W0 and cast to the weight's dtype once. The original tensors of every
touched parameter are kept (a copy on the weight's device) until no loaded LoRA touches them:
unloading recomputes W from W0 and the LoRAs still loaded, and unloading the last one copies W0
back, so the weights are bit for bit what they were. Keeping a delta in the weight's dtype
instead would not be exact: in fp16/bf16, (W0 + d) - d is not W0 in general.

Threads: the LoRA state lives on the pipeline. `calls_running` counts the calls under a lock;
load/unload take the same lock and refuse while a call runs, and a call that starts during a
merge waits for it, so no call ever sees half-merged weights.
"""

from __future__ import annotations

import hashlib
import math
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from dite.engine.lora.formats import LoraError, LoraFile, read_lora
from dite.engine.lora.formats import TRANSFORMER
from dite.engine.lora.targets import Target, live_module, resolve

Param = tuple[str, str]  # (component, parameter name within the component's module)


@dataclass
class LoadedLora:
    file: LoraFile
    scale: float
    targets: dict[tuple[str, str], Target]  # (component, module) -> where it merges


@dataclass
class LoraState:
    lock: threading.Lock = field(default_factory=threading.Lock)
    running: int = 0
    loaded: dict[str, LoadedLora] = field(default_factory=dict)  # name -> LoRA, in load order
    originals: dict[Param, torch.Tensor] = field(default_factory=dict)  # (component, param name) -> W0


def state_of(pipe) -> LoraState:
    if "_lora_state" not in pipe.__dict__:
        pipe._lora_state = LoraState()
    return pipe._lora_state


@contextmanager
def calls_running(pipe):
    """Wrap one generation call: counted so that load/unload can refuse while it runs."""
    state = state_of(pipe)
    with state.lock:
        state.running += 1
    try:
        yield
    finally:
        with state.lock:
            state.running -= 1


def _check_scale(scale) -> float:
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise LoraError(f"LoRA scale {scale!r} is not a number") from None
    if not math.isfinite(value):
        raise LoraError(f"LoRA scale {scale!r} is not finite; give a finite number such as 1.0")
    return value


def _refuse_while_running(state: LoraState, what: str) -> None:
    if state.running:
        raise LoraError(f"cannot {what} while {state.running} generation call(s) run on this pipeline; "
                        "wait for them to finish (the weights are shared by every call)")


def _param(target: Target) -> Param:
    return target.component, target.param


def _remerge(pipe, state: LoraState, params: set[Param]) -> None:
    """Set each of `params` to W0 + the deltas of the LoRAs loaded now (fp32, cast once)."""
    modules = {component: live_module(pipe, component) for component, _ in params}
    weights = {(component, name): p for component, module in modules.items() if module is not None
               for name, p in module.named_parameters()}
    with torch.no_grad():
        for name in sorted(params):
            if name not in weights:  # a text encoder dropped since (release_encoders): nothing to restore
                state.originals.pop(name, None)
                continue
            weight = weights[name]
            if name not in state.originals:
                state.originals[name] = weight.detach().clone()
            original = state.originals[name]
            touching = [(lora, module) for lora in state.loaded.values()
                        for module, target in lora.targets.items() if _param(target) == name]
            if not touching:
                weight.copy_(original)
                del state.originals[name]
                continue
            source = touching[0][0].targets[touching[0][1]].source
            parts = [p.clone() for p in source.unbuild(original.float())]
            for lora, module in touching:
                pair, target = lora.file.pairs[module], lora.targets[module]
                rank = pair.down.shape[0]
                factor = lora.scale * ((pair.alpha if pair.alpha is not None else rank) / rank)
                delta = pair.up.to(weight.device, torch.float32) @ pair.down.to(weight.device, torch.float32)
                parts[target.index] += factor * delta
            weight.copy_(source.build(parts).to(weight.dtype))
    pipe.__dict__.pop("_model_id", None)  # the fingerprint (calibrated plans) follows the weights


def load_lora(pipe, path, scale: float = 1.0, name: str | None = None) -> str:
    """Merge the LoRA at `path` with `scale`; returns its name (default: the file's stem)."""
    scale = _check_scale(scale)
    lora = read_lora(path)
    name = name or lora.path.stem
    targets = resolve(pipe, lora)
    state = state_of(pipe)
    with state.lock:
        _refuse_while_running(state, f"load LoRA {name!r}")
        if name in state.loaded:
            raise LoraError(f"a LoRA named {name!r} is loaded already; unload it first or give another name")
        state.loaded[name] = LoadedLora(lora, scale, targets)
        _remerge(pipe, state, {_param(t) for t in targets.values()})
    return name


def unload_lora(pipe, name: str | None = None) -> None:
    """Take out the LoRA `name` (None: every LoRA); the untouched weights are W0 again, bit for bit."""
    state = state_of(pipe)
    with state.lock:
        _refuse_while_running(state, "unload LoRAs")
        if name is not None and name not in state.loaded:
            raise LoraError(f"no LoRA named {name!r} is loaded (loaded: {sorted(state.loaded) or 'none'})")
        names = [name] if name is not None else list(state.loaded)
        params = {_param(t) for n in names for t in state.loaded[n].targets.values()}
        for n in names:
            del state.loaded[n]
        _remerge(pipe, state, params)


def fingerprint(pipe, transformer_fingerprint: str) -> str:
    """`pipe.model_id`: the denoiser's fingerprint, mixed with the text-encoder LoRAs loaded
    (they change the conditioning the denoiser sees, so calibrated plans must not carry over)."""
    state = pipe.__dict__.get("_lora_state")
    text = sorted(f"{lora.file.sha256}:{lora.scale!r}" for lora in (state.loaded.values() if state else ())
                  if any(component != TRANSFORMER for component, _ in lora.targets))
    if not text:
        return transformer_fingerprint
    return hashlib.sha256("|".join([transformer_fingerprint, *text]).encode()).hexdigest()[:16]


def lora_record(pipe) -> dict:
    """For image metadata: each loaded LoRA's file name, short hash and scale (no folders)."""
    state = pipe.__dict__.get("_lora_state")
    if state is None or not state.loaded:
        return {}
    return {"loras": [{"file": lora.file.path.name, "sha256": lora.file.sha256[:10], "scale": lora.scale}
                      for lora in state.loaded.values()]}


def check_lora_list(loras) -> list[tuple]:
    """`load(loras=...)`: [(path, scale)] or [path]; each file is read (its structure checked)
    and each scale checked before the model is loaded."""
    if isinstance(loras, (str, bytes)) or not hasattr(loras, "__iter__"):
        raise LoraError(f"loras takes a list of (path, scale) pairs, not {type(loras).__name__}")
    checked = []
    for item in loras:
        path, scale = (item, 1.0) if not isinstance(item, (tuple, list)) else (tuple(item) + (1.0,))[:2]
        _check_scale(scale)
        read_lora(path)
        checked.append((path, float(scale)))
    return checked
