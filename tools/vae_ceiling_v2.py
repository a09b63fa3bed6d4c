"""The VAE ceiling of the second demos: held-out v2 scenes (tools/demo_scenes_v2.py) through a
VAE (encoder mean -> decoder), read back by tools/scene_checker_v2.py. No denoiser can score
above what its VAE's reconstructions score, so this is the bar to read the demos' accuracy
against.

    python tools/vae_ceiling_v2.py --work .demo_work_v2 --family sd3 pixart --out bench/vae-ceiling-v2
    python tools/vae_ceiling_v2.py --model demo-pixart --out bench/vae-ceiling-pixart

--family reads <work>/vae_<family>/final.pt (tools/train_demo_v2.py's fine-tunes, loaded by
train_demo.load_vae); --model takes the VAE of a pipeline (folder or demo name). Writes
NAME.md (one row per VAE and scene kind: the headline, the strict headline, each attribute,
and the reconstructions' PSNR) and NAME.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

from demo_scenes import to_tensor  # noqa: E402
from demo_scenes_v2 import heldout_samples  # noqa: E402
from scene_checker_v2 import ATTRIBUTES, detect_all, score, summarize  # noqa: E402

from dite.engine.errors import CheckpointError, DiteError  # noqa: E402

COLUMNS = ("n", "correct", "correct_strict") + ATTRIBUTES + ("psnr_db",)


@torch.no_grad()
def reconstruct(vae, images: np.ndarray, batch: int = 25) -> np.ndarray:
    """uint8 [N, H, W, 3] -> the VAE's reconstructions from its encoder means, uint8, in fp32."""
    out = []
    for start in range(0, len(images), batch):
        x = to_tensor(images[start:start + batch])
        y = vae.decode(vae.encode_mean(x)).float()
        out.append(((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def ceiling(vae, images: np.ndarray, scenes, batch: int = 25) -> dict:
    """The checker's summary (scene_checker_v2.summarize) of the reconstructions, with each
    group's PSNR against the rendered images."""
    recon = reconstruct(vae, images, batch)
    summary = summarize([score(detect_all(im), sc) for im, sc in zip(recon, scenes)], scenes)
    for kind, row in summary.items():
        members = [i for i, sc in enumerate(scenes) if kind == "all" or sc.kind == kind]
        row["psnr_db"] = psnr_db(recon[members], images[members]) if members else None
    return summary


def table(results: dict[str, dict], title: str, sources: dict[str, str]) -> str:
    lines = [f"### {title}", "", "VAEs: " + "; ".join(f"{name} = {src}" for name, src in sources.items()), "",
             "| vae | kind | " + " | ".join(COLUMNS) + " |", "|" + "---|" * (len(COLUMNS) + 2)]
    for name, summary in results.items():
        for kind, row in summary.items():
            cells = ["—" if row[c] is None else str(row[c]) if c == "n" else f"{row[c]:.3f}" for c in COLUMNS]
            lines.append(f"| {name} | {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def vaes(args) -> dict[str, object]:
    """name -> VAE in fp32 eval mode; every source checked before any is loaded."""
    finals = {f"vae_{family}": Path(args.work) / f"vae_{family}" / "final.pt" for family in args.family}
    missing = [str(p) for p in finals.values() if not p.is_file()]
    if missing:
        raise CheckpointError(f"no VAE at {', '.join(missing)}: train it (python tools/train_demo_v2.py "
                         "vae --family ...) or point --work at the folder holding vae_<family>/final.pt")
    out = {}
    if args.family:
        import train_demo

        for family in args.family:
            out[f"vae_{family}"] = train_demo.load_vae(SimpleNamespace(work=args.work), family).float()
    for source in args.model:
        from dite.engine import load

        out[source] = load(source, dtype=torch.float32).vae.float().eval()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(Path(__file__).resolve().parents[1] / ".demo_work_v2"))
    p.add_argument("--family", nargs="*", default=[], choices=["sd3", "pixart"])
    p.add_argument("--model", nargs="*", default=[], help="pipelines (folder or demo name) whose VAE to read")
    p.add_argument("--scenes", type=int, default=200, help="held-out scenes (tools/demo_scenes_v2.heldout_scenes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=25)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="bench/vae-ceiling-v2")
    args = p.parse_args(argv)
    if not args.family and not args.model:
        p.error("nothing to measure: give --family sd3 pixart and/or --model FOLDER")
    if args.scenes < 1:
        p.error(f"--scenes {args.scenes}: give at least 1")
    torch.set_num_threads(args.threads)
    try:
        models = vaes(args)
    except DiteError as exc:
        print(f"vae_ceiling_v2: {exc}", file=sys.stderr)
        return 2
    images, scenes = heldout_samples(args.scenes, seed=args.seed)
    results = {name: ceiling(vae, images, scenes, args.batch) for name, vae in models.items()}
    title = f"VAE ceiling: {len(scenes)} held-out v2 scenes (seed {args.seed}) through encoder mean -> decoder"
    sources = {**{f"vae_{f}": str(Path(args.work) / f"vae_{f}" / "final.pt") for f in args.family},
               **{m: m for m in args.model}}
    text = table(results, title, sources)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"title": title, "sources": sources, "results": results}, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
