"""The model hash images record: sha256 of the weights, first 10 hex digits (as AUTOMATIC1111
shows a checkpoint's "Model hash").

Which bytes: a single checkpoint file, that file; a diffusers folder, the files of its
denoiser (`transformer/`), in name order, as one stream. Hashing reads every byte once
(about 1-2 s per GB); the result is cached in `<cache>/dite/model-hashes.json` (cache:
$DITE_CACHE_DIR, else $XDG_CACHE_HOME, else ~/.cache), keyed by each file's resolved path,
size and modification time, so later runs on unchanged files read nothing.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from dite.engine.runtime.user_cache import read_json, update_json

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
CHUNK = 16 * 2**20
CACHE_FILE = "model-hashes.json"


def weight_files(source: Path) -> list[Path]:
    """The files whose bytes make the hash (see the module docstring); [] if none."""
    source = Path(source)
    if source.is_file():
        return [source]
    folder = source / "transformer" if (source / "transformer").is_dir() else source
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def _key(files: list[Path]) -> str:
    parts = []
    for path in files:
        stat = path.stat()
        parts.append(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}")
    return "\n".join(parts)


def model_hash(source: str | os.PathLike | None) -> str | None:
    """First 10 hex digits of the sha256 of `source`'s weights (cached); None when the source
    is not a local path or holds no weight files."""
    if source is None or not Path(source).exists():
        return None
    files = weight_files(Path(source))
    if not files:
        return None
    key = _key(files)
    cached = read_json(CACHE_FILE).get(key)
    if isinstance(cached, str):
        return cached
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
    value = digest.hexdigest()[:10]
    update_json(CACHE_FILE, key, value)
    return value
