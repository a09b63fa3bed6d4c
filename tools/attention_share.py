"""How much of a model's denoiser FLOPs is attention, and what token-level methods save of it.

    python tools/attention_share.py --model demo-sd3-128 demo-pixart demo-sd3 --steps 4

For each model: image tokens per image, the share of attention's own products (q.k, p.v)
in one plain guided step, and the FLOPs / attention-FLOPs ratios of ToDo (its defaults) and
of window attention in every block at every step after the first (DiTFastAttn's residual
window attention needs one full step for its residual; window 8, through a plan file written
here). With --steps 28 the window row is 27 of 28 steps windowed.
FLOPs are counted on the meta device (out.stats), so this costs seconds, not a generation.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from dite.accel.fastattn import PLAN_FORMAT, model_fingerprint
from dite.engine import load


def window_plan(pipe, steps: int, folder: Path) -> str:
    depth = len(pipe.transformer.blocks)
    path = folder / "window-everywhere.json"
    path.write_text(json.dumps({"format": PLAN_FORMAT, "model_id": model_fingerprint(pipe.transformer),
                                "steps": steps, "window": 8, "threshold": None,
                                "layers": [["full_attn"] + ["residual_window_attn"] * (steps - 1) for _ in range(depth)]}))
    return f"fastattn(plan={path})"


def report(name: str, steps: int) -> dict:
    pipe = load(name)
    call = {"num_inference_steps": steps, "progress": False, "output_type": "latent"}
    if pipe.family == "dit":
        call["class_labels"] = [0]
    else:
        call["prompt"] = "a red circle left of a blue square"
    with tempfile.TemporaryDirectory() as tmp:
        rows = {}
        for label, accel in (("plain", None), ("todo", "todo"), ("window", window_plan(pipe, steps, Path(tmp)))):
            rows[label] = pipe(accel=accel, **call).stats
    plain = rows["plain"]
    cfg = pipe.transformer.config
    side = getattr(cfg, "sample_size", None) or getattr(cfg, "input_size")
    tokens = (side // cfg.patch_size) ** 2
    return {"model": name, "image_tokens": tokens,
            "attention_share": plain["attention_flops"] / plain["denoiser_flops"],
            **{f"{k}_flops_ratio": rows[k]["flops_ratio"] for k in ("todo", "window")},
            **{f"{k}_attention_ratio": rows[k]["attention_flops_ratio"] for k in ("todo", "window")}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=["demo-sd3-128", "demo-pixart", "demo-sd3", "demo-dit"])
    p.add_argument("--steps", type=int, default=28)
    args = p.parse_args(argv)
    rows = [report(m, args.steps) for m in args.model]
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()) + " |")


if __name__ == "__main__":
    main()
