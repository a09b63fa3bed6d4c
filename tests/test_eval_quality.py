"""The fidelity harness: the scene checker reads ground truth perfectly, and the harness
runs end to end with its fewer-steps baseline rows."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))

import eval_quality  # noqa: E402
from demo_scenes import sample_scenes  # noqa: E402
from scene_checker import detect, score  # noqa: E402
from tiny import tiny_dit_pipeline  # noqa: E402


def test_checker_reads_rendered_scenes():
    images, scenes = sample_scenes(11, 300)
    checks = [score(detect(im), sc.attributes) for im, sc in zip(images, scenes)]
    for key in ("colour", "shape", "position", "size"):
        assert np.mean([c[key] for c in checks]) >= 0.99, key


def test_checker_finds_nothing_in_a_blank_image():
    blank = np.full((64, 64, 3), 238, dtype=np.uint8)
    found = detect(blank)
    assert not found.found and not any(score(found, sample_scenes(0, 1)[1][0].attributes).values())


def test_harness_rows_and_fewer_steps_baseline(tmp_path):
    folder = tmp_path / "dit"
    tiny_dit_pipeline(folder, "ddim", num_layers=4)
    out = tmp_path / "q"
    assert eval_quality.main(["--model", str(folder), "--prompts", "4", "--batch", "4", "--steps", "6",
                              "--accel", "ditcache(start_step=2)", "--out", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    methods = [r["method"] for r in rows]
    assert methods[0] == "plain" and methods[1] == "ditcache(start_step=2)"
    cached = rows[1]
    fewer = [r for r in rows if r["method"].startswith("fewer steps")]
    assert len(fewer) == 1 and fewer[0]["steps"] == round(6 * cached["flops_ratio"])
    assert fewer[0]["flops_ratio"] == fewer[0]["steps"] / 6
    assert rows[0]["psnr_db"] == float("inf") and 0 <= cached["accuracy"] <= 1
