"""--prompt-file: many prompts in one run (the model loads once).

Two forms, told apart by the first non-blank line:
- plain text: one prompt a line (DiT: one class label, index or name, a line); blank lines
  and lines starting with # are skipped;
- JSON Lines: one object a line with "prompt" (DiT: "class_label") and optionally
  "negative", "seed", "size" ("WxH"), "steps", "guidance", "accel". A key left out takes
  the command line's value.
Every line is checked before the model loads; an error names the file and line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from dite.engine.errors import InputError

KEYS = ("prompt", "class_label", "negative", "seed", "size", "steps", "guidance", "accel")


@dataclass(frozen=True)
class Entry:
    """One line of a prompt file: its number and the settings it gives."""

    line: int
    settings: dict[str, Any]


def read_prompt_file(path: str | Path, checks: dict[str, Callable[[str], Any]]) -> list[Entry]:
    """The entries of `path`. `checks` parse and check a value given as text (the CLI's
    argparse types for --seed, --size, --steps, --guidance); an error names file and line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"--prompt-file {path}: no such file") from None
    except (IsADirectoryError, UnicodeDecodeError, PermissionError) as exc:
        raise InputError(f"--prompt-file {path}: not a readable UTF-8 text file ({exc})") from None
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), start=1)]
    lines = [(n, line) for n, line in lines if line and not line.startswith("#")]
    if not lines:
        raise InputError(f"--prompt-file {path} holds no prompts (one a line, or one JSON object a line)")
    if not lines[0][1].startswith("{"):
        return [Entry(n, {"text": line}) for n, line in lines]
    return [Entry(n, _json_line(path, n, line, checks)) for n, line in lines]


def _json_line(path, number: int, line: str, checks: dict[str, Callable[[str], Any]]) -> dict[str, Any]:
    where = f"--prompt-file {path} line {number}"
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InputError(f"{where}: not a JSON object ({exc.msg} at column {exc.colno}); a JSON Lines file holds "
                         "one object a line") from None
    if not isinstance(value, dict):
        raise InputError(f"{where}: a JSON Lines prompt file holds one object a line, not a {type(value).__name__}")
    unknown = sorted(set(value) - set(KEYS))
    if unknown:
        raise InputError(f"{where}: unknown key {unknown[0]!r}; a line may give {', '.join(KEYS)}")
    if "prompt" not in value and "class_label" not in value:
        raise InputError(f"{where}: give \"prompt\" (text-to-image) or \"class_label\" (DiT)")
    for key in ("prompt", "negative", "accel"):
        if key in value and not isinstance(value[key], str):
            raise InputError(f"{where}: {key!r} must be a string, not {json.dumps(value[key])}")
    settings = {}
    for key, item in value.items():
        if key in checks:
            if isinstance(item, bool) or not isinstance(item, (str, int, float)):
                raise InputError(f"{where}: {key!r} {json.dumps(item)} is not a {key} value")
            try:
                item = checks[key](str(item))
            except Exception as exc:  # the argparse types raise ArgumentTypeError with a message
                raise InputError(f"{where}: {key!r}: {exc}") from None
        settings[key] = item
    return settings
