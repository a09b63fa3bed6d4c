"""tools/bench_peers.py: the cache-dit spec parser, the block-counting hooks, the fewer-steps
list and the image metrics (no model runs); and one end-to-end run on the demo SD3."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))

import bench_peers  # noqa: E402
from bench_peers import BlockCounter, fewer_steps_list, parse_cachedit_spec  # noqa: E402


def test_cachedit_spec_parser():
    s = parse_cachedit_spec("F4B0:0.12:taylor1")
    assert (s.fn, s.bn, s.threshold, s.taylor_order) == (4, 0, 0.12, 1)
    assert s.max_warmup_steps is s.max_cached_steps is s.max_continuous_cached_steps is None
    s = parse_cachedit_spec("F1B0:0.08:none")
    assert (s.fn, s.bn, s.threshold, s.taylor_order) == (1, 0, 0.08, None)
    s = parse_cachedit_spec("f2b3:0.2:TaylorSeer2:W4:M10:MC3")
    assert (s.fn, s.bn, s.taylor_order) == (2, 3, 2)
    assert (s.max_warmup_steps, s.max_cached_steps, s.max_continuous_cached_steps) == (4, 10, 3)
    assert s.text == "f2b3:0.2:TaylorSeer2:W4:M10:MC3"
    for bad in ("F1B0:0.1", "F0B0:0.1:none", "X1:0.1:none", "F1B0:abc:none", "F1B0:0.1:foo", "F1B0:-1:none",
                "F1B0:0.1:none:Z3"):
        with pytest.raises(ValueError):
            parse_cachedit_spec(bad)


def test_cachedit_configs_keep_cachedits_defaults():
    pytest.importorskip("cache_dit")
    cache, calib = bench_peers.cachedit_configs(parse_cachedit_spec("F1B0:0.08:taylor1"), "sd3")
    assert (cache.Fn_compute_blocks, cache.Bn_compute_blocks, cache.residual_diff_threshold) == (1, 0, 0.08)
    assert (cache.max_warmup_steps, cache.max_cached_steps, cache.max_continuous_cached_steps) == (8, -1, -1)
    assert calib.taylorseer_order == 1 and calib.enable_calibrator and not calib.enable_encoder_calibrator
    _, calib = bench_peers.cachedit_configs(parse_cachedit_spec("F1B2:0.08:taylor2"), "sd3")
    assert calib.enable_encoder_calibrator and calib.taylorseer_order == 2
    cache, calib = bench_peers.cachedit_configs(parse_cachedit_spec("F1B0:0.08:none:W4:MC2"), "dit")
    assert calib is None and (cache.max_warmup_steps, cache.max_continuous_cached_steps) == (4, 2)


@dataclasses.dataclass
class Hidden:  # the shape of dite's block input: an object holding the image tokens
    image: torch.Tensor
    c: torch.Tensor


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x, extra=None):
        if isinstance(x, Hidden):
            return Hidden(self.lin(x.image), x.c)
        return self.lin(x)


def test_block_counter_adds_batch_rows_of_each_block_call():
    blocks = torch.nn.ModuleList(Toy() for _ in range(3))
    counter = BlockCounter(blocks)
    x = torch.randn(2, 5, 4)
    for b in blocks:  # all blocks, batch 2
        x = b(x)
    blocks[0](torch.randn(1, 5, 4))  # one block, batch 1 (a cached step)
    assert counter.rows == 3 * 2 + 1 and counter.calls == 4 and counter.per_block == [3, 2, 2]
    assert counter.take() == 7 and counter.rows == 0
    blocks[1](x=torch.randn(4, 5, 4))  # keyword input
    h = Hidden(torch.randn(3, 5, 4), torch.randn(3, 4))  # dite-style input object
    blocks[2](h)
    assert counter.take() == 4 + 3
    counter.remove()
    blocks[0](torch.randn(2, 5, 4))
    assert counter.rows == 0


def test_fewer_steps_list_scales_to_the_step_count():
    assert fewer_steps_list(28) == [14, 17, 19, 21, 24]
    assert fewer_steps_list(50) == [25, 30, 34, 38, 43]
    assert fewer_steps_list(4) == [2, 3]
    assert fewer_steps_list(1) == []
    assert fewer_steps_list(20, [5, 10, 10, 25], base=None) == [5, 10, 19]


def test_image_metrics():
    rng = np.random.default_rng(0)
    a = rng.random((16, 16, 3)).astype(np.float32)
    assert bench_peers.ssim(a, a) == pytest.approx(1.0)
    b = np.clip(a + 0.05 * rng.standard_normal(a.shape).astype(np.float32), 0, 1)
    assert 0 < bench_peers.ssim(a, b) < 1
    assert math.isinf(bench_peers.psnr(a, a)) and 20 < bench_peers.psnr(a, b) < 40
    assert math.isinf(bench_peers.mean_psnr([float("inf")] * 2))
    assert bench_peers.mean_psnr([float("inf"), 40.0]) == pytest.approx((bench_peers.PSNR_CAP_DB + 40) / 2)


@pytest.mark.slow
def test_end_to_end_demo_sd3(tmp_path):
    pytest.importorskip("diffusers")
    pytest.importorskip("cache_dit")
    out = tmp_path / "peers"
    assert bench_peers.main(["--model", "demo-sd3", "--prompts", "1", "--steps", "4", "--dite", "ditcache",
                             "--cachedit", "F1B0:0.5:taylor1:W1", "--out", str(out)]) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    rows = {(r["library"], r["setting"]): r for r in data["rows"]}
    assert data["meta"]["parity_max_abs_diff"] < 1e-3  # plain diffusers = plain dite on the same latents
    for key in (("dite", "plain"), ("cache-dit", "plain (diffusers)")):
        assert rows[key]["compute"] == 1 and math.isinf(rows[key]["psnr_db"])
    assert rows["dite", "fewer steps (2)"]["compute"] == pytest.approx(0.5)
    assert rows["dite", "fewer steps (3)"]["compute"] == pytest.approx(0.75)
    assert rows["dite", "ditcache"]["compute"] == pytest.approx(rows["dite", "ditcache"]["stats_compute"])
    cached = rows["cache-dit", "F1B0:0.5:taylor1:W1"]
    assert 0 < cached["compute"] <= 1 and cached["cachedit"]["cache_config"]["max_warmup_steps"] == 1
    md = out.with_suffix(".md").read_text()
    assert "tools/bench_peers.py" in md and "load average" in md
    assert out.with_suffix(".png").is_file()


def test_end_to_end_demo_pixart_on_v2_scenes(tmp_path):
    """A PixArt folder runs in diffusers' PixArtAlphaPipeline (no resolution binning, as its
    folder says) on the second demo scenes' captions, equal to dite's plain image."""
    pytest.importorskip("diffusers")
    pytest.importorskip("cache_dit")
    from demo_scenes_v2 import heldout_scenes

    out = tmp_path / "peers"
    assert bench_peers.main(["--model", "demo-pixart", "--prompts", "1", "--steps", "4", "--dite", "adaptive",
                             "--cachedit", "F1B0:0.5:taylor1:W1", "--fewer", "2", "--out", str(out)]) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["meta"]["family"] == "pixart"
    assert data["meta"]["prompts"] == [heldout_scenes(1)[0].caption]
    assert data["meta"]["parity_max_abs_diff"] < 1e-3
    rows = {(r["library"], r["setting"]): r for r in data["rows"]}
    assert 0 < rows["cache-dit", "F1B0:0.5:taylor1:W1"]["compute"] <= 1


def test_a_folder_without_model_index_exits_with_one_line(tmp_path):
    with pytest.raises(SystemExit, match="no model_index.json"):
        bench_peers.model_folder(str(tmp_path))
