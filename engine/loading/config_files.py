"""Reading the JSON config files of a model folder, with errors that name the file.

Every config file dite reads (a component's `config.json`, `model_index.json`,
`scheduler_config.json`) goes through `read_config`: a missing or unreadable file, invalid
JSON or a JSON value that is not an object is one ConfigError naming the file. Parsing a
config into a dite config (`DiTConfig.from_diffusers`, ...) checks every field it reads
(models/config_fields.py); `parse_config` / `naming` put the file's path in front of those
messages, so "num_layers must be a positive integer, got -3" says which file holds it.
Loading, `dite inspect` and `dite convert` all read configs here.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from dite.engine.errors import ConfigError
from dite.models.config_fields import check_fields, json_type

T = TypeVar("T")


class ConfigFile(dict):
    """A config dict that remembers the file it was read from (`.path`)."""

    path: Path | None = None


def read_config(path: str | os.PathLike, what: str = "config") -> ConfigFile:
    """The JSON object in `path`, or one ConfigError naming the file and what is wrong."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file (the {what} is missing)") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(f"cannot read {what} {path}: {reason}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
                          f"fix the {what} or download it again") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path} must hold a JSON object ({{...}}), not {json_type(value)}; is this the {what}?")
    config = ConfigFile(value)
    config.path = path
    return config


def source_of(config: Any) -> Path | None:
    """The file a config dict was read from, if it came from read_config."""
    return getattr(config, "path", None)


@contextmanager
def naming(source: str | os.PathLike | Any | None) -> Iterator[None]:
    """ConfigErrors raised inside get `source` (a path, or a dict from read_config) in front."""
    where = source_of(source) if isinstance(source, dict) else source
    try:
        yield
    except ConfigError as exc:
        text = str(exc)
        if where is None or text.startswith(str(where)):
            raise
        raise type(exc)(f"{where}: {text}") from None


def parse_config(path: str | os.PathLike, parse: Callable[[ConfigFile], T], what: str = "config") -> T:
    """`parse(read_config(path))`, its ConfigErrors naming the file."""
    config = read_config(path, what)
    with naming(path):
        return parse(config)


# model_index.json: the fields dite reads, by kind (models/config_fields.py).
MODEL_INDEX_FIELDS = {"_class_name": "str", "id2label": "object", "_dite": "object"}
DITE_DEFAULTS = {"num_inference_steps": "size", "guidance_scale": "number", "max_sequence_length": "size",
                 "use_resolution_binning": "bool"}


def read_model_index(path: str | os.PathLike) -> ConfigFile:
    """A pipeline folder's model_index.json (`path`: the file or its folder), checked: a
    `_class_name` string, component entries that are [library, class] pairs, and dite's own
    `_dite` defaults and DiT's `id2label` of the right kinds."""
    path = Path(path)
    if path.is_dir():
        path = path / "model_index.json"
    index = read_config(path, "pipeline index (model_index.json)")
    with naming(path):
        check_fields(index, "model_index.json", MODEL_INDEX_FIELDS, required=("_class_name",))
        check_fields(index.get("_dite") or {}, "model_index.json _dite", DITE_DEFAULTS)
        for name, spec in index.items():
            if name.startswith("_") or name == "id2label":
                continue
            if isinstance(spec, list) and (len(spec) != 2 or not all(s is None or isinstance(s, str) for s in spec)):
                raise ConfigError(f"model_index.json: component {name} must be a [library, class] pair, "
                                  f"got {json.dumps(spec)[:60]}")
        labels = index.get("id2label") or {}
        bad = next((k for k, v in labels.items() if not (k.isdigit() and isinstance(v, str))), None)
        if bad is not None:
            raise ConfigError(f"model_index.json: id2label must map class indices (\"207\") to names, got "
                              f"{json.dumps(bad)}: {json.dumps(labels[bad])[:40]}")
    return index


def parsed(config: Any, parse: Callable[[Any], T]) -> T:
    """`parse(config)` for a dict from read_config, its ConfigErrors naming the file."""
    with naming(config):
        return parse(config)
