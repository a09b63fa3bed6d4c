"""Regression floors on the shipped demo models: the plain model's accuracy on a small seeded
set of held-out prompts stays at the level recorded after training, and each acceleration
method's PSNR against the plain image stays above its recorded floor.

The floors (tests/data/demo_fidelity_floors.json) are written by the harness itself:
    python tools/eval_quality.py --model demo-sd3 --prompts 16 --accel ... --record-floors tests/data/demo_fidelity_floors.json
A failure here means generation changed: a sampler, a model block, a cache or a plan. If the
change is intended (new weights, a fixed bug), re-record and say why in the commit.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import eval_quality  # noqa: E402
import demo_scenes_v2  # noqa: E402
from demo_scenes import heldout_scenes  # noqa: E402

from dite.engine import load  # noqa: E402

FLOORS = json.loads((Path(__file__).parent / "data" / "demo_fidelity_floors.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("model", sorted(FLOORS))
def test_demo_accuracy_and_accel_psnr_floors(model, monkeypatch):
    monkeypatch.chdir(ROOT)  # plan files are recorded relative to the repository
    entry = FLOORS[model]
    args = argparse.Namespace(steps=entry["steps"], guidance=entry["guidance"], seed=entry["seed"],
                              batch=entry["batch"])
    pipe = load(model)
    held_out = demo_scenes_v2.heldout_scenes if entry.get("scenes") == "v2" else heldout_scenes
    scenes = held_out(entry["prompts"], seed=entry["seed"])
    rows, _ = eval_quality.measure(pipe, scenes, args, list(entry["psnr_floor_db"]), fewer_steps=False)
    plain, accelerated = rows[0], rows[1:]
    assert plain["accuracy"] >= entry["accuracy_floor"], (model, plain)
    for r in accelerated:
        floor = entry["psnr_floor_db"][r["method"]]
        assert r["psnr_db"] >= floor, f"{model} {r['method']}: PSNR {r['psnr_db']:.2f} dB < floor {floor:.2f}"
        assert r["flops_ratio"] < 1.0, (model, r["method"], r["flops_ratio"])
