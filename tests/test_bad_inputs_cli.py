"""Bad input on the command line: each is refused with exit code 2 and one line on stderr
that names the problem, with no traceback, no output file, and (where it can be told without
the model) before anything is loaded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dite.engine import cli
from dite.engine.cli import main
from dite.engine.errors import DiteError
from dite.engine.loading.loader import demo_folder
from tiny import dit_to_original, tiny_dit_pipeline


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    """A tiny diffusers DiT folder and the same transformer as an original .pt."""
    root = tmp_path_factory.mktemp("bad-inputs")
    reference = tiny_dit_pipeline(root / "dit", "ddim")
    torch.save(dit_to_original(reference.transformer.state_dict(), 3), root / "DiT-tiny.pt")
    return root


@pytest.fixture
def tmp(tmp_path):
    """The output folder of a case, with the obstacles some cases point at."""
    (tmp_path / "a-folder").mkdir()
    (tmp_path / "two-1-1.png").mkdir()  # where the second of two images (seeds 0, 1) would go
    (tmp_path / "file.txt").write_text("not a folder")
    (tmp_path / "broken.json").write_text("{not json")
    return tmp_path


def written_images(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and p.suffix in (".png", ".jpg", ".webp", ".pt")]


def one_line_error(capsys, *expected: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("dite: error: "), err
    assert "\n" not in err and "Traceback" not in err, err
    for text in expected:
        assert text in err, f"{text!r} not in {err!r}"
    return err


@pytest.fixture
def no_load(monkeypatch):
    """Loading a model fails the test: these inputs must be refused before."""
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("dite.engine.loading.loader.load", load)


GEN = ["generate", "--model", "{dit}/dit", "--quiet", "--steps", "2"]
SD3 = ["generate", "--model", "demo-sd3", "--quiet", "--steps", "2"]

# (argv, what the message must name). Refused before the model is loaded.
BEFORE_LOADING = {
    # output paths
    "gif": (GEN + ["--class-label", "1", "-o", "{tmp}/out.gif"], ["out.gif", ".png", ".jpg", ".webp"]),
    "tiff": (GEN + ["--class-label", "1", "-o", "{tmp}/out.tiff"], ["out.tiff", ".png"]),
    "output-is-folder": (GEN + ["--class-label", "1", "-o", "{tmp}/a-folder"], ["a-folder", "is a folder"]),
    "output-trailing-slash": (GEN + ["--class-label", "1", "-o", "{tmp}/new/"], ["is a folder"]),
    "missing-folder": (GEN + ["--class-label", "1", "-o", "{tmp}/missing/out.png"], ["missing", "does not exist"]),
    "parent-is-file": (GEN + ["--class-label", "1", "-o", "{tmp}/file.txt/out.png"], ["file.txt", "not a folder"]),
    "unwritable": (GEN + ["--class-label", "1", "-o", "/proc/dite-out.png"], ["/proc", "cannot write"]),
    "empty-output": (GEN + ["--class-label", "1", "-o", ""], ["--output is empty"]),
    "second-image-is-folder": (GEN + ["--class-label", "1", "--class-label", "2", "-o", "{tmp}/two.png"],
                               ["two-1-1.png", "is a folder"]),
    # sizes
    "size-zero": (GEN + ["--class-label", "1", "--size", "0x16"], ["--size", "between 1 and"]),
    "size-negative": (GEN + ["--class-label", "1", "--size=-16x16"], ["--size", "between 1 and"]),
    "size-no-x": (GEN + ["--class-label", "1", "--size", "16"], ["--size", "256x256"]),
    "size-words": (GEN + ["--class-label", "1", "--size", "axb"], ["--size", "256x256"]),
    "size-huge": (GEN + ["--class-label", "1", "--size", "99999x16"], ["--size", "16384"]),
    # steps
    "steps-zero": (GEN + ["--class-label", "1", "--steps", "0"], ["--steps", "between 1 and 1000"]),
    "steps-negative": (GEN + ["--class-label", "1", "--steps", "-5"], ["--steps", "between 1 and 1000"]),
    "steps-absurd": (GEN + ["--class-label", "1", "--steps", "100000"], ["--steps", "between 1 and 1000"]),
    "steps-word": (GEN + ["--class-label", "1", "--steps", "abc"], ["--steps", "'abc'"]),
    "steps-fraction": (GEN + ["--class-label", "1", "--steps", "2.5"], ["--steps", "'2.5'"]),
    # seeds
    "seed-negative": (GEN + ["--class-label", "1", "--seed", "-2"], ["--seed", "between -1 and"]),
    "seed-word": (GEN + ["--class-label", "1", "--seed", "abc"], ["--seed", "'abc'"]),
    "seed-2**64": (GEN + ["--class-label", "1", "--seed", str(2**64)], ["--seed", str(2**64)]),
    "seed-overflows-with-k": (GEN + ["--class-label", "1", "--class-label", "2", "--seed", str(2**64 - 1)],
                              ["--seed", "seed + k"]),
    # guidance and other numbers
    "guidance-nan": (GEN + ["--class-label", "1", "--guidance", "nan"], ["--guidance", "finite"]),
    "guidance-inf": (GEN + ["--class-label", "1", "--guidance", "inf"], ["--guidance", "finite"]),
    "guidance-word": (GEN + ["--class-label", "1", "--guidance", "high"], ["--guidance", "'high'"]),
    "images-per-prompt-zero": (SD3 + ["a cat", "--images-per-prompt", "0"], ["--images-per-prompt"]),
    "max-sequence-length-zero": (SD3 + ["a cat", "--max-sequence-length", "0"], ["--max-sequence-length"]),
    # schedulers, dtypes, devices, executors
    "scheduler-unknown": (GEN + ["--class-label", "1", "--scheduler", "karras"], ["'karras'", "ddim"]),
    "scheduler-empty": (GEN + ["--class-label", "1", "--scheduler", ""], ["--scheduler ''"]),
    "scheduler-case": (GEN + ["--class-label", "1", "--scheduler", "DDIM"], ["'DDIM'"]),
    "dtype-unknown": (GEN + ["--class-label", "1", "--dtype", "fp8"], ["dtype 'fp8'"]),
    "dtype-int": (GEN + ["--class-label", "1", "--dtype", "int8"], ["dtype 'int8'"]),
    "device-unknown": (GEN + ["--class-label", "1", "--device", "tpu"], ["device 'tpu'"]),
    "device-cuda-without-gpu": pytest.param(GEN + ["--class-label", "1", "--device", "cuda"], ["cuda"],
                                            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has CUDA")),
    "executor-option-mismatch": (GEN + ["--class-label", "1", "--compile-mode", "max-autotune"],
                                 ["--compile-mode", "--executor compiled"]),
    "executor-unknown": (GEN + ["--class-label", "1", "--executor", "tensorrt"], ["--executor", "'tensorrt'"]),
    # accel specs
    "accel-unknown": (GEN + ["--class-label", "1", "--accel", "turbo"], ["'turbo'", "ditcache"]),
    "accel-bad-value": (GEN + ["--class-label", "1", "--accel", "ditcache(stride=two)"], ["stride", "'two'"]),
    "accel-unknown-parameter": (GEN + ["--class-label", "1", "--accel", "ditcache(speed=2)"], ["'speed'"]),
    "accel-unbalanced": (GEN + ["--class-label", "1", "--accel", "ditcache(stride=2"], ["unbalanced"]),
    "accel-nan": (GEN + ["--class-label", "1", "--accel", "todo(factor=nan)"], ["factor=nan", "finite"]),
    "accel-empty-method": (GEN + ["--class-label", "1", "--accel", "ditcache+"], ["empty method"]),
    # prompts and class labels
    "class-label-on-text-model": (SD3 + ["--class-label", "3"], ["text-to-image", "--class-label"]),
    "prompt-on-dit": (GEN + ["a cat"], ["class-conditional DiT", "not a prompt"]),
    "prompt-and-label": (GEN + ["a cat", "--class-label", "1"], ["not both"]),
    "nothing-to-generate": (GEN, ["--class-label ID"]),
    "negative-prompt-on-dit": (GEN + ["--class-label", "1", "--negative-prompt", "blur"], ["--negative-prompt"]),
    "images-per-prompt-on-dit": (GEN + ["--class-label", "1", "--images-per-prompt", "2"],
                                 ["--images-per-prompt"]),
    "no-t5-on-dit": (GEN + ["--class-label", "1", "--no-t5"], ["--no-t5"]),
    "negative-label": (GEN + ["--class-label", "-1"], ["-1", "negative"]),
    # --model-config and paths
    "model-config-list": (GEN + ["--class-label", "1", "--model-config", "[1]"], ["--model-config", "JSON object"]),
    "model-config-broken": (GEN + ["--class-label", "1", "--model-config", "{{heads: 2}}"],
                            ["--model-config", "not valid JSON"]),
    "model-config-no-file": (GEN + ["--class-label", "1", "--model-config", "{tmp}/nowhere.json"],
                             ["--model-config", "no such file"]),
    "model-config-bad-file": (GEN + ["--class-label", "1", "--model-config", "{tmp}/broken.json"],
                              ["broken.json", "not valid JSON"]),
    "model-config-empty": (GEN + ["--class-label", "1", "--model-config", " "], ["--model-config is empty"]),
    "model-missing": (["generate", "--model", "/nowhere/model", "--class-label", "1"], ["/nowhere/model"]),
    "vae-missing": (GEN + ["--class-label", "1", "--vae", "/nowhere/vae"], ["--vae", "/nowhere/vae"]),
    "tokenizers-missing": (SD3 + ["a cat", "--tokenizers", "./no/tokenizers"], ["--tokenizers"]),
    # calibrate
    "calibrate-threshold-nan": (["calibrate", "--model", "{dit}/dit", "--steps", "3", "--window", "2",
                                 "--threshold", "nan", "-o", "{tmp}/p.json"], ["--threshold", "finite"]),
    "calibrate-threshold-negative": (["calibrate", "--model", "{dit}/dit", "--steps", "3", "--window", "2",
                                      "--threshold", "-0.1", "-o", "{tmp}/p.json"], ["--threshold"]),
    "calibrate-window-negative": (["calibrate", "--model", "{dit}/dit", "--steps", "3", "--window", "-1",
                                   "-o", "{tmp}/p.json"], ["--window"]),
    "calibrate-calib-zero": (["calibrate", "--model", "{dit}/dit", "--steps", "3", "--window", "2", "--calib", "0",
                              "-o", "{tmp}/p.json"], ["--calib"]),
    "calibrate-metric": (["calibrate", "--model", "{dit}/dit", "--steps", "3", "--window", "2", "--metric", "l2",
                          "-o", "{tmp}/p.json"], ["--metric", "'l2'"]),
    "calibrate-signatures-zero": (["calibrate", "--model", "{dit}/dit", "--steps", "3", "--window", "2",
                                   "--max-signatures", "0", "-o", "{tmp}/p.json"], ["--max-signatures"]),
    "calibrate-steps-absurd": (["calibrate", "--model", "{dit}/dit", "--steps", "5000", "--window", "2",
                                "-o", "{tmp}/p.json"], ["--steps"]),
    "calibrate-prompt-on-dit": (["calibrate", "--model", "{dit}/dit", "--steps", "3", "--window", "2",
                                 "--prompt", "a cat", "-o", "{tmp}/p.json"], ["class-conditional DiT"]),
    "calibrate-label-on-text": (["calibrate", "--model", "demo-sd3", "--steps", "3", "--window", "2",
                                 "--class-label", "3", "-o", "{tmp}/p.json"], ["text-to-image"]),
    "calibrate-missing-folder": (["calibrate", "--model", "{dit}/dit", "--steps", "3", "--window", "2",
                                  "-o", "{tmp}/missing/p.json"], ["missing", "does not exist"]),
    "calibrate-output-is-folder": (["calibrate", "--model", "{dit}/dit", "--steps", "3", "--window", "2",
                                    "-o", "{tmp}/a-folder"], ["a-folder", "is a folder"]),
}


@pytest.mark.parametrize("argv, expected", list(BEFORE_LOADING.values()), ids=list(BEFORE_LOADING))
def test_refused_before_loading(dit, tmp, argv, expected, no_load, capsys):
    argv = [a.format(dit=dit, tmp=tmp) for a in argv]
    assert main(argv) == 2
    one_line_error(capsys, *expected)
    assert written_images(tmp) == [] and not (tmp / "p.json").exists()


# Refused after loading the model (they depend on it), before generating anything.
AFTER_LOADING = {
    "label-out-of-range": (["--class-label", "5000"], ["class label 5000", "out of range"]),
    "label-unknown-name": (["--class-label", "zebra"], ["'zebra'"]),
    "size-not-multiple": (["--class-label", "1", "--size", "18x16"], ["width 18", "multiple of 4"]),
    "size-beyond-memory": (["--class-label", "1", "--size", "8192x8192"], ["8192x8192", "GiB", "--size"]),
    "accel-stride-one": (["--class-label", "1", "--accel", "ditcache(stride=1)"], ["stride=1"]),
    "accel-plan-missing": (["--class-label", "1", "--accel", "fastattn(plan={tmp}/no-plan.json)"],
                           ["no-plan.json", "does not exist"]),
    "model-config-on-folder": (["--class-label", "1", "--model-config", '{{"num_heads": 2}}'],
                               ["model_config", "num_heads"]),
}


@pytest.mark.parametrize("extra, expected", list(AFTER_LOADING.values()), ids=list(AFTER_LOADING))
def test_refused_before_generating(dit, tmp, extra, expected, capsys):
    argv = [a.format(dit=dit, tmp=tmp) for a in GEN + ["-o", "{tmp}/out.png"] + extra]
    assert main(argv) == 2
    one_line_error(capsys, *expected)
    assert written_images(tmp) == []


def test_memory_estimate_refuses_what_ram_cannot_hold(dit, tmp, monkeypatch, capsys):
    monkeypatch.setattr(cli, "available_memory", lambda: 1024)
    argv = [a.format(dit=dit) for a in GEN] + ["--class-label", "1", "-o", str(tmp / "out.png")]
    assert main(argv) == 2
    one_line_error(capsys, "16x16", "0.0 GiB of RAM is available")
    assert written_images(tmp) == []


def test_steps_beyond_the_schedulers_training_steps(dit, tmp, capsys):
    folder = corrupt(dit / "dit", tmp, "scheduler/scheduler_config.json", lambda c: {**c, "num_train_timesteps": 100})
    assert main(["generate", "--model", str(folder), "--class-label", "1", "--steps", "200", "-o",
                 str(tmp / "out.png")]) == 2
    one_line_error(capsys, "--steps 200", "100 training timesteps")


@pytest.mark.parametrize("argv, expected", [
    (["--model-config", '{{"num_heads": 0}}'], ["num_heads must be a positive integer, got 0"]),
    (["--model-config", '{{"num_heads": "two"}}'], ["num_heads", '"two" (a string)']),
    (["--model-config", '{{"depth": 3}}'], ["depth", "only num_heads"]),
], ids=["heads-zero", "heads-string", "unknown-key"])
def test_model_config_values_of_an_original_file(dit, tmp, argv, expected, capsys):
    argv = ["generate", "--model", str(dit / "DiT-tiny.pt"), "--vae", str(dit / "dit" / "vae"), "--class-label", "1",
            "-o", str(tmp / "out.png"), *[a.format() for a in argv]]
    assert main(argv) == 2
    one_line_error(capsys, *expected)


def test_position_table_of_sd3(tmp, capsys):
    assert main(SD3 + ["a cat", "--size", "4096x4096", "-o", str(tmp / "out.png")]) == 2
    one_line_error(capsys, "4096x4096", "position table")
    assert written_images(tmp) == []


# ---------------------------------------------------------------- malformed config files


def corrupt(folder: Path, tmp: Path, relative: str, change) -> Path:
    """A copy of `folder` whose `relative` JSON file is `change(config)` (a dict -> any JSON
    value) or, for a str `change`, that text."""
    copy = tmp / f"copy-{folder.name}"
    shutil.copytree(folder, copy)
    path = copy / relative
    if isinstance(change, str):
        path.write_text(change)
    else:
        path.write_text(json.dumps(change(json.loads(path.read_text()))))
    return copy


def with_(**fields):
    return lambda config: {**config, **fields}


def without(name):
    return lambda config: {k: v for k, v in config.items() if k != name}


NAN = float("nan")

# (file, change, what the message names besides the file)
DIT_CONFIGS = {
    "index-list": ("model_index.json", lambda c: [c], ["not a list"]),
    "index-invalid-json": ("model_index.json", '{"_class_name": "DiTPipeline",', ["not valid JSON"]),
    "index-no-class": ("model_index.json", without("_class_name"), ["'_class_name'", "required"]),
    "index-unknown-class": ("model_index.json", with_(_class_name="FluxPipeline"), ["FluxPipeline"]),
    "index-class-number": ("model_index.json", with_(_class_name=7), ["_class_name"]),
    "index-defaults-string": ("model_index.json", with_(_dite={"num_inference_steps": "50"}),
                              ["num_inference_steps", '"50"']),
    "index-labels-list": ("model_index.json", with_(id2label=["tench"]), ["id2label"]),
    "transformer-list": ("transformer/config.json", lambda c: [c], ["not a list"]),
    "transformer-invalid-json": ("transformer/config.json", "{]", ["not valid JSON"]),
    "transformer-layers-string": ("transformer/config.json", with_(num_layers="3"), ["num_layers", '"3"']),
    "transformer-layers-negative": ("transformer/config.json", with_(num_layers=-3), ["num_layers", "-3"]),
    "transformer-heads-zero": ("transformer/config.json", with_(num_attention_heads=0),
                               ["num_attention_heads", "got 0"]),
    "transformer-width-fraction": ("transformer/config.json", with_(attention_head_dim=2.5),
                                   ["attention_head_dim", "2.5"]),
    "transformer-eps-nan": ("transformer/config.json", with_(norm_eps=NAN), ["norm_eps", "NaN"]),
    "transformer-classes-bool": ("transformer/config.json", with_(num_embeds_ada_norm=True),
                                 ["num_embeds_ada_norm", "boolean"]),
    "vae-list": ("vae/config.json", lambda c: [c], ["not a list"]),
    "vae-channels-empty": ("vae/config.json", with_(block_out_channels=[]), ["block_out_channels"]),
    "vae-scale-nan": ("vae/config.json", with_(scaling_factor=NAN), ["scaling_factor", "NaN"]),
    "vae-latents-string": ("vae/config.json", with_(latent_channels="4"), ["latent_channels", '"4"']),
    "scheduler-list": ("scheduler/scheduler_config.json", lambda c: [c], ["not a list"]),
    "scheduler-no-class": ("scheduler/scheduler_config.json", without("_class_name"), ["'_class_name'"]),
    "scheduler-unknown-class": ("scheduler/scheduler_config.json", with_(_class_name="LCMScheduler"),
                                ["LCMScheduler"]),
    "scheduler-steps-string": ("scheduler/scheduler_config.json", with_(num_train_timesteps="1000"),
                               ["num_train_timesteps", '"1000"']),
    "scheduler-steps-zero": ("scheduler/scheduler_config.json", with_(num_train_timesteps=0),
                             ["num_train_timesteps", "got 0"]),
    "scheduler-beta-nan": ("scheduler/scheduler_config.json", with_(beta_end=NAN), ["beta_end", "NaN"]),
    "scheduler-flag-string": ("scheduler/scheduler_config.json", with_(clip_sample="no"), ["clip_sample", '"no"']),
}


@pytest.mark.parametrize("relative, change, expected", list(DIT_CONFIGS.values()), ids=list(DIT_CONFIGS))
def test_malformed_config_in_generate(dit, tmp, relative, change, expected, capsys):
    folder = corrupt(dit / "dit", tmp, relative, change)
    out = tmp / "out"
    out.mkdir()
    assert main(["generate", "--model", str(folder), "--class-label", "1", "--steps", "2", "--quiet",
                 "-o", str(out / "x.png")]) == 2
    one_line_error(capsys, str(folder / relative), *expected)
    assert written_images(out) == []


@pytest.mark.parametrize("relative, change, expected", list(DIT_CONFIGS.values()), ids=list(DIT_CONFIGS))
def test_malformed_config_in_convert(dit, tmp, relative, change, expected, capsys):
    folder = corrupt(dit / "dit", tmp, relative, change)
    destination = tmp / "converted.pt"
    assert main(["convert", str(folder), str(destination), "--to", "original"]) == 2
    one_line_error(capsys, str(folder / relative), *expected[:1])
    assert not destination.exists() and not list(tmp.glob("converted*"))


INSPECTED = ["index-list", "index-invalid-json", "index-no-class", "transformer-list", "transformer-invalid-json",
             "transformer-layers-string", "transformer-layers-negative", "transformer-heads-zero",
             "transformer-eps-nan"]


@pytest.mark.parametrize("case", INSPECTED)
def test_malformed_config_in_inspect(dit, tmp, case, capsys):
    relative, change, expected = DIT_CONFIGS[case]
    folder = corrupt(dit / "dit", tmp, relative, change)
    assert main(["inspect", str(folder)]) == 2
    one_line_error(capsys, str(folder / relative), *expected)


@pytest.mark.parametrize("case", ["vae-scale-nan", "scheduler-steps-string"])
def test_inspect_reports_a_malformed_component_config(dit, tmp, case, capsys):
    """inspect describes what it can and names the malformed component file and field."""
    relative, change, expected = DIT_CONFIGS[case]
    folder = corrupt(dit / "dit", tmp, relative, change)
    assert main(["inspect", str(folder), "--json"]) == 0
    error = json.loads(capsys.readouterr().out)["components_error"]
    assert str(folder / relative) in error and all(text in error for text in expected)


@pytest.mark.parametrize("command", ["inspect", "convert"])
@pytest.mark.parametrize("value, expected", [("[1, 2]", "JSON object"), ("{oops", "not valid JSON"),
                                             ("missing.json", "no such file")])
def test_bad_model_config_in_inspect_and_convert(dit, tmp, command, value, expected, capsys):
    argv = [command, str(dit / "DiT-tiny.pt")] + ([str(tmp / "o"), "--to", "diffusers"] if command == "convert" else [])
    assert main(argv + ["--model-config", value]) == 2
    one_line_error(capsys, "--model-config", expected)


# The SD3 demo folder: text encoder and MMDiT configs.
SD3_CONFIGS = {
    "clip-layers-zero": ("text_encoder/config.json", with_(num_hidden_layers=0), ["num_hidden_layers", "got 0"]),
    "clip-act-number": ("text_encoder_2/config.json", with_(hidden_act=1), ["hidden_act", "1"]),
    "t5-width-string": ("text_encoder_3/config.json", with_(d_model="wide"), ["d_model", '"wide"']),
    "t5-eps-negative": ("text_encoder_3/config.json", with_(layer_norm_epsilon=-1e-6), ["layer_norm_epsilon"]),
    "mmdit-table-nan": ("transformer/config.json", with_(pos_embed_max_size=NAN), ["pos_embed_max_size", "NaN"]),
    "mmdit-dual-layers-string": ("transformer/config.json", with_(dual_attention_layers="0,1"),
                                 ["dual_attention_layers"]),
}


@pytest.mark.parametrize("relative, change, expected", list(SD3_CONFIGS.values()), ids=list(SD3_CONFIGS))
def test_malformed_sd3_config_in_generate(tmp, relative, change, expected, monkeypatch, capsys):
    folder = corrupt(demo_folder("demo-sd3"), tmp, relative, change)

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were read before the configs were checked")

    monkeypatch.setattr("dite.engine.loading.weights.open_weights", no_weights)
    monkeypatch.setattr("dite.engine.loading.loader.open_weights", no_weights)
    assert main(["generate", "--model", str(folder), "a cat", "-o", str(tmp / "out.png")]) == 2
    one_line_error(capsys, str(folder / relative), *expected)


# Config dicts given to the parsers directly (load(model_config=...), conversion hints).
@pytest.mark.parametrize("parse, config, expected", [
    ("pixart", {"num_layers": 2}, "caption_channels"),
    ("pixart", {"caption_channels": 32, "interpolation_scale": 0}, "interpolation_scale"),
    ("pixart", [], "JSON object"),
    ("clip", {"text_config": [1]}, "text_config"),
    ("vae", {"norm_num_groups": 0}, "norm_num_groups"),
    ("t5", {"num_heads": None, "d_kv": -8}, "d_kv"),
], ids=["pixart-required", "pixart-interpolation", "pixart-list", "clip-nested", "vae-groups", "t5-negative"])
def test_config_parsers_name_the_field(parse, config, expected):
    from dite.models import clip, pixart, t5, vae

    parsers = {"pixart": lambda c: pixart.PixArtConfig.from_diffusers(c, "alpha"),
               "clip": clip.CLIPTextConfig.from_transformers, "vae": vae.VAEConfig.from_diffusers,
               "t5": t5.T5Config.from_transformers}
    with pytest.raises(DiteError, match=expected):
        parsers[parse](config)
