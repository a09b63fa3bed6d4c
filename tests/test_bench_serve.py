"""tools/bench_serve.py, bounded: every request answered once with its own images, both modes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="dite serve needs the serve extra (fastapi, uvicorn)")
sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))

import bench_serve  # noqa: E402


def test_load_test_loses_and_duplicates_nothing(tmp_path):
    out = tmp_path / "serve"
    assert bench_serve.main(["--requests", "16", "--clients", "4", "--steps", "2", "--max-batch", "4",
                             "--batch-wait-ms", "50", "--out", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["mode"] for r in rows] == ["batching", "no batching"]
    for row in rows:
        assert (row["requests"], row["ok"], row["lost"], row["duplicated"], row["failed"]) == (16, 16, 0, 0, 0)
        assert 0 < row["p50_s"] <= row["p95_s"] and row["images_per_s"] > 0
    batching, alone = rows
    assert batching["mean_batch_images"] > 1 and alone["mean_batch_images"] == 1
    assert alone["max_diff_vs_first_mode"] <= 1  # the same images, to README's 1/255
    assert "| batching | 16 | 16 | 0 | 0 |" in out.with_suffix(".md").read_text()


def test_check_counts_lost_and_duplicated():
    bodies = [{"prompt": "a", "seed": 1}, {"prompt": "b", "seed": 2}, {"prompt": "c", "seed": 3}]

    def answer(prompt, seed):
        return {"data": [{"seed": seed}], "dite": {"parameters": [{"prompt": prompt}]}}

    run = {"answers": {0: [answer("a", 1), answer("a", 1)], 2: [answer("b", 3)]}}
    # request 1 never answered; request 0 answered twice; request 2 got another prompt's image
    assert bench_serve.check(run, bodies) == {"lost": 1, "duplicated": 2}
