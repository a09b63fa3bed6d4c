"""The fidelity harness on second-generation scenes (`--scenes v2`): tiny random SD3 and PixArt
folders generate the held-out v2 captions at 128 px, and the report carries the checker v2's
per-kind and per-attribute numbers (near 0 for random weights: the structure is under test)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))

import eval_quality  # noqa: E402
from demo_scenes_v2 import heldout_scenes  # noqa: E402
from scene_checker_v2 import ATTRIBUTES  # noqa: E402
from tiny import tiny_dit_pipeline, tiny_diffusers_vae  # noqa: E402

import dite.engine  # noqa: E402

PROMPTS = 5


class Recorder:
    """A loaded pipeline that keeps the keywords of every call."""

    def __init__(self, pipe):
        self.pipe, self.calls = pipe, []

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        return self.pipe(**kwargs)


@pytest.fixture
def recorded(monkeypatch):
    pipes = []
    load = dite.engine.load

    def recording_load(*args, **kwargs):
        pipes.append(Recorder(load(*args, **kwargs)))
        return pipes[-1]

    monkeypatch.setattr(dite.engine, "load", recording_load)
    return pipes


def sd3_128(sd3, root: Path) -> Path:
    """The shared tiny SD3 with an 8x-down VAE: 128 px -> 16x16 latents, within its position table."""
    from diffusers import StableDiffusion3Pipeline

    reference, _ = sd3
    vae = tiny_diffusers_vae(latent_channels=4, block_out_channels=(8, 8, 16, 16), use_quant_conv=False,
                             use_post_quant_conv=False, down_block_types=("DownEncoderBlock2D",) * 4,
                             up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=1.5305, shift_factor=0.0609)
    StableDiffusion3Pipeline(**{**reference.components, "vae": vae}).save_pretrained(root)
    return root


def pixart_128(root: Path) -> Path:
    from tiny_pixart import tiny_pixart_pipeline

    return tiny_pixart_pipeline(root, vae_levels=4, sample_size=16)[1]


@pytest.mark.parametrize("family", ["sd3", "pixart"])
def test_v2_report_on_held_out_scenes_at_128_px(family, sd3, recorded, tmp_path):
    folder = sd3_128(sd3, tmp_path / "sd3") if family == "sd3" else pixart_128(tmp_path / "pixart")
    out = tmp_path / "q"
    assert eval_quality.main(["--model", str(folder), "--scenes", "v2", "--prompts", str(PROMPTS), "--batch", "3",
                              "--steps", "2", "--accel", "--samples", "--out", str(out),
                              "--record-floors", str(tmp_path / "floors.json")]) == 0
    captions = [sc.caption for sc in heldout_scenes(PROMPTS)]
    calls = recorded[0].calls
    assert [p for call in calls for p in call["prompt"]] == captions
    assert all(call["height"] == call["width"] == 128 for call in calls)
    if family == "pixart":  # the bins of a 4x-down demo would generate at 256 px
        assert all(call["use_resolution_binning"] is False for call in calls)
    report = json.loads(out.with_suffix(".json").read_text())
    assert [s["caption"] for s in report["scenes"]] == captions
    plain = report["rows"][0]
    assert plain["method"] == "plain" and set(eval_quality.V2_COLUMNS) <= set(plain)
    assert set(plain["by_kind"]) == {"all", "single", "relation", "count"}
    assert plain["by_kind"]["all"]["n"] == PROMPTS and 0 <= plain["accuracy"] <= 1
    table = out.with_suffix(".md").read_text()
    assert "held-out v2 scenes" in table and "| " + " | ".join(eval_quality.V2_COLUMNS) + " |" in table
    assert "| kind | n | correct | correct_strict | " + " | ".join(ATTRIBUTES) + " |" in table
    assert Image.open(out.with_name("q-samples.png")).size == (10 * 128, 128)
    floors = json.loads((tmp_path / "floors.json").read_text())[str(folder)]
    assert floors["scenes"] == "v2" and floors["accuracy"] == plain["accuracy"]  # test_demo_fidelity's scenes


def test_v2_scenes_are_the_default_for_the_v2_demo_names():
    assert eval_quality.parse_args(["--model", "demo-pixart"]).scenes == "v2"
    assert eval_quality.parse_args(["--model", "demo-sd3-128"]).scenes == "v2"
    assert eval_quality.parse_args(["--model", "demo-sd3"]).scenes == "v1"
    assert eval_quality.parse_args(["--model", "demo-sd3", "--scenes", "v2"]).scenes == "v2"


def test_v2_scenes_with_a_class_conditional_model_is_one_line(tmp_path, capsys):
    tiny_dit_pipeline(tmp_path / "dit")
    out = tmp_path / "q"
    assert eval_quality.main(["--model", str(tmp_path / "dit"), "--scenes", "v2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--scenes v1" in err and not out.with_suffix(".md").exists()
