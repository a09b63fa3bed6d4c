"""Offload logic on a CPU, with the execution and storage devices both the CPU and a `move`
that records what it is asked to do: the order of moves, one component resident at a time
(model), every block moved in and out around its call (sequential), and the same images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dite.engine.errors import InputError
from dite.engine.loading.loader import load
from dite.engine.memory.offload import denoiser_pieces, enable_offload


def generate(pipe):
    return pipe("a red cube", num_inference_steps=2, output_type="np", progress=False).images


@pytest.fixture(scope="module")
def plain():
    return generate(load("demo-sd3"))


def recorder(log):
    def move(module, device):
        log.append((type(module).__name__, id(module), device.type))
        module.to(device)
    return move


def test_model_offload_moves_one_component_at_a_time(plain):
    pipe = load("demo-sd3")
    log = []
    offloader = enable_offload(pipe, "model", execution="cpu", storage="cpu", move=recorder(log))
    assert pipe.device == torch.device("cpu") and type(pipe).__name__ == "OffloadedSD3Pipeline"
    images = generate(pipe)
    assert np.array_equal(images, plain)
    order = []  # the components in the order they were moved (in or out: both devices are the CPU)
    for name, ident, _ in log:
        if not order or order[-1][1] != ident:
            order.append((name, ident))
    names = [name for name, _ in order]
    # Encoders in the order they run, then the denoiser, then the VAE; each brought in once.
    assert names == ["CLIPTextModel", "CLIPTextModel", "T5Encoder", "MMDiT", "AutoencoderKL"], names
    assert offloader.resident is pipe.vae
    # Each move after the first sends the previous component out before bringing the next in.
    assert len(log) == 2 * len(names) - 1
    generate(pipe)  # a second call starts from the VAE resident: the first encoder evicts it
    assert log[len(names) * 2 - 1][1] == id(pipe.vae)


def test_sequential_offload_streams_every_block(plain):
    pipe = load("demo-sd3")
    log = []
    enable_offload(pipe, "sequential", execution="cpu", storage="cpu", move=recorder(log))
    images = generate(pipe)
    assert np.array_equal(images, plain)
    blocks = {id(block) for block in pipe.transformer.blocks}
    block_moves = [entry for entry in log if entry[1] in blocks]
    # 2 steps x depth blocks, each moved in and then out.
    assert len(block_moves) == 2 * 2 * len(pipe.transformer.blocks)
    assert all(block_moves[k][1] == block_moves[k + 1][1] for k in range(0, len(block_moves), 2))
    pieces = denoiser_pieces(pipe.transformer)
    assert set(map(id, pipe.transformer.blocks)) <= set(map(id, pieces))
    with pytest.raises(InputError, match="offload 'disk'"):
        enable_offload(load("demo-dit"), "disk", execution="cpu")


def test_cli_offload_runs_and_is_recorded(tmp_path, capsys):
    from dite.engine.cli import main
    from dite.engine.outputs.writers import read_parameters

    argv = ["generate", "--quiet", "--class-label", "1", "--steps", "2", "--dtype", "fp32"]
    assert main(argv + ["-o", str(tmp_path / "plain.png")]) == 0
    assert main(argv + ["--offload", "sequential", "-o", str(tmp_path / "offloaded.png")]) == 0
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(tmp_path / "plain.png")),
                          np.asarray(Image.open(tmp_path / "offloaded.png")))
    assert read_parameters(tmp_path / "offloaded.png")["offload"] == "sequential"
