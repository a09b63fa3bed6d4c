"""Peak memory of `dite convert` on a ~1 GB checkpoint: it should be about the largest
tensor (plus the Python/torch baseline), not the model.

    python tools/bench_convert_memory.py [--workdir /tmp/dite-convert-bench] [--depth 10]

Writes a random original-layout DiT (XL width, `--depth` blocks: 10 is ~0.96 GB in fp32)
tensor by tensor, then converts it to a diffusers folder and back in child processes and
reports each child's peak resident set size (ru_maxrss), next to a child that only
imports dite and torch (the baseline) and the largest tensor.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

CHILD = """
import resource
from dite.engine.checkpoints.convert import convert
{action}
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def write_random_dit(path: Path, depth: int) -> tuple[int, int]:
    """A random original-layout DiT at `path`, streamed; (file bytes, largest tensor bytes)."""
    from dite.engine.checkpoints.safetensors_writer import PlannedTensor, SafetensorsWriter
    from dite.engine.checkpoints.tensor_stream import meta_state
    from dite.models.dit import DiTConfig

    cfg = DiTConfig(hidden_size=1152, depth=depth, num_heads=16)
    planned = [PlannedTensor(k, tuple(t.shape), torch.float32) for k, t in meta_state("dit", cfg).items()]
    writer = SafetensorsWriter(path, planned)
    generator = torch.Generator().manual_seed(0)
    for item in planned:
        writer.write(item.key, torch.randn(item.shape, generator=generator) * 0.02)
    writer.close()
    return path.stat().st_size, max(item.nbytes for item in planned)


def child_peak_mb(action: str) -> float:
    """Peak RSS (MB) of a fresh Python process running `action` after importing dite."""
    out = subprocess.run([sys.executable, "-c", CHILD.format(action=action)], check=True, capture_output=True,
                         text=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024  # ru_maxrss is in KiB on Linux


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--depth", type=int, default=10)
    args = parser.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="dite-convert-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    source = work / "DiT-random.safetensors"
    size, largest = write_random_dit(source, args.depth)
    folder, back = work / "diffusers", work / "back.safetensors"
    rows = {
        "baseline (import dite + torch)": child_peak_mb("pass"),
        "original -> diffusers": child_peak_mb(f"convert({str(source)!r}, {str(folder)!r}, to='diffusers', force=True)"),
        "diffusers -> original": child_peak_mb(f"convert({str(folder)!r}, {str(back)!r}, to='original', force=True)"),
        "original -> diffusers, fp16, 100MB shards": child_peak_mb(
            f"convert({str(source)!r}, {str(folder)!r}, to='diffusers', dtype='fp16', max_shard_size='100MB', "
            "force=True)"),
    }
    report = {"checkpoint_mb": size / 1e6, "largest_tensor_mb": largest / 1e6,
              "peak_rss_mb": {k: round(v, 1) for k, v in rows.items()}}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
