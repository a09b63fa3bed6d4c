"""accel= through the pipelines and the CLI: stats, parity of the plain path, errors."""

from __future__ import annotations

import json

import pytest
import torch

from dite.accel import DiTCache, ToDo
from dite.engine import load
from dite.engine.cli import main
from dite.engine.errors import ConfigError
from tiny import tiny_dit_pipeline


@pytest.fixture(scope="module")
def dit_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dit-accel")
    tiny_dit_pipeline(folder, "ddim", num_layers=6)
    return folder


@pytest.fixture(scope="module")
def dit_pipe(dit_folder):
    return load(dit_folder)


def run(pipe, **kw):
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    return pipe(class_labels=[3], num_inference_steps=10, output_type="np", latents=latents, progress=False, **kw)


def test_plain_call_is_unchanged_and_counted(dit_pipe):
    plain, none = run(dit_pipe), run(dit_pipe, accel="none")
    assert (plain.images == none.images).all()
    s = plain.stats
    assert s["accel"] == "none" and s["flops_ratio"] == 1.0
    assert s["block_evaluations"] == s["plain_block_evaluations"] == 10 * 2 * 6
    assert len(s["steps"]) == 10 and s["steps"][0] == {"step": 0, "rows": 2, "cfg": True, "blocks": 6}


def test_accelerated_call_reports_what_it_saved(dit_pipe):
    out = run(dit_pipe, accel="ditcache+promptgate+todo")
    s = out.stats
    assert s["accel"] == "ditcache(blocks=1:5,start_step=4,stride=2)+promptgate(step=7)+todo(factor=1.6,blocks=0:3,mode=bilinear)"
    # ditcache: record 3, 5, 7, 9; reuse 4, 6, 8 (2 of 6 blocks run); gate from step 7 on.
    rows = [2] * 7 + [1] * 3
    blocks = [6, 6, 6, 6, 2, 6, 2, 6, 2, 6]
    assert [st["rows"] for st in s["steps"]] == rows and [st["blocks"] for st in s["steps"]] == blocks
    assert s["block_evaluations"] == sum(r * b for r, b in zip(rows, blocks))
    assert 0 < s["flops_ratio"] < s["block_evaluations"] / s["plain_block_evaluations"] + 0.05
    assert out.parameters[0]["accel"] == s["accel"]
    assert out.images.shape == (1, 16, 16, 3)


def test_method_objects_equal_the_spec(dit_pipe):
    a = run(dit_pipe, accel=[DiTCache(start_step=5), ToDo(factor=2)])
    b = run(dit_pipe, accel="ditcache(start_step=5)+todo(factor=2)")
    assert (a.images == b.images).all() and a.stats["accel"] == b.stats["accel"]


def test_bad_accel_is_a_clear_error(dit_pipe):
    with pytest.raises(ConfigError, match="guidance_scale <= 1"):
        run(dit_pipe, accel="promptgate", guidance_scale=1.0)
    with pytest.raises(ConfigError, match="not a range inside the model's 6 blocks"):
        run(dit_pipe, accel="ditcache(blocks=1:9)")


def test_sd3_pipeline_takes_accel(sd3):
    _, folder = sd3
    pipe = load(folder)
    kw = dict(prompt="a red circle", num_inference_steps=6, height=32, width=32, output_type="np", progress=False)
    plain = pipe(**kw)
    gated = pipe(accel="ditcache(blocks=0:2,start_step=2)+promptgate(step=4)", **kw)
    assert [s["rows"] for s in gated.stats["steps"]] == [2, 2, 2, 2, 1, 1]
    assert gated.stats["flops_ratio"] < 1 and gated.images.shape == plain.images.shape


def test_cli_accel_flag_and_listing(dit_folder, tmp_path, capsys):
    code = main(["generate", "--model", str(dit_folder), "--class-label", "3", "--steps", "4", "--quiet",
                 "--accel", "ditcache(start_step=2)", "-o", str(tmp_path / "x.png")])
    assert code == 0
    err = capsys.readouterr().err
    assert "accel ditcache(blocks=1:5,start_step=2,stride=2)" in err and "of plain" in err
    assert main(["accel", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert {m["name"] for m in listing} == {"ditcache", "deltacache", "adaptive", "schedule", "promptgate", "todo", "fastattn", "tuned"}
    assert listing[0]["defaults"]["sd3"] == "ditcache(blocks=1:21,start_step=10,stride=2)"
    assert main(["generate", "--model", str(dit_folder), "--class-label", "3", "--accel", "warp"]) == 2
    assert "unknown accel method 'warp'" in capsys.readouterr().err
