"""`convert(src, dst, to=...)`: a checkpoint in another layout, tensor by tensor.

Every direction is the loader's key maps: the source's map builds each module tensor, the
target layout's map (engine/checkpoints/layouts.py) unbuilds it into the keys to write.
Output is safetensors with metadata (engine/checkpoints/recorded.py: family, configs, the
source pipeline's scheduler, source name, dite version), written streaming
(tensor_stream.py, safetensors_writer.py) into a hidden temporary sibling of `dst` that
replaces `dst` only when everything is written, so a failed or interrupted conversion
leaves nothing half-done (engine/checkpoints/destination.py). A `dst` that is, holds or
lies inside a source is refused, with `force=True` too; another existing `dst` is replaced
only with `force=True`.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dite.engine.checkpoints.destination import Staging, check_outputs, real, terminate_as_interrupt
from dite.engine.checkpoints.parts import PIXART_SIDE_FILE, Parts, find_parts
from dite.engine.checkpoints.recorded import file_metadata
from dite.engine.checkpoints.layouts import (
    SD3_PREFIX, WEIGHTS_STEM, diffusers_config, diffusers_target, fp32_only, is_identity, original_target,
)
from dite.engine.checkpoints.pipeline_files import TOKENIZERS, model_index, scheduler_config, tokenizer_folders
from dite.engine.dtypes import precisions, safetensors_dtypes
from dite.engine.errors import CheckpointError, InputError
from dite.engine.checkpoints.recognise import local_path
from dite.engine.loading.hub import demo_folder
from dite.engine.checkpoints.safetensors_writer import PlannedTensor, SafetensorsWriter, ShardedWriter, parse_size
from dite.engine.checkpoints.tensor_stream import Component, PrecisionWarning, Target, iter_tensors, plan, require_clean

LAYOUTS = ("diffusers", "original")
T5_FILE_BY_DTYPE = {torch.float16: "t5xxl_fp16.safetensors", torch.bfloat16: "t5xxl_bf16.safetensors",
                    torch.float32: "t5xxl_fp32.safetensors"}
# Every tensor is read once: with plain positioned reads, not through a memory map whose
# touched pages would count the whole file against the process (WeightReader.get).
MMAP = False
SD3_ENCODER_FILES = {"text_encoder": "clip_l.safetensors", "text_encoder_2": "clip_g.safetensors"}


@dataclass
class ConversionResult:
    destination: Path
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in precisions():
        raise InputError(f"unknown dtype {dtype!r}; use one of {', '.join(precisions())}")
    return precisions()[dtype]


def _folder_metadata(parts: Parts, component: Component) -> dict[str, str]:
    """A diffusers component's weights: its own config (config.json says the rest)."""
    return file_metadata(family=parts.family, release=parts.release, components=[component], written=[component],
                         source=parts.label, scheduler=None, model_index=None)


def _file_metadata(parts: Parts, components: list[Component], written: list[Component]) -> dict[str, str]:
    """An original-layout file: the configs of everything written, and the source pipeline's
    scheduler and model_index, so that converting it back gives the same folder."""
    pipeline = parts.family in ("dit", "sd3", "pixart") and any(c.name == "transformer" for c in written)
    return file_metadata(family=parts.family, release=parts.release, components=components, written=written,
                         source=parts.label, scheduler=scheduler_config(parts) if pipeline else None,
                         model_index=parts.model_index if pipeline else None)


def _stream(writer, component: Component, target: Target, dtype, keep) -> None:
    for key, tensor in iter_tensors(component, target, dtype=dtype, keep=keep, mmap=MMAP):
        writer.write(key, tensor)


def _warn_fp32_only(component: Component, planned, keep) -> None:
    kept = [p.key for p in planned if keep(p.key)]
    if kept:
        warnings.warn(f"{len(kept)} tensor(s) of {component.name} stay fp32 in this fp16 conversion ({kept[0]}, ...): "
                      "T5-XXL's feed-forward overflows fp16 there, so transformers and dite keep them in fp32",
                      PrecisionWarning, stacklevel=3)


def _write_component_folder(folder: Path, parts: Parts, component: Component, dtype, max_shard_size) -> list[Path]:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(diffusers_config(component), indent=2) + "\n")
    target = diffusers_target(component)
    keep = fp32_only(component, dtype)
    planned = plan(component, target, dtype=dtype, keep=keep)
    _warn_fp32_only(component, planned, keep)
    writer = ShardedWriter(folder, WEIGHTS_STEM[component.kind], planned, max_shard_size,
                           _folder_metadata(parts, component))
    _stream(writer, component, target, dtype, keep)
    writer.close()
    return writer.files + [folder / "config.json"] + _write_side_tensors(folder, component, dtype)


def _write_side_tensors(folder: Path, component: Component, dtype) -> list[Path]:
    """PixArt's null caption, which diffusers' layout has no place for, in a file of its own
    beside the weights (diffusers ignores it; converting back restores it)."""
    if not component.side:
        return []
    tensors = {key: reader.get(stored, mmap=MMAP) for key, (reader, stored) in component.side.items()}
    tensors = {k: t.to(dtype) if dtype is not None and t.is_floating_point() else t for k, t in tensors.items()}
    path = folder / PIXART_SIDE_FILE
    writer = SafetensorsWriter(path, [PlannedTensor(k, tuple(t.shape), t.dtype) for k, t in tensors.items()],
                               {"format": "pt", "what": "PixArt's learned null caption, for converting back"})
    for key, tensor in tensors.items():
        writer.write(key, tensor.contiguous())
    writer.close()
    return [path]


def _to_diffusers(parts: Parts, out: Path, selected: list[str], dtype, max_shard_size, result: ConversionResult):
    single = parts.family in ("vae", "clip", "t5") or (parts.layout == "diffusers" and parts.model_index is None)
    if single:  # one component: `out` is its folder
        (component,) = (parts.components[name] for name in selected)
        result.files += _write_component_folder(out, parts, component, dtype, max_shard_size)
        return
    out.mkdir(parents=True)
    for name in selected:
        result.files += _write_component_folder(out / name, parts, parts.components[name], dtype, max_shard_size)
    scheduler = scheduler_config(parts)
    (out / "scheduler").mkdir()
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2) + "\n")
    copied = tokenizer_folders(parts, out)
    (out / "model_index.json").write_text(json.dumps(model_index(parts, selected, copied, out), indent=2) + "\n")


def _original_targets(parts: Parts, selected: list[str], bundled: bool) -> list[tuple[Component, Target]]:
    """(component, target) per component of an original-layout output, with SD3's prefixes."""
    pairs = []
    for name in selected:
        component = parts.components[name]
        prefix = SD3_PREFIX[name] if parts.family == "sd3" and (bundled or name in ("transformer", "vae")) else ""
        target = original_target(component, prefix, mmap=MMAP)
        if parts.family == "sd3" and name == "text_encoder" and "text_projection.weight" in component.keymap:
            _drop_identity_projection(component, target, parts)
        pairs.append((component, target))
    return pairs


def _drop_identity_projection(component: Component, target: Target, parts: Parts) -> None:
    """SD3's CLIP-L projection, unused by the original layout's loaders: an identity (what
    single files come from) is left out, as releases carry none; another is kept, with a note."""
    source = component.keymap["text_projection.weight"]
    projection = source.build([component.reader.get(k, mmap=MMAP) for k in source.keys])
    if is_identity(projection):
        target.drop.add("text_projection.weight")
    else:
        parts.notes.append("CLIP-L's text_projection is not the identity: it is written, but SD3 single-file loaders "
                           "(Stability's, ComfyUI, diffusers, dite) ignore it, so their images differ from this "
                           "folder's in diffusers")


def _write_file(path: Path, parts: Parts, pairs: list[tuple[Component, Target]], dtype,
                written: list[Component]) -> Path:
    planned = []
    keeps = []
    for component, target in pairs:
        keep = fp32_only(component, dtype)
        keeps.append(keep)
        planned_part = plan(component, target, dtype=dtype, keep=keep)
        _warn_fp32_only(component, planned_part, keep)
        planned += planned_part
    metadata = _file_metadata(parts, [c for c, _ in pairs], written)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix in (".pt", ".pth"):
        # torch.save needs the whole state dict at once: not streamed (use .safetensors for that).
        state = {}
        for (component, target), keep in zip(pairs, keeps):
            state.update(iter_tensors(component, target, dtype=dtype, keep=keep, mmap=MMAP))
        # PixArt's releases wrap the weights as {"state_dict": ...}; DiT's as its train.py does,
        # {"ema": ...}, which the original sample.py unwraps: the metadata rides beside them.
        wrapper = "state_dict" if parts.family == "pixart" else "ema"
        torch.save({wrapper: state, "dite": metadata}, path)
        return path
    writer = SafetensorsWriter(path, planned, metadata)
    for (component, target), keep in zip(pairs, keeps):
        _stream(writer, component, target, dtype, keep)
    writer.close()
    return path


def _original_selection(parts: Parts, selected: list[str]) -> list[str]:
    """The components an original-layout output holds: DiT's and PixArt's releases are the
    transformer alone (VAE and T5 are files of their own)."""
    if parts.family in ("dit", "pixart"):
        return [name for name in selected if name == "transformer"]
    return selected


def _check_original_name(parts: Parts, out: Path, selected: list[str]) -> None:
    if out.suffix not in (".safetensors", ".pt", ".pth"):
        raise InputError(f"{out}: an original-layout checkpoint is one file; name it *.safetensors "
                         "(or *.pt for DiT's torch format)")
    if out.suffix != ".safetensors" and parts.family not in ("dit", "pixart"):
        raise InputError(f"{out}: {parts.family} original files are safetensors; name it *.safetensors")
    if not _original_selection(parts, selected):
        raise InputError(f"{parts.family}'s original checkpoint holds the transformer only, and --components "
                         f"{','.join(selected)} leaves it out: nothing to write; convert those folders on their own")


def _to_original(parts: Parts, out: Path, selected: list[str], dtype, text_encoders: str, result: ConversionResult):
    bundled = text_encoders == "bundled"
    others = [name for name in selected if name not in _original_selection(parts, selected)]
    if others:
        selected = _original_selection(parts, selected)
        parts.notes.append(f"the {' and '.join(others)} {'is' if len(others) == 1 else 'are'} not part of "
                           f"{parts.family}'s original checkpoint and {'was' if len(others) == 1 else 'were'} not "
                           "written; convert those folders on their own if you need them")
    if parts.family == "pixart" and "transformer" in selected and not parts.components["transformer"].side:
        parts.notes.append("no null caption to restore (y_embedder.y_embedding): this folder was not converted from "
                           "an original file by dite, and diffusers drops it; the file is written without it, so "
                           "PixArt's original code cannot run guidance from it (dite and diffusers use T5(\"\") "
                           "then)")
    pairs = _original_targets(parts, selected, bundled)
    written = [c for c, _ in pairs]
    if parts.family == "sd3" and not bundled:
        main = [(c, t) for c, t in pairs if c.name in ("transformer", "vae")]
        for component, target in pairs:
            if component.name.startswith("text_encoder"):
                path = out.parent / "text_encoders" / _encoder_file(component, dtype)
                result.files.append(_write_file(path, parts, [(component, target)], dtype, [component]))
        pairs = main
    if pairs:
        result.files.append(_write_file(out, parts, pairs, dtype, written))


def _majority_dtype(component: Component) -> torch.dtype:
    key = component.keymap["embed_tokens.weight"].keys[0] if component.kind == "t5" else next(
        iter(component.keymap.values())).keys[0]
    return safetensors_dtypes().get(component.reader.dtype(key), torch.float16)


def _outputs(parts: Parts, dst: Path, to: str, selected: list[str], dtype, text_encoders: str) -> list[Path]:
    """Every path the conversion creates (to check for overwriting before writing anything)."""
    paths = [dst]
    if to == "original" and parts.family == "sd3" and text_encoders == "separate":
        paths += [dst.parent / "text_encoders" / _encoder_file(parts.components[name], dtype)
                  for name in selected if name.startswith("text_encoder")]
    return paths


def _encoder_file(component: Component, dtype) -> str:
    """The file name Stability gives a text encoder (engine/loading/sd3_single_file.py finds them by it)."""
    if component.name in SD3_ENCODER_FILES:
        return SD3_ENCODER_FILES[component.name]
    return T5_FILE_BY_DTYPE.get(dtype or _majority_dtype(component), "t5xxl_fp16.safetensors")


def _select(parts: Parts, components) -> list[str]:
    available = list(parts.components)
    if components is None:
        return available
    if isinstance(components, str):
        wanted = [c.strip() for c in components.split(",") if c.strip()]
    elif isinstance(components, (list, tuple, set)) and all(isinstance(c, str) for c in components):
        wanted = [c.strip() for c in components if c.strip()]
    else:
        raise InputError(f"components must be comma-separated names like 'transformer,vae', not {components!r}")
    if not wanted:
        raise InputError(f"--components {components!r} names no component; {parts.path.name} has "
                         f"{', '.join(available)}")
    unknown = [c for c in wanted if c not in available]
    if unknown:
        raise InputError(f"{parts.path} has no component {', '.join(unknown)}; it has {', '.join(available)}")
    return [c for c in available if c in wanted]


def _source_label(source, demo: Path | None) -> str:
    """What the metadata records as the source: a demo or hub name as given, else the file
    or folder name (never the user's absolute path)."""
    if demo is not None:
        return str(source)
    path = Path(os.path.expanduser(str(source)))
    return real(path).name if path.exists() else str(source)


def _nonempty(value, what: str) -> None:
    if value is None or not str(value).strip():
        raise InputError(f"the {what} is empty; give a file or folder path")


def convert(source: str | os.PathLike, destination: str | os.PathLike, *, to: str, dtype=None,
            max_shard_size: str | int | None = None, components=None, force: bool = False,
            tokenizers: str | os.PathLike | None = None, model_config: dict | None = None,
            text_encoders: str = "bundled", variant: str | None = None,
            vae: str | os.PathLike | None = None) -> ConversionResult:
    """Convert the checkpoint at `source` (file or folder, hub repo id, or a demo model name:
    demo-sd3, demo-dit) to `to` ("diffusers": a folder; "original": a release-style single
    file) at `destination`.

    dtype: "fp32", "fp16", "bf16" (default: each tensor keeps its own). max_shard_size:
    "5GB"-style limit per weights file of a diffusers folder. components: the diffusers
    names to convert (e.g. "transformer,vae"). tokenizers: folder holding tokenizer/,
    tokenizer_2/, tokenizer_3/ for an SD3 single file's diffusers folder (default: beside
    the file). model_config: what shapes cannot tell, as for `load()`. text_encoders: SD3 to
    original, "bundled" into the file (as `*_incl_clips_t5xxlfp16`) or "separate" files in
    text_encoders/ beside it. vae: a VAE (file or folder, any layout) to add, for sources
    without one (an original DiT .pt) or to replace theirs.

    The destination must not be a source, hold one or lie inside a source folder; an
    existing one is replaced only with `force`, and only once the new output is complete.
    """
    if to not in LAYOUTS:
        raise InputError(f"unknown target layout {to!r}; use one of {', '.join(LAYOUTS)}")
    if text_encoders not in ("bundled", "separate"):
        raise InputError(f"text_encoders must be 'bundled' or 'separate', not {text_encoders!r}")
    if model_config is not None and not isinstance(model_config, dict):
        raise InputError(f"model_config must be a dict, not {type(model_config).__name__}")
    _nonempty(source, "source")
    _nonempty(destination, "destination")
    dtype, limit = _dtype(dtype), parse_size(max_shard_size)
    if limit is not None and limit <= 0:
        raise InputError(f"the shard size must be positive, not {max_shard_size!r}; write it like 5GB or 500MB")
    dst = Path(os.path.expanduser(str(destination)))
    if to == "diffusers" and dst.suffix in (".safetensors", ".pt", ".pth", ".ckpt", ".bin"):
        raise InputError(f"--to diffusers writes a folder, but {dst} is named like a file; give a folder path "
                         "(or --to original for a single file)")
    # The sources named so far must survive whatever happens: refuse before any download or read.
    named = [Path(os.path.expanduser(str(p))) for p in (source, vae) if p is not None]
    check_outputs([dst], named, force=force, folder=to == "diffusers")
    # A demo name or a hub repo id ("owner/name", "owner/name/file.safetensors") is resolved as load() does.
    demo = demo_folder(source)
    src = local_path(source, variant=variant)
    with terminate_as_interrupt():  # SIGTERM cleans up as Ctrl-C does
        return _convert(src, dst, to=to, dtype=dtype, limit=limit, components=components, force=force,
                        tokenizers=tokenizers, model_config=model_config, text_encoders=text_encoders,
                        variant=variant, vae=vae, label=_source_label(source, demo))


def _add_vae(parts: Parts, vae, variant) -> None:
    if parts.family not in ("dit", "sd3", "pixart"):
        raise InputError(f"--vae adds a VAE to a pipeline (DiT, SD3, PixArt); {parts.path.name} is a "
                         f"{parts.family} checkpoint: drop --vae")
    given = find_parts(vae, variant=variant, mmap=MMAP)
    component = given.components.get("vae") or next(iter(given.components.values()))
    if component.kind != "vae":
        raise InputError(f"--vae {vae} holds no VAE (it is a {given.family} {component.kind} checkpoint); give a "
                         "VAE file or folder")
    component.name = "vae"
    parts.components["vae"] = component


def _read_places(parts: Parts) -> list[Path]:
    """Every file and folder the conversion reads: none may be written over."""
    places = {parts.path}
    for component in parts.components.values():
        for reader in [component.reader, *(r for r, _ in component.side.values())]:
            places |= {Path(reader.where(k)) for k in reader.keys()}
    for place in parts.tokenizer_places:
        places |= {Path(place) / name for name in TOKENIZERS.get(parts.family, ()) if (Path(place) / name).is_dir()}
    return sorted(p for p in places if str(p) != "?")


def _convert(src: Path, dst: Path, *, to, dtype, limit, components, force, tokenizers, model_config, text_encoders,
             variant, vae, label) -> ConversionResult:
    if tokenizers is not None and not Path(os.path.expanduser(str(tokenizers))).is_dir():
        raise InputError(f"--tokenizers {tokenizers}: no such folder; give a folder holding tokenizer/ "
                         "(tokenizer_2/, tokenizer_3/ for SD3)")
    parts = find_parts(src, model_config=model_config, tokenizers=tokenizers, variant=variant, mmap=MMAP)
    parts.label = label
    if tokenizers is not None and parts.family not in TOKENIZERS:
        raise InputError(f"{parts.path.name} is a {parts.family} checkpoint, which has no tokenizers: drop "
                         "--tokenizers")
    if text_encoders == "separate" and (parts.family != "sd3" or to != "original"):
        raise InputError("--text-encoders separate is for SD3 converted --to original; drop it")
    if vae is not None:
        _add_vae(parts, vae, variant)
    selected = _select(parts, components)
    if to == "original":
        _check_original_name(parts, dst, selected)
    outputs = _outputs(parts, dst, to, selected, dtype, text_encoders)
    sources = _read_places(parts) + ([Path(os.path.expanduser(str(vae)))] if vae is not None else [])
    check_outputs(outputs, sources, force=force, folder=to == "diffusers")
    for name in selected:
        require_clean(parts.components[name])
    result = ConversionResult(dst)
    for name in selected:
        result.notes += parts.components[name].notes
    staging = Staging(dst)
    try:
        try:
            if to == "diffusers":
                _to_diffusers(parts, staging.path, selected, dtype, limit, result)
            else:
                _to_original(parts, staging.path, selected, dtype, text_encoders, result)
        except OSError as exc:
            raise CheckpointError(f"writing {dst} failed ({exc.strerror or exc}); nothing was changed") from None
        result.files = [staging.final(f) for f in result.files]
        staging.commit()
    except BaseException:
        staging.abort()
        raise
    result.notes += parts.notes
    for note in result.notes:
        warnings.warn(note, ConversionNote, stacklevel=3)
    return result


class ConversionNote(UserWarning):
    """Something conversion left out or made up, and why."""
