"""The VAE ceiling tool (tools/vae_ceiling_v2.py): a lossless VAE scores 100 %, a trained-VAE
file in tools/train_demo.py's format is read and reported per kind, a missing one is one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))

import vae_ceiling_v2  # noqa: E402
from demo_scenes_v2 import heldout_samples, heldout_scenes  # noqa: E402

from dite.models.vae import AutoencoderKL, VAEConfig  # noqa: E402


class Lossless(torch.nn.Module):
    """A 'VAE' whose latents are the image: the ceiling measures the checker and the uint8 round trip."""

    def encode_mean(self, x):
        return x * 2.0

    def decode(self, z):
        return z / 2.0


def test_held_out_samples_are_the_held_out_scenes():
    images, scenes = heldout_samples(12, seed=1)
    assert scenes == heldout_scenes(12, seed=1) and images.shape == (12, 128, 128, 3) and images.dtype == np.uint8


def test_a_lossless_vae_reaches_the_checker_s_100_percent():
    images, scenes = heldout_samples(30)
    summary = vae_ceiling_v2.ceiling(Lossless(), images, scenes, batch=7)
    assert summary["all"]["n"] == 30 and summary["all"]["psnr_db"] == float("inf")
    rates = [v for row in summary.values() for k, v in row.items() if k not in ("n", "psnr_db") and v is not None]
    assert rates and all(v == 1.0 for v in rates)


def _write_final(work: Path, family: str) -> None:
    """A random tiny VAE saved as tools/train_demo.py saves a trained one."""
    torch.manual_seed(0)
    cfg = VAEConfig(latent_channels=4, block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4,
                    use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.0, force_upcast=False)
    vae = AutoencoderKL(cfg)
    (work / f"vae_{family}").mkdir(parents=True)
    torch.save({"ema": vae.state_dict(), "config": cfg.__dict__ | {"block_out_channels": list(cfg.block_out_channels)},
                "scaling_factor": 0.5, "shift_factor": 0.1}, work / f"vae_{family}" / "final.pt")


def test_tool_reads_trained_vae_files_and_reports_each_kind(tmp_path):
    _write_final(tmp_path, "pixart")
    out = tmp_path / "ceiling"
    assert vae_ceiling_v2.main(["--work", str(tmp_path), "--family", "pixart", "--scenes", "6", "--out", str(out)]) == 0
    results = json.loads(out.with_suffix(".json").read_text())["results"]
    assert list(results) == ["vae_pixart"] and set(results["vae_pixart"]) == {"all", "single", "relation", "count"}
    row = results["vae_pixart"]["all"]
    assert row["n"] == 6 and 0 <= row["correct"] <= 1 and row["psnr_db"] < 30  # random weights: noise
    assert out.with_suffix(".md").read_text().count("| vae_pixart |") == 4


def test_missing_vae_file_is_one_line(tmp_path, capsys):
    out = tmp_path / "ceiling"
    assert vae_ceiling_v2.main(["--work", str(tmp_path), "--family", "sd3", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "vae_sd3/final.pt" in err and "train" in err
    assert not out.with_suffix(".md").exists()
