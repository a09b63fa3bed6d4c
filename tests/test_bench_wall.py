"""tools/bench_wall.py's stage clock and summary, tools/retune_schedule.py's calibration pick."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))

from bench_wall import StageClock, summarize  # noqa: E402
from retune_schedule import calibration_captions  # noqa: E402


def call(total, blocks, model_step=0.01, compute=1.0):
    return {"encode": 0.005, "decode": 0.01, "blocks": blocks, "model_step": model_step,
            "loop_rest": 0.002, "total": total, "compute": compute}


def test_summary_ratios_are_per_prompt_medians_and_ideal_shrinks_only_the_blocks():
    plain = [call(1.0, 0.9), call(2.0, 1.8), call(1.0, 0.9)]
    cached = [call(0.6, 0.45, compute=0.5), call(1.0, 0.9, compute=0.5), call(0.5, 0.45, compute=0.5)]
    s = summarize(cached, plain)
    assert s["wall_ratio"] == pytest.approx(0.5) and s["block_ratio"] == pytest.approx(0.5)
    # plain medians: total 1.0 s, blocks 0.9 s -> 0.1 s fixed + 0.5 x 0.9 s
    assert s["ideal"] == pytest.approx(0.55) and s["ms"]["total"] == pytest.approx(600.0)


def test_stage_clock_times_the_wrapped_methods_and_removes_itself():
    class Toy(torch.nn.Module):
        def prepare(self, x):
            return x + 1

        def run_blocks(self, x):
            return x * 2

        def finalize(self, x):
            return x - 1

    toy = Toy()
    clock = StageClock(toy)
    assert toy.finalize(toy.run_blocks(toy.prepare(torch.ones(1)))).item() == 3.0
    spent = clock.take()
    assert spent["blocks"] > 0 and spent["model_step"] > 0 and clock.take() == {"blocks": 0.0, "model_step": 0.0}
    clock.close()
    assert "run_blocks" not in vars(toy) and toy.run_blocks(torch.ones(1)).item() == 2.0


def test_retune_calibrates_on_training_captions_only():
    from demo_scenes import all_captions, heldout_scenes

    picked = calibration_captions(16)
    assert len(set(picked)) == 16 and set(picked) <= set(all_captions(False))
    assert not set(picked) & {sc.caption for sc in heldout_scenes(100)}
