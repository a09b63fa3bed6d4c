"""`dite inspect`'s per-component view: for every component of a file or folder, its kind,
detected config, dtypes and parameter count, and for a file that does not fit its model,
every missing, unexpected and mis-shaped key with what was expected.

It recognises checkpoints as conversion does (engine/checkpoints/parts.py), which is as
`load()` does; names and shapes only, no tensor data.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from dite.engine.checkpoints.parts import find_parts
from dite.engine.checkpoints.tensor_stream import Component, key_report


def _config_dict(config) -> dict:
    return config.to_dict() if hasattr(config, "to_dict") else asdict(config) if is_dataclass(config) else dict(config)


def component_summary(component: Component) -> dict[str, Any]:
    reader = component.reader
    available = set(reader.keys())
    keys = sorted({k for source in component.keymap.values() for k in source.keys if k in available})
    count = 0
    for key in keys:
        n = 1
        for s in reader.shape(key):
            n *= s
        count += n
    info: dict[str, Any] = {"kind": component.kind, "config": _config_dict(component.config), "parameters": count,
                            "tensors": len(keys), "dtypes": dict(Counter(reader.dtype(k) for k in keys))}
    report = key_report(component)
    if not report.clean:
        info["problems"] = report.as_dict()
    if component.notes:
        info["notes"] = list(component.notes)
    return info


def describe_parts(path: Path, **options) -> dict[str, Any]:
    """{"family", "layout", "variant", "components": {name: summary}} of the checkpoint at
    `path`; raises the "not a supported model (closest: ...)" error for anything else."""
    parts = find_parts(path, **options)
    info: dict[str, Any] = {"family": parts.family, "layout": parts.layout,
                            "components": {name: component_summary(c) for name, c in parts.components.items()}}
    if parts.release:
        info["variant"] = parts.release
    if any("problems" in c for c in info["components"].values()):
        info["clean"] = False
    return info
