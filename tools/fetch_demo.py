"""Put a demo model that does not ship in the wheel where `dite` finds it by name.

    python tools/fetch_demo.py demo-sd3-128                       # from this checkout's demos/
    python tools/fetch_demo.py demo-sd3-128 --from /path/to/sd3_128
    python tools/fetch_demo.py demo-sd3-128 --hub owner/name      # a hub repo holding the folder

The folder is checked (a diffusers pipeline folder dite recognises) and copied to
dite's user cache ($DITE_CACHE_DIR, else ~/.cache/dite) under demos/, where
`dite generate --model demo-sd3-128` looks after the checkout's demos/ folder.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from dite.engine.errors import DiteError
from dite.engine.loading.hub import DEMO_FAMILIES, DEMO_MODELS, OUTSIDE_WHEEL, demo_locations, resolve_source

ROOT = Path(__file__).resolve().parent.parent


def fetch(name: str, source: str | None, hub: str | None) -> Path:
    if name not in OUTSIDE_WHEEL:
        raise DiteError(f"{name!r} is not a demo kept outside the wheel (those are: {', '.join(sorted(OUTSIDE_WHEEL))})")
    if hub:
        folder = resolve_source(hub)  # HubError with what to do when offline
    else:
        folder = Path(source) if source else ROOT / "demos" / DEMO_MODELS[name]
    if not (folder / "model_index.json").is_file():
        raise DiteError(f"{folder} is not a diffusers pipeline folder (no model_index.json); "
                        "give the demo's folder with --from")
    from dite.engine.checkpoints.recognise import pipeline_family
    from dite.engine.loading.config_files import read_model_index

    family = pipeline_family(folder / "model_index.json", read_model_index(folder)).name  # one line if not dite's
    if family != DEMO_FAMILIES[name]:
        raise DiteError(f"{folder} holds a {family} pipeline; {name} is a {DEMO_FAMILIES[name]} model")
    target = demo_locations(name)[-1]
    if target.resolve() == folder.resolve():
        return target
    temporary = target.with_name(target.name + ".partial")
    shutil.rmtree(temporary, ignore_errors=True)
    shutil.copytree(folder, temporary)
    shutil.rmtree(target, ignore_errors=True)
    temporary.rename(target)
    return target


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=sorted(OUTSIDE_WHEEL))
    where = p.add_mutually_exclusive_group()
    where.add_argument("--from", dest="source", help="the demo's folder (default: this checkout's demos/)")
    where.add_argument("--hub", help="a hub repo id holding the folder")
    args = p.parse_args(argv)
    try:
        target = fetch(args.name, args.source, args.hub)
    except DiteError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{args.name}: {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
