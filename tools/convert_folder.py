"""Convert every checkpoint in a folder with `dite.engine.convert`, one after another.

    python tools/convert_folder.py IN_DIR OUT_DIR --to diffusers [--dtype fp16] [--max-shard-size 5GB] [--force]

Each checkpoint file (*.safetensors, *.pt, *.pth, *.ckpt, *.bin) and each diffusers folder
(holding model_index.json or config.json) directly inside IN_DIR becomes OUT_DIR/<name>
(a folder for --to diffusers, <name>.safetensors for --to original). Files that are parts
of another (an SD3 release's text_encoders/) are read by their model file, not on their
own. A failure is reported and the batch goes on; the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from dite.engine import convert
from dite.engine.errors import DiteError

SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt", ".bin")


def sources(folder: Path) -> list[Path]:
    found = []
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix in SUFFIXES:
            found.append(path)
        elif path.is_dir() and ((path / "model_index.json").exists() or (path / "config.json").exists()):
            found.append(path)
    return found


def destination(out: Path, source: Path, to: str) -> Path:
    stem = source.name if source.is_dir() else source.stem
    return out / stem if to == "diffusers" else out / f"{stem}.safetensors"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--to", required=True, choices=["diffusers", "original"])
    parser.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--max-shard-size", default=None)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    failed = 0
    for source in sources(args.input):
        target = destination(args.output, source, args.to)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                convert(source, target, to=args.to, dtype=args.dtype, max_shard_size=args.max_shard_size,
                        force=args.force)
            print(f"{source} -> {target}")
            for warning in caught:
                print(f"  note: {warning.message}")
        except DiteError as exc:
            failed += 1
            print(f"{source}: FAILED: {exc}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
