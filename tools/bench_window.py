"""Band attention's cost against N: window attention (fixed w) vs full SDPA, same q/k/v.

    python tools/bench_window.py --window 64 --tokens 1024 2048 4096 8192 --out bench/window

With w fixed, window time should double when N doubles (linear), full attention's should
quadruple. Medians of interleaved repeats; writes NAME.md and NAME.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dite.models.window_attention import window_attention


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--out", default="bench/window")
    args = p.parse_args(argv)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    rows = []
    for n in args.tokens:
        q, k, v = (torch.randn(1, args.heads, n, args.head_dim, dtype=dtype) for _ in range(3))
        times = {"window": [], "full": []}
        window_attention(q, k, v, args.window), F.scaled_dot_product_attention(q, k, v)  # warm-up
        for _ in range(args.repeats):
            for name, fn in (("window", lambda: window_attention(q, k, v, args.window)),
                             ("full", lambda: F.scaled_dot_product_attention(q, k, v))):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        rows.append({"tokens": n, "window_ms": 1e3 * statistics.median(times["window"]),
                     "full_ms": 1e3 * statistics.median(times["full"])})
    for prev, row in zip(rows, rows[1:]):
        row["window_growth"] = row["window_ms"] / prev["window_ms"]
        row["full_growth"] = row["full_ms"] / prev["full_ms"]
    lines = [f"### band attention, w = {args.window}, {args.heads} heads x {args.head_dim}, {args.dtype}, "
             f"{torch.get_num_threads()} threads", "",
             "| N | window ms | full ms | window growth (N x2) | full growth (N x2) |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['tokens']} | {r['window_ms']:.1f} | {r['full_ms']:.1f} | "
                     f"{r.get('window_growth', float('nan')):.2f} | {r.get('full_growth', float('nan')):.2f} |")
    table = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(table)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
