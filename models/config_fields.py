"""Checking config values before they build anything: configs read from JSON files
(`config.json`, `scheduler_config.json`, `model_index.json`), `model_config=` hints, and the
config dataclasses themselves.

JSON gives any type anywhere: a list where an object belongs, "28" where 28 does, NaN,
-3 layers. Each of those would otherwise surface later as a TypeError, a ZeroDivisionError
or an empty model. One rule per kind of field, one message naming the field and what it
takes; callers that know the file (engine/loading/config_files.py) prefix its path.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from functools import lru_cache
from typing import Any, Iterable, Mapping

from dite.engine.errors import ConfigError


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type (for messages)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


def shown(value: Any) -> str:
    """A value as the JSON file spells it, with its type when that is the problem."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({json_type(value)})" if isinstance(value, (str, bool, list, tuple, Mapping)) or value is None \
        else text


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_list(v, item) -> bool:
    return isinstance(v, (list, tuple)) and all(item(x) for x in v)


# kind -> (test, what the field takes)
KINDS: dict[str, tuple[Any, str]] = {
    "size": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "count": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "int": (_is_int, "an integer"),
    "number": (_is_number, "a finite number"),
    "positive": (lambda v: _is_number(v) and v > 0, "a positive finite number"),
    # Finite, or ±Infinity where the field's default is infinite (DPM-Solver's lambda_min_clipped).
    "extended": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v),
                 "a number (not NaN)"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "sizes": (lambda v: _is_list(v, KINDS["size"][0]) and len(v) > 0, "a non-empty list of positive integers"),
    "counts": (lambda v: _is_list(v, KINDS["count"][0]), "a list of non-negative integers"),
    "numbers": (lambda v: _is_list(v, _is_number), "a list of finite numbers"),
    "strings": (lambda v: _is_list(v, lambda x: isinstance(x, str)), "a list of strings"),
    "object": (lambda v: isinstance(v, Mapping), "a JSON object"),
}


def require_object(config: Any, what: str) -> Mapping:
    if not isinstance(config, Mapping):
        raise ConfigError(f"{what} must be a JSON object ({{...}}), not {json_type(config)}")
    return config


def check_value(name: str, value: Any, kind: str, what: str) -> None:
    test, takes = KINDS[kind]
    if not test(value):
        raise ConfigError(f"{what}: {name} must be {takes}, got {shown(value)}")


def check_fields(config: Any, what: str, fields: Mapping[str, str], required: Iterable[str] = ()) -> Mapping:
    """Check a config dict: `fields` maps a key to its kind (see KINDS); a key that is absent
    or null takes its default, unless `required`. Unknown keys are not checked: diffusers
    configs carry many that do not matter here. Returns the config."""
    require_object(config, what)
    for name in required:
        if config.get(name) is None:
            raise ConfigError(f"{what} has no {name!r}, which is required")
    for name, kind in fields.items():
        if config.get(name) is not None:
            check_value(name, config[name], kind, what)
    return config


def _annotation_kind(hint: Any, default: Any) -> tuple[str | None, bool]:
    """(kind, None allowed) of a dataclass field's type; kind None: not checked."""
    optional = False
    args = typing.get_args(hint)
    if type(None) in args:
        optional = True
        rest = [a for a in args if a is not type(None)]
        hint = rest[0] if len(rest) == 1 else None
    if hint is bool:
        return "bool", optional
    if hint is int:
        return "count", optional
    if hint is float:
        infinite = isinstance(default, float) and math.isinf(default)
        return ("extended" if infinite else "number"), optional
    if hint is str:
        return "str", optional
    origin = typing.get_origin(hint)
    if origin in (tuple, list):
        item = (typing.get_args(hint) or (None,))[0]
        return {int: "counts", float: "numbers", str: "strings"}.get(item), optional
    return None, optional


@lru_cache(maxsize=None)
def dataclass_kinds(cls: type) -> dict[str, tuple[str | None, bool]]:
    """Field name -> (kind, None allowed), from a config dataclass's annotations."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else None
        out[f.name] = _annotation_kind(hints[f.name], default)
    return out


def check_against(cls: type, config: Any, what: str, sizes: Iterable[str] = ()) -> Mapping:
    """Check the keys of a config dict that are fields of the dataclass `cls` (a scheduler
    config, whose JSON keys are its field names) by the fields' types; `sizes` name int
    fields that must be positive."""
    require_object(config, what)
    sizes = set(sizes)
    for name, (kind, optional) in dataclass_kinds(cls).items():
        if name not in config or kind is None:
            continue
        value = config[name]
        if value is None:
            if optional:
                continue
            raise ConfigError(f"{what}: {name} must be {KINDS[kind][1]}, got null")
        check_value(name, value, "size" if name in sizes else kind, what)
    return config


def check_instance(obj: Any, what: str, counts: Iterable[str] = (), signed: Iterable[str] = ()) -> None:
    """A config dataclass's own values, however it was made (a config.json, tensor shapes, a
    model_config hint): int fields positive (those in `counts` may be 0, `signed` any int),
    float fields finite and positive (those in `signed` any finite value)."""
    counts, signed = set(counts), set(signed)
    for name, (kind, optional) in dataclass_kinds(type(obj)).items():
        value = getattr(obj, name)
        if value is None and optional:
            continue
        if kind == "count":
            kind = "int" if name in signed else "count" if name in counts else "size"
        elif kind == "number":
            kind = "number" if name in signed else "positive"
        elif kind is None:
            continue
        if kind == "counts" and isinstance(value, (list, tuple)):
            value = list(value)
        check_value(name, value, kind, what)
