"""Output file names for `generate`: the -o path for one image, a name pattern for several.

One image: the -o path itself. Several (several prompts, --images-per-prompt, --batch-count,
--prompt-file): `--name-pattern` (default `{stem}-{index}-{seed}`) names each file, with
the suffix of -o. A name that two images would share, or a file that already exists, is
refused before anything is loaded (unless --overwrite): generate never loses a user's file.
"""

from __future__ import annotations

import os
import re
import string
from pathlib import Path

from dite.engine.errors import InputError

# -o suffix -> the PIL format written.
FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
DEFAULT_PATTERN = "{stem}-{index}-{seed}"
FIELDS = {"stem": "the -o file name without its suffix", "index": "0, 1, ... over the whole run",
          "seed": "the image's seed", "line": "the --prompt-file line (1, 2, ...; 0 without a file)",
          "batch": "the --batch-count round (0, 1, ...)", "prompt": "the prompt, as a file-name-safe slug"}


def output_base(output: str) -> Path:
    """The -o path checked: not empty, not a folder, a suffix dite writes (.png without one)."""
    if not output.strip():
        raise InputError("--output is empty: give an image path such as out.png")
    path = Path(output)
    if output.endswith(("/", os.sep)) or path.is_dir():
        raise InputError(f"--output {output} is a folder: give a file path such as {path / 'out.png'}")
    suffix = path.suffix.lower()
    if suffix in FORMATS:
        return path
    if path.suffix:
        raise InputError(f"--output {output}: dite writes {', '.join(sorted(FORMATS))} images; give a path ending "
                         f"in one of them, e.g. {path.with_suffix('.png')}")
    return path.with_name(path.name + ".png")


def check_pattern(pattern: str) -> str:
    """A --name-pattern: str.format fields from FIELDS only, no path separators."""
    if not pattern.strip():
        raise InputError("--name-pattern is empty: give e.g. '{stem}-{index}-{seed}'")
    if "/" in pattern or os.sep in pattern:
        raise InputError(f"--name-pattern {pattern!r} holds a path separator: it names files in the -o folder")
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(pattern) if name is not None]
    except ValueError as exc:
        raise InputError(f"--name-pattern {pattern!r}: {exc}") from None
    unknown = [name for name in fields if name.split(".")[0].split("[")[0].split("!")[0] not in FIELDS]
    if unknown:
        raise InputError(f"--name-pattern {pattern!r}: unknown field {{{unknown[0]}}}; use "
                         f"{', '.join('{' + f + '}' for f in FIELDS)}")
    return pattern


def slug(text: str, limit: int = 40) -> str:
    """A prompt as a file-name fragment: letters, digits, '-', at most `limit` characters."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:limit].rstrip("-") or "image"


def image_paths(base: Path, images: list[dict], pattern: str | None) -> list[Path]:
    """One path per image; `images` holds each image's fields (index, seed, line, batch,
    prompt). The -o path itself when there is one image and no pattern was given."""
    if len(images) == 1 and pattern is None:
        return [base]
    pattern = check_pattern(pattern or DEFAULT_PATTERN)
    paths = []
    for fields in images:
        values = {"stem": base.stem, **fields, "prompt": slug(str(fields.get("prompt") or ""))}
        try:
            name = pattern.format(**values)
        except (ValueError, IndexError, KeyError, AttributeError) as exc:
            raise InputError(f"--name-pattern {pattern!r}: {exc}") from None
        paths.append(base.with_name(name + base.suffix))
    seen: dict[Path, int] = {}
    for k, path in enumerate(paths):
        if path in seen:
            raise InputError(f"--name-pattern {pattern!r} gives images {seen[path]} and {k} the same file {path.name}; "
                             "add {index} to it")
        seen[path] = k
    return paths


def refuse_existing(paths: list[Path], overwrite: bool) -> None:
    """Existing outputs are kept unless --overwrite: one line naming the first of them."""
    if overwrite:
        return
    existing = [path for path in paths if path.exists()]
    if existing:
        more = f" (and {len(existing) - 1} more of the {len(paths)} outputs)" if len(existing) > 1 else ""
        raise InputError(f"{existing[0]} exists{more}: give another -o or --name-pattern, or --overwrite to "
                         "replace it")
