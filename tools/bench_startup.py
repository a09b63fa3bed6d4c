"""The CLI's start-up overhead: everything a `dite` run spends outside encode, denoise and decode.

    python tools/bench_startup.py --run new=python \
        --run "old=env PYTHONPATH=/tmp/dite-old-site python" -n 5

Each --run is LABEL=PREFIX, a command prefix that starts a Python with dite importable (an
`env VAR=value` in front sets variables for it). For each prefix the tool runs

    PREFIX -m dite.engine.cli --help
    PREFIX -m dite.engine.cli generate "a red circle on the left" -o OUT.png --quiet   (demo-sd3)

N times, the prefixes interleaved round by round so that a change in the machine's load falls
on all of them alike. Encode, denoise and decode seconds come from the CLI's summary line on
stderr ("... | encode 1.68s denoise 93.06s decode 3.52s"; the PNG's `dite` metadata records
the generation's parameters but no timings), and

    overhead = wall - (encode + denoise + decode)

is start-up, imports, loading the model and writing the PNG. The table gives medians and the
median one-minute load average (os.getloadavg(), what `uptime` prints) sampled before each run.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "a red circle on the left"
TIMING = re.compile(r"\b(encode|denoise|decode) (\d+(?:\.\d+)?)s\b")


def timed(cmd: list[str], cwd: Path) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)  # outside any checkout
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return wall, proc


def stage_seconds(stderr: str) -> dict[str, float]:
    """encode/denoise/decode from the CLI's summary line (its last line naming all three)."""
    for line in reversed(stderr.splitlines()):
        found = dict((k, float(v)) for k, v in TIMING.findall(line))
        if len(found) == 3:
            return found
    raise SystemExit(f"no 'encode/denoise/decode Ns' summary line in:\n{stderr[-2000:]}")


def measure(prefix: list[str], out: Path, extra: list[str]) -> dict[str, float]:
    row = {"load": os.getloadavg()[0]}
    row["help_wall"], _ = timed(prefix + ["-m", "dite.engine.cli", "--help"], out.parent)
    wall, proc = timed(prefix + ["-m", "dite.engine.cli", "generate", PROMPT, "-o", str(out), "--quiet"] + extra,
                       out.parent)
    stages = stage_seconds(proc.stderr)
    row.update(generate_wall=wall, **stages, overhead=wall - sum(stages.values()))
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", required=True, metavar="LABEL=PREFIX",
                   help="a label and the command prefix that starts its Python (repeatable)")
    p.add_argument("-n", "--repeats", type=int, default=5)
    p.add_argument("--extra", default="", help="more generate arguments, e.g. '--steps 4' (default: none)")
    args = p.parse_args(argv)
    runs = {}
    for spec in args.run:
        label, sep, prefix = spec.partition("=")
        if not sep or not prefix.strip():
            p.error(f"--run wants LABEL=PREFIX, got {spec!r}")
        runs[label] = shlex.split(prefix)
    extra = shlex.split(args.extra)
    rows: dict[str, list[dict]] = {label: [] for label in runs}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for label, prefix in runs.items():
                row = measure(prefix, Path(tmp) / f"{label}-{i}.png", extra)
                rows[label].append(row)
                print(f"round {i + 1} {label}: " + " ".join(f"{k} {v:.2f}" for k, v in row.items()),
                      file=sys.stderr, flush=True)
    cols = ["help_wall", "generate_wall", "encode", "denoise", "decode", "overhead", "load"]
    print(f"medians of {args.repeats} interleaved runs (seconds; load = 1-min load average before each run)")
    print("| run | " + " | ".join(cols) + " |")
    print("|" + "---|" * (len(cols) + 1))
    for label, got in rows.items():
        print(f"| {label} | " + " | ".join(f"{statistics.median(r[c] for r in got):.2f}" for c in cols) + " |")
    print(f"{os.cpu_count()} CPUs; generate: demo-sd3, {PROMPT!r} {shlex.join(extra)}".rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
