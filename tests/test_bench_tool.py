"""tools/bench.py end to end on a tiny model: rows, ratios, the diffusers row, the files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))

import bench  # noqa: E402
from tiny import tiny_dit_pipeline  # noqa: E402


def test_bench_writes_table_json_and_rows(tmp_path):
    folder = tmp_path / "dit"
    tiny_dit_pipeline(folder, "ddim", num_layers=4)
    out = tmp_path / "result"
    assert bench.main(["--model", str(folder), "--steps", "4", "--repeats", "1", "--class-label", "3",
                       "--accel", "ditcache(start_step=1)", "todo(factor=1)", "--out", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["accel"] for r in rows] == ["none", "ditcache(start_step=1)", "todo(factor=1)", "diffusers"]
    plain, cached, todo1, ref = rows
    assert plain["wall_ratio"] == 1.0 and plain["max_abs_diff"] == 0.0
    assert cached["flops_ratio"] < 1 and cached["block_evaluations"] < plain["block_evaluations"]
    assert todo1["max_abs_diff"] == 0.0  # factor 1 is the plain path
    assert ref["resolved"] == "diffusers, plain" and ref["psnr_db"] is None  # DiTPipeline takes no latents
    assert "| accel |" in out.with_suffix(".md").read_text()
