"""Where dite keeps what it measures or computes once per machine (the CPU dtype probe, model
hashes): $DITE_CACHE_DIR, else $XDG_CACHE_HOME/dite, else ~/.cache/dite."""

from __future__ import annotations

import json
import os
from pathlib import Path


def cache_dir() -> Path:
    root = os.environ.get("DITE_CACHE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dite"


def read_json(name: str) -> dict:
    """A cache file's object; {} when missing or unreadable (a cache is never required)."""
    try:
        value = json.loads((cache_dir() / name).read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def update_json(name: str, key: str, value) -> None:
    """Set `key` in a cache file (written whole, atomically); failures are ignored: a cache that
    cannot be written only costs the next run the work again."""
    data = read_json(name)
    data[key] = value
    path = cache_dir() / name
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}")
        temporary.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(temporary, path)
    except OSError:
        pass
