"""Peak memory of loading an fp32 checkpoint as a bf16 model: it should be about the final
weights + one tensor + the import baseline, not the file + the model.

    nice -n 10 python tools/bench_load_memory.py [--workdir DIR] [--depth 28] [--keep]

Writes a random original-layout DiT-XL (width 1152, `--depth` blocks; 28 is the release's
2.7 GB in fp32) as safetensors, tensor by tensor, then in fresh child processes: imports
only (the baseline), and `load(FILE, dtype="bf16", vae=demo-dit's VAE)` read tensor by tensor
with positioned reads (dite's way, `weights.LOAD_WITH_MMAP = False`) and through the file's
memory map (the old way, True). Prints each child's peak resident set (VmHWM) against
baseline + final weights (parameters and buffers of the loaded modules) + the largest tensor.
Memory-bound, not CPU-bound: run it niced.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

# Peak RSS is the child's VmHWM: ru_maxrss would also count the parent's pages at fork time.
from bench_convert_memory import write_random_dit  # noqa: E402  (tools/ is the script folder)

CHILD = """
import json
import dite.engine.loading.weights as weights
from dite.engine.loading.loader import load, demo_folder
{action}
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({{"peak": peak, "final": final}}))
"""
LOAD = """
weights.LOAD_WITH_MMAP = {mmap}
pipe = load({file!r}, dtype="bf16", vae=str(demo_folder("demo-dit") / "vae"))
final = sum(t.numel() * t.element_size() for m in (pipe.transformer, pipe.vae)
            for t in [*m.parameters(), *m.buffers()])
"""


def child(action: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD.format(action=action)], check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--depth", type=int, default=28)
    parser.add_argument("--keep", action="store_true", help="keep the random checkpoint")
    args = parser.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="dite-load-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    file = work / "DiT-random.safetensors"
    size, largest = write_random_dit(file, args.depth)
    try:
        baseline = child("final = 0")["peak"]
        rows = {}
        for name, mmap in (("tensor by tensor (dite)", False), ("memory map (before)", True)):
            rows[name] = child(LOAD.format(mmap=mmap, file=str(file)))
    finally:
        if not args.keep:
            file.unlink()
    gib = 2 ** 30
    final = rows["tensor by tensor (dite)"]["final"]
    bound = baseline + final + largest
    print(f"fp32 file {size / gib:.2f} GiB -> bf16 model; final weights {final / gib:.2f} GiB, largest tensor "
          f"{largest / 2**20:.0f} MiB, import baseline {baseline / gib:.2f} GiB")
    print(f"bound (baseline + final weights + one tensor): {bound / gib:.2f} GiB")
    for name, row in rows.items():
        verdict = "within" if row["peak"] <= bound else "OVER"
        print(f"  {name:24s} peak RSS {row['peak'] / gib:.2f} GiB ({verdict} the bound; "
              f"{(row['peak'] - baseline) / gib:.2f} GiB above baseline)")


if __name__ == "__main__":
    main()
