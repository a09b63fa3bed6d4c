"""fp8 weight storage (engine/memory/fp8.py): an fp8 checkpoint stays fp8 in memory and gives
exactly what the same checkpoint upcast at load gives; a full-precision one cast to fp8 stays
within fp8's precision of the original; linear weights take a quarter of fp32's bytes."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from dite.engine.cli import main
from dite.engine.loading.loader import load
from dite.engine.loading.streaming import keeping_fp8
from dite.engine.memory.fp8 import FP8Linear, store_fp8
from dite.engine.outputs.writers import read_parameters
from tiny import tiny_dit_pipeline


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny DiT folder, and a copy whose transformer's 2-D weights are stored in fp8 (as
    fp8 checkpoints are: plain casts)."""
    root = tmp_path_factory.mktemp("fp8")
    full = root / "full"
    tiny_dit_pipeline(full, "ddim")
    fp8 = root / "fp8"
    shutil.copytree(full, fp8)
    weights = next((fp8 / "transformer").glob("*.safetensors"))
    state = load_file(weights)
    state = {k: v.to(torch.float8_e4m3fn) if v.dim() == 2 and v.is_floating_point() else v for k, v in state.items()}
    save_file(state, weights)
    return full, fp8


def images(pipe):
    return pipe(class_labels=[1, 3], num_inference_steps=3, output_type="np", progress=False).images


def linear_weights(pipe):
    return [m.weight for m in pipe.transformer.modules() if isinstance(m, torch.nn.Linear)]


def test_fp8_file_stays_fp8_and_equals_upcast_at_load(folders):
    _, fp8 = folders
    upcast = load(fp8, dtype="fp32")  # the ordinary path: fp8 read, cast to fp32 at load
    with keeping_fp8():
        stored = load(fp8, dtype="fp32")
    assert {w.dtype for w in linear_weights(stored)} == {torch.float8_e4m3fn}  # read as they are
    info = store_fp8(stored)
    assert all(isinstance(m, FP8Linear) for m in stored.transformer.modules() if isinstance(m, torch.nn.Linear))
    assert info["linear_layers"] == len(linear_weights(stored)) > 0
    fp8_linears = [m for m in stored.transformer.modules() if isinstance(m, FP8Linear)]
    assert {m._parameters["weight"].dtype for m in fp8_linears} == {torch.float8_e4m3fn}  # what memory holds
    assert {m.weight.dtype for m in fp8_linears} == {torch.float32}  # what model code reading .weight sees
    assert stored.dtype == torch.float32 and next(stored.vae.parameters()).dtype == torch.float32
    assert np.array_equal(images(stored), images(upcast))


def test_full_precision_cast_to_fp8_within_its_precision(folders):
    full, _ = folders
    reference = load(full, dtype="fp32")
    quantized = load(full, dtype="fp32")
    fp32_bytes = sum(w.numel() * w.element_size() for w in linear_weights(quantized))
    info = store_fp8(quantized, torch.float8_e5m2)
    assert info["fp8_bytes"] * 4 == fp32_bytes
    a, b = images(reference), images(quantized)
    error = np.abs(a - b)
    # e5m2 keeps 2 mantissa bits (relative step 25%); the images move, but stay close.
    assert 0 < error.mean() < 0.05 and error.max() < 0.5


def test_cli_weights_dtype_recorded_and_rerun(folders, tmp_path, capsys):
    _, fp8 = folders
    argv = ["generate", "--quiet", "--model", str(fp8), "--class-label", "1", "--steps", "2", "--dtype", "fp32"]
    assert main(argv + ["--weights-dtype", "fp8", "-o", str(tmp_path / "a.png")]) == 0
    assert read_parameters(tmp_path / "a.png")["weights_dtype"] == "fp8"
    assert main(["generate", "--quiet", "--from-image", str(tmp_path / "a.png"), "--model", str(fp8),
                 "-o", str(tmp_path / "b.png")]) == 0
    assert read_parameters(tmp_path / "b.png")["weights_dtype"] == "fp8"
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))
