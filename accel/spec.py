"""Parsing accel specs: "ditcache+promptgate+todo", "ditcache(start_step=10,blocks=1:21)+todo(factor=2)".

Each method's parameters are its dataclass fields; a value is converted by the field's
declared type (int, float, str, or a block range "a:b"). Unknown methods or parameters,
and values of the wrong type, are errors that list what is accepted.
"""

from __future__ import annotations

import dataclasses
import re

from dite.engine.errors import ConfigError

_CALL = re.compile(r"^\s*([A-Za-z][\w-]*)\s*(?:\((.*)\))?\s*$", re.S)


def _split_top(text: str, sep: str) -> list[str]:
    """Split on `sep` outside parentheses."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if ch == sep and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    if depth:
        raise ConfigError(f"unbalanced parentheses in accel spec {text!r}")
    return parts + [current]


def _convert(method: str, name: str, annotation: str, raw: str):
    kind = annotation.replace(" | None", "").strip()
    raw = raw.strip()
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "str":
            return raw.strip("'\"")
        if kind.startswith("tuple"):
            a, b = raw.split(":")
            return (int(a), int(b))
    except ValueError:
        pass
    expected = "a block range like 1:21" if kind.startswith("tuple") else f"a value of type {kind}"
    raise ConfigError(f"{method}: {name}={raw!r} is not {expected}")


def parse_method(text: str):
    from dite.accel.registry import ALIASES, METHODS

    match = _CALL.match(text)
    if not match:
        raise ConfigError(f"cannot read accel method {text.strip()!r}; write name or name(key=value,...)")
    name = match[1].lower()
    name = ALIASES.get(name, name)
    if name not in METHODS:
        raise ConfigError(f"unknown accel method {match[1]!r}; known: {', '.join(METHODS)} (see `dite accel`)")
    cls = METHODS[name]
    params = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for item in _split_top(match[2] or "", ","):
        if not item.strip():
            continue
        if "=" not in item:
            raise ConfigError(f"{name}: parameter {item.strip()!r} needs a value (key=value)")
        key, value = (s.strip() for s in item.split("=", 1))
        if key not in params:
            raise ConfigError(f"{name} has no parameter {key!r}; its parameters: {', '.join(params) or 'none'}")
        kwargs[key] = _convert(name, key, str(params[key].type), value)
    return cls(**kwargs)


def parse_spec(spec: str) -> list:
    parts = [p for p in _split_top(spec, "+")]
    if any(not p.strip() for p in parts):
        raise ConfigError(f"empty method in accel spec {spec!r}")
    return [parse_method(p) for p in parts]
