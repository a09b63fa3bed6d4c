"""tools/device_check.py --dry-run on the CPU, so that the GPU check never rots: parity rows
for every family and dtype pass, every speed row is there, the table is written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))

import device_check  # noqa: E402


@pytest.mark.slow
def test_dry_run_writes_parity_and_speed_tables(tmp_path):
    assert device_check.main(["--dry-run", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "device-dry-run-cpu.json").read_text())
    assert [(r["family"], r["dtype"]) for r in data["parity"]] == [
        (family, dtype) for family in ("dit", "sd3", "pixart") for dtype in ("float32", "bfloat16")]
    assert all(r["ok"] for r in data["parity"])
    variants = [r["variant"] for r in data["speed"] if r["model"] == "sd3"]
    assert variants[:4] == ["diffusers eager", "dite eager", "dite compiled", "dite eager ditcache+promptgate"]
    # The tuned file's method, made portable: the schedule's 28 steps scaled to the dry run's 10.
    # (every one of the 10 steps runs, so no order-2 step is left: order 1)
    assert variants[4] == "dite eager tuned (schedule(run=0-9,order=1,coord=step))"
    assert {r["model"] for r in data["speed"]} == {"sd3", "pixart"}
    assert all(r["s_per_step"] > 0 and r["peak_gib"] is None for r in data["speed"])
    text = (tmp_path / "device-dry-run-cpu.md").read_text()
    assert "| sd3 | dite compiled |" in text and "## Parity" in text


def test_parity_catches_a_wrong_weight():
    """The parity rows can fail: one dite weight changed after loading makes its row not ok."""
    import torch

    cfg, side = device_check.configs("sd3", full=False)
    ours, reference = device_check.pair("sd3", cfg, torch.device("cpu"), torch.float32)
    x, t, cond, kwargs = device_check.inputs("sd3", cfg, side, torch.device("cpu"), torch.float32, text_tokens=7)
    with torch.no_grad():
        same = (ours(x, t, cond) - reference(x, return_dict=False, **kwargs)[0]).abs().max()
        weight = next(ours.parameters())  # not a uniform shift: the layer norms would remove it
        weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)) * 0.1)
        changed = (ours(x, t, cond) - reference(x, return_dict=False, **kwargs)[0]).abs().max()
    assert same <= 1e-4 < changed


def test_portable_spec_scales_run_and_order_2_steps():
    tuned = {"spec": "schedule(run=0-4.6.8.10.13.17.20.24,blocks=1:12,order=2,coord=step,high=12.16.18.23.25.27)",
             "steps": 28}
    # 28 -> 14 steps: i -> round(i * 13 / 27); order-2 steps that land on a computed step are dropped
    assert device_check.portable_spec(tuned, 14) == "schedule(run=0-6.8.10.12,order=2,coord=step,high=9.11.13)"
