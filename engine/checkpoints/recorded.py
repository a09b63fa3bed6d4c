"""What `convert` records in the files it writes, read back by `load`, `convert` and `inspect`.

A safetensors file keeps it in its header's `__metadata__` (strings); a `.pt` / `.pth` in a
`"dite"` entry of strings beside the weights: `{"ema": weights, "dite": ...}` for DiT (the
wrapping of DiT's own train.py checkpoints, which its sample.py unwraps) and
`{"state_dict": weights, "dite": ...}` for PixArt. Keys:

- `family`, `component`, `kind`, `variant` (SD3's release or PixArt's version), `dite_version`,
  `format: pt`;
- `config`: the dite config (JSON) of the component, or {name: config} for several;
- `configs`: {name: {"kind", "config"}} of every component written by the conversion,
  including text encoders written to files of their own beside it;
- `scheduler_config`, `model_index`: the source pipeline's, so that converting back gives
  the same folder (e.g. demo-dit's cosine DDIM, not the original DiT's linear DDPM);
- `source`: the source's file or folder name, or its hub id (never a local absolute path).

What shapes cannot tell (heads, PixArt's version, the encoders' and VAE's configs) comes
from the recorded configs; a `model_config` that says otherwise is refused, naming the
field and both values. Recorded metadata that is malformed or does not fit the tensors is
refused too: the file was changed after dite wrote it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from dite.engine.errors import CheckpointError, ConfigError, DiteError

# The dite config class of each component kind (imported on use: models are heavy).
CONFIG_CLASSES = {"dit": ("dite.models.dit", "DiTConfig"), "mmdit": ("dite.models.mmdit", "MMDiTConfig"),
                  "pixart": ("dite.models.pixart", "PixArtConfig"), "vae": ("dite.models.vae", "VAEConfig"),
                  "clip": ("dite.models.clip", "CLIPTextConfig"), "t5": ("dite.models.t5", "T5Config")}
FAMILIES = ("dit", "sd3", "pixart", "vae", "clip", "t5")
# Config fields renamed since dite first recorded them: files written before still read.
RENAMED_FIELDS = {"pixart": {"variant": "pixart_version"}}
# Config fields a loader always reads from the file itself, whatever a hint says.
FROM_THE_FILE = {"clip": {"projection_dim"}}


def config_class(kind: str):
    import importlib

    module, name = CONFIG_CLASSES[kind]
    return getattr(importlib.import_module(module), name)


# ----------------------------------------------------------------------------- JSON


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def strict_json(text: str) -> Any:
    """json.loads that refuses NaN and Infinity (Python's json accepts them)."""
    return json.loads(text, parse_constant=_refuse_constant)


def _one_line(exc: Exception) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def parse_model_config(text: str | None, option: str = "--model-config") -> dict | None:
    """A command line's model_config: a JSON object, or the path of a file holding one."""
    if text is None:
        return None
    text = str(text)
    if not text.strip():
        raise ConfigError(f"{option} is empty: give a JSON object such as '{{\"num_heads\": 16}}' or a file holding one")
    if not text.lstrip().startswith("{"):
        path = Path(os.path.expanduser(text))
        if path.is_dir():
            raise ConfigError(f"{option} {text} is a folder; give a JSON object or the path of a JSON file")
        if not path.is_file():
            raise ConfigError(f"{option} {text}: no such file, and not a JSON object like '{{\"num_heads\": 16}}'")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{option} {path}: cannot read it ({_one_line(exc)})") from None
    try:
        value = strict_json(text)
    except ValueError as exc:
        raise ConfigError(f"{option} is not valid JSON ({_one_line(exc)})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{option} must be a JSON object like {{\"num_heads\": 16}}, not a {type(value).__name__}")
    return value


# ----------------------------------------------------------------------------- configs <-> dicts


def _allows_none(f) -> bool:
    return "None" in str(f.type)


def config_from_dict(kind: str, data: Any, what: str):
    """A dite config of `kind` from its to_dict() form, every field's type checked; raises
    ValueError naming the field (callers say whose config it is)."""
    cls = config_class(kind)
    if not isinstance(data, dict):
        raise ValueError(f"{what} is a {type(data).__name__}, not an object")
    data = {RENAMED_FIELDS.get(kind, {}).get(name, name): value for name, value in data.items()}
    default = cls()
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"{what} has fields a {kind} config does not: {', '.join(unknown)}")
    values = {}
    for name, value in data.items():
        expected = getattr(default, name)
        if value is None and (expected is None or _allows_none(known[name])):
            values[name] = None
        elif isinstance(expected, bool) or known[name].type in ("bool", bool):
            if not isinstance(value, bool):
                raise ValueError(f"{what}.{name} must be true or false, not {value!r}")
            values[name] = value
        elif isinstance(expected, tuple):
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                               for v in value):
                raise ValueError(f"{what}.{name} must be a list of integers, not {value!r}")
            values[name] = tuple(value)
        elif isinstance(expected, str):
            if not isinstance(value, str):
                raise ValueError(f"{what}.{name} must be a string, not {value!r}")
            values[name] = value
        elif isinstance(expected, float) and not isinstance(expected, bool):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{what}.{name} must be a finite number, not {value!r}")
            values[name] = float(value)
        else:  # int (or an int-or-None field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{what}.{name} must be a whole number >= 0, not {value!r}")
            values[name] = value
    try:
        return cls(**values)
    except (DiteError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise ValueError(f"{what} is inconsistent ({_one_line(exc)})") from None


def config_dict(config) -> dict:
    from dataclasses import asdict

    return config.to_dict() if hasattr(config, "to_dict") else asdict(config) if is_dataclass(config) else dict(config)


# ----------------------------------------------------------------------------- reading back


@dataclass
class Recorded:
    """The dite metadata of one file."""

    path: Path
    family: str
    configs: dict[str, Any] = field(default_factory=dict)  # component name -> dite config
    kinds: dict[str, str] = field(default_factory=dict)
    scheduler: dict | None = None
    model_index: dict | None = None
    source: str | None = None
    version: str | None = None

    def hints(self) -> dict:
        """The model_config this file was written with: what its shapes cannot tell."""
        hints: dict[str, Any] = {}
        for name, config in self.configs.items():
            if name == "transformer":
                hints["num_heads"] = config.num_heads
                if self.kinds[name] == "pixart":
                    hints["variant"], hints["sample_size"] = config.pixart_version, config.sample_size
            elif self.family == "sd3":
                hints[name] = config
            elif self.family == "vae" and name == "vae":
                hints["vae"] = config
            elif self.family in ("clip", "t5") and name == "text_encoder":
                hints["text_encoder"] = config
        return hints


def _raw_metadata(path: Path) -> dict | None:
    """The string metadata of a single weights file, or None (not one, or unreadable: the
    weights reader says why)."""
    name = path.name
    if name.endswith(".safetensors"):
        try:
            with open(path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                if size <= 0 or size > min(os.path.getsize(path), 100_000_000):
                    return None
                header = json.loads(f.read(size))
        except (OSError, ValueError):
            return None
        meta = header.get("__metadata__") if isinstance(header, dict) else None
        return meta if isinstance(meta, dict) else None
    if name.endswith((".pt", ".pth", ".ckpt", ".bin")):
        import torch

        try:  # dite writes zip files; a legacy file cannot be memory-mapped and has no dite entry
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:
            return None
        meta = state.get("dite") if isinstance(state, dict) else None
        return meta if isinstance(meta, dict) else None
    return None


class RecordedMetadataError(CheckpointError):
    """What dite recorded in a file is malformed or does not fit its tensors."""


def _malformed(path: Path, what: str) -> CheckpointError:
    return RecordedMetadataError(f"{path}: the metadata dite recorded in it is malformed ({what}); the file was changed "
                           "after dite wrote it: convert it again from its source")


_CACHE: dict[tuple, Recorded | None] = {}


def read_recorded(path: str | os.PathLike) -> Recorded | None:
    """The dite metadata of the file at `path`, checked; None for files dite did not write."""
    path = Path(path)
    if not path.is_file():
        return None
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    if key not in _CACHE:
        if len(_CACHE) > 64:
            _CACHE.clear()
        _CACHE[key] = _parse(path, _raw_metadata(path))
    return _CACHE[key]


def _json_field(path: Path, raw: dict, key: str, kind=dict):
    if key not in raw:
        return None
    text = raw[key]
    if not isinstance(text, str):
        raise _malformed(path, f"{key!r} is not a string")
    try:
        value = strict_json(text)
    except ValueError as exc:
        raise _malformed(path, f"{key!r} is not valid JSON: {_one_line(exc)}") from None
    if not isinstance(value, kind):
        raise _malformed(path, f"{key!r} is a JSON {type(value).__name__}, not an object")
    return value


def _parse(path: Path, raw: dict | None) -> Recorded | None:
    if not raw or "dite_version" not in raw:
        return None
    family = raw.get("family")
    if family not in FAMILIES:
        raise _malformed(path, f"family {family!r} is none of {', '.join(FAMILIES)}")
    recorded = Recorded(path, family, source=raw.get("source"), version=raw.get("dite_version"))
    configs = _json_field(path, raw, "configs")
    if configs is None:  # one component: config + kind
        config = _json_field(path, raw, "config")
        name, kind = raw.get("component", ""), raw.get("kind")
        if config is not None and "," not in name:
            configs = {name: {"kind": kind, "config": config}}
    for name, entry in (configs or {}).items():
        if not isinstance(entry, dict) or entry.get("kind") not in CONFIG_CLASSES:
            raise _malformed(path, f"component {name!r} has no known kind")
        try:
            recorded.configs[name] = config_from_dict(entry["kind"], entry.get("config"), f"config of {name}")
        except ValueError as exc:
            raise _malformed(path, str(exc)) from None
        recorded.kinds[name] = entry["kind"]
    scheduler = _json_field(path, raw, "scheduler_config")
    if scheduler is not None:
        from dite.schedulers import from_diffusers_config

        try:
            from_diffusers_config(scheduler)
        except Exception as exc:  # any way a config can be wrong: the file is not as dite wrote it
            raise _malformed(path, f"scheduler_config: {_one_line(exc)}") from None
        recorded.scheduler = scheduler
    index = _json_field(path, raw, "model_index")
    if index is not None and not isinstance(index.get("_class_name"), str):
        raise _malformed(path, "model_index has no _class_name")
    recorded.model_index = index
    return recorded


# ----------------------------------------------------------------------------- model_config


def check_hint_values(model_config: dict, where: str = "model_config") -> None:
    """The scalar hints every loader takes, checked before they reach a config."""
    for key in ("num_heads", "sample_size"):
        if key in model_config:
            value = model_config[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{where} {key} must be a whole number >= 1, not {value!r}")
    if "variant" in model_config and model_config["variant"] not in ("alpha", "sigma"):
        raise ConfigError(f"{where} variant must be 'alpha' or 'sigma', not {model_config['variant']!r}")


def _as_config(kind: str, value, key: str):
    """A component hint (a dite config or its config.json dict) as a dite config."""
    cls = config_class(kind)
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"model_config[{key!r}] must be a {cls.__name__} or a config.json dict, "
                          f"not {type(value).__name__}")
    try:
        return cls.from_diffusers(value) if kind == "vae" else cls.from_transformers(value)
    except DiteError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise ConfigError(f"model_config[{key!r}] is not a usable config.json ({_one_line(exc)})") from None


def _agree(recorded: Recorded, key: str, given, value) -> None:
    name = recorded.path.name
    if not is_dataclass(value):
        if given != value:
            raise ConfigError(f"model_config {key}={given!r} contradicts {key}={value!r} recorded in {name} when "
                              "dite wrote it; drop it from model_config (the recorded value is used)")
        return
    kind = next(k for k in CONFIG_CLASSES if isinstance(value, config_class(k)))
    mine = _as_config(kind, given, key)
    for f in fields(value):
        if f.name in FROM_THE_FILE.get(kind, ()):
            continue
        a, b = getattr(mine, f.name), getattr(value, f.name)
        if a != b:
            raise ConfigError(f"model_config[{key!r}] {f.name}={a!r} contradicts {f.name}={b!r} recorded in {name} "
                              "when dite wrote it; drop it from model_config (the recorded config is used)")


def with_recorded(path: str | os.PathLike, model_config: dict | None) -> dict:
    """`model_config` for the single file at `path`, completed with what dite recorded in
    it; a value that contradicts the record is refused, naming the field and both values."""
    if model_config is not None and not isinstance(model_config, dict):
        raise ConfigError(f"model_config must be a dict, not {type(model_config).__name__}")
    merged = dict(model_config or {})
    check_hint_values(merged)
    recorded = read_recorded(path)
    if recorded is None:
        return merged
    for key, value in recorded.hints().items():
        if key in merged:
            _agree(recorded, key, merged[key], value)
        merged[key] = value
    return merged


def recorded_config(path: str | os.PathLike, name: str, config):
    """`config` (detected from the tensors of component `name`) as dite recorded it, which
    keeps what shapes cannot tell (e.g. DiT's timestep shift and LayerNorm eps); refused if
    the record describes other tensors."""
    recorded = read_recorded(path)
    if recorded is None or name not in recorded.configs or recorded.configs[name] == config:
        return config
    kept = recorded.configs[name]
    if type(kept) is not type(config):
        raise _malformed(Path(path), f"it records a {recorded.kinds[name]} {name}, the tensors are another kind")
    from dite.engine.checkpoints.tensor_stream import meta_state

    def shapes(cfg) -> dict:
        return {k: tuple(t.shape) for k, t in meta_state(recorded.kinds[name], cfg).items()}

    if shapes(kept) != shapes(config):
        differ = [f"{f.name}={getattr(kept, f.name)!r} recorded, {getattr(config, f.name)!r} in the tensors"
                  for f in fields(config) if getattr(kept, f.name) != getattr(config, f.name)]
        raise RecordedMetadataError(f"{path}: the {name} config dite recorded in it does not fit its tensors "
                              f"({'; '.join(differ)}); the file was changed after dite wrote it: convert it again "
                              "from its source")
    return kept


def recorded_scheduler(path: str | os.PathLike) -> dict | None:
    """The scheduler config recorded in the file at `path` (None: not recorded)."""
    recorded = read_recorded(path)
    return dict(recorded.scheduler) if recorded is not None and recorded.scheduler is not None else None


def recorded_id2label(path: str | os.PathLike) -> dict | None:
    """The class names of the pipeline the file at `path` was converted from, if recorded."""
    recorded = read_recorded(path)
    index = recorded.model_index if recorded is not None else None
    labels = index.get("id2label") if index else None
    return labels if isinstance(labels, dict) else None


def file_metadata(*, family: str, release: str | None, components: list, written: list, source: str,
                  scheduler: dict | None, model_index: dict | None) -> dict[str, str]:
    """The metadata of one written file: `components` are in it, `written` is every
    component the conversion wrote (the file records all their configs). `release` (SD3's
    release, PixArt's version) goes under the key "variant", as files have always had it."""
    from dite.engine.version import dite_version

    first = components[0]
    if len(components) == 1:
        config = config_dict(first.config)
    else:
        config = {c.name: config_dict(c.config) for c in components}
    meta = {"format": "pt", "family": family, "component": ",".join(c.name for c in components),
            "kind": first.kind, "variant": release or "", "config": json.dumps(config, default=list),
            "configs": json.dumps({c.name: {"kind": c.kind, "config": config_dict(c.config)} for c in written},
                                  default=list),
            "source": source, "dite_version": dite_version()}
    if scheduler is not None:
        meta["scheduler_config"] = json.dumps(scheduler)
    if model_index is not None:
        meta["model_index"] = json.dumps(model_index)
    return meta
