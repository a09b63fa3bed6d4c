"""Peak memory and time of VAE decoding, whole vs tiled (engine/memory/vae_tiling.py).

    nice -n 10 python tools/bench_vae_tiling.py [--model demo-sd3] [--size 1024] [--tile 512]

Each decode runs in a fresh child process (peak = its VmHWM, after loading the model; the
loaded baseline is printed too), fp32, one image of `--size` pixels a side from random latents.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = """
import json, time, torch
from dite.engine.loading.loader import load
from dite.engine.memory.vae_tiling import enable_vae_tiling
def hwm():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
pipe = load({model!r}, dtype="fp32")
vae = pipe.vae
baseline = hwm()
if {tile}:
    enable_vae_tiling(vae, tile={tile})
side = {size} // vae.downscale
z = torch.randn(1, vae.config.latent_channels, side, side, generator=torch.Generator().manual_seed(0))
start = time.perf_counter()
with torch.inference_mode():
    image = vae.decode(z)
print(json.dumps({{"baseline": baseline, "peak": hwm(), "seconds": time.perf_counter() - start}}))
"""


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo-sd3")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--tile", type=int, default=512)
    args = parser.parse_args(argv)
    gib = 2 ** 30
    print(f"{args.model} VAE, {args.size}x{args.size}, fp32")
    for name, tile in (("whole", 0), (f"tiled ({args.tile})", args.tile)):
        out = subprocess.run([sys.executable, "-c", CHILD.format(model=args.model, tile=tile, size=args.size)],
                             check=True, capture_output=True, text=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  {name:12s} peak {row['peak'] / gib:.2f} GiB ({(row['peak'] - row['baseline']) / gib:.2f} GiB above "
              f"the loaded model), {row['seconds']:.1f} s")


if __name__ == "__main__":
    main()
