"""Convert every checkpoint in a folder with `dite.engine.convert`, one after another.

    python tools/convert_folder.py IN_DIR OUT_DIR --to diffusers [--dtype fp16] [--max-shard-size 5GB] [--force]
        [--model-config '{"num_heads": 6}' | --model-config hints.json]

Each checkpoint file (*.safetensors, *.pt, *.pth, *.ckpt, *.bin) and each diffusers folder
(holding model_index.json or config.json) directly inside IN_DIR becomes OUT_DIR/<name>
(a folder for --to diffusers, <name>.safetensors for --to original). Files that are parts
of another (an SD3 release's text_encoders/) are read by their model file, not on their
own. --model-config (a JSON object, or a JSON file, as `dite convert` takes it) goes to
every single file of the batch; folders carry their own config.json.

Bad arguments (a missing IN_DIR, OUT_DIR being IN_DIR or a file, two sources that would
write the same output, bad JSON) stop before anything is converted: one line, exit status
2. A failed conversion is reported and the batch goes on; the exit status is then 1.
Every conversion refuses to write over a source and replaces an existing output only with
--force, once the new one is complete.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from dite.engine import convert
from dite.engine.checkpoints.destination import same_place, within
from dite.engine.checkpoints.recorded import parse_model_config
from dite.engine.errors import DiteError, InputError

SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt", ".bin")
EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line and exit status 2."""

    def error(self, message: str):
        print(f"convert_folder: error: {message} (see --help)", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


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


def plan(input_dir: Path, output_dir: Path, to: str) -> list[tuple[Path, Path]]:
    """(source, destination) pairs; refuses a batch that cannot be written as asked."""
    if not input_dir.exists():
        raise InputError(f"{input_dir}: no such folder")
    if not input_dir.is_dir():
        raise InputError(f"{input_dir} is a file; give the folder holding the checkpoints (or use `dite convert`)")
    if output_dir.exists() and not output_dir.is_dir():
        raise InputError(f"{output_dir} is a file; give a folder for the converted checkpoints")
    if same_place(output_dir, input_dir):
        raise InputError(f"{output_dir} is the input folder; give another output folder")
    if within(input_dir, output_dir):
        raise InputError(f"{output_dir} holds the input folder {input_dir}; give an output folder outside it")
    pairs = [(source, destination(output_dir, source, to)) for source in sources(input_dir)]
    seen: dict[Path, Path] = {}
    for source, target in pairs:
        if target in seen:
            raise InputError(f"{seen[target].name} and {source.name} would both be written to {target}; move one "
                             "of them out of the folder or rename it")
        seen[target] = source
    return pairs


def main(argv=None) -> int:
    parser = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--to", required=True, choices=["diffusers", "original"])
    parser.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--max-shard-size", default=None)
    parser.add_argument("--model-config", default=None, metavar="JSON",
                        help="what shapes cannot tell, for the batch's single files: a JSON object or file")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    try:
        model_config = parse_model_config(args.model_config)
        pairs = plan(args.input, args.output, args.to)
        args.output.mkdir(parents=True, exist_ok=True)
    except DiteError as exc:
        print(f"convert_folder: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as exc:
        print(f"convert_folder: error: cannot create {args.output}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    failed = 0
    for source, target in pairs:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                convert(source, target, to=args.to, dtype=args.dtype, max_shard_size=args.max_shard_size,
                        force=args.force, model_config=model_config if source.is_file() else None)
            print(f"{source} -> {target}")
            for warning in caught:
                print(f"  note: {warning.message}")
        except DiteError as exc:
            failed += 1
            print(f"{source}: FAILED: {exc}", file=sys.stderr)
        except KeyboardInterrupt:
            print(f"convert_folder: interrupted at {source}; {target} was left as it was", file=sys.stderr)
            return 130
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
