"""Loading sources: folders, original files, shards, the hub, and every bad-input error."""

from __future__ import annotations

import argparse
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from dite.engine import load
from dite.engine.errors import CheckpointError, ConfigError, HubError
from dite.engine.loading.weights import open_weights
from tiny import dit_to_original, tiny_dit_pipeline


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("dit")
    tiny_dit_pipeline(path, "ddim")
    return path


def test_sharded_transformer_loads_like_single_file(folder, tmp_path):
    copy = tmp_path / "sharded"
    shutil.copytree(folder, copy)
    weights = copy / "transformer" / "diffusion_pytorch_model.safetensors"
    reader = open_weights(weights)
    state = {k: reader.get(k) for k in reader.keys()}
    keys = sorted(state)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    weight_map = {}
    for n, part in enumerate(halves, 1):
        name = f"diffusion_pytorch_model-0000{n}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, copy / "transformer" / name)
        weight_map.update({k: name for k in part})
    weights.unlink()
    (copy / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    kwargs = dict(class_labels=[4], num_inference_steps=2, output_type="latent", progress=False)
    assert torch.equal(load(copy)(**kwargs).latents, load(folder)(**kwargs).latents)


def test_original_pt_with_separate_vae(folder, tmp_path):
    reference = load(folder)
    state = dit_to_original(_diffusers_state(folder), depth=3)
    state["pos_embed"] = torch.zeros(1, 16, 32)  # stored by the release; gives the 4x4 token grid
    path = tmp_path / "DiT-tiny.pt"
    torch.save(state, path)
    pipe = load(path, vae=folder / "vae", model_config={"num_heads": 2})
    assert pipe.scheduler.name == "ddpm"  # the original IDDPM sampler
    assert pipe.transformer.config.freq_shift == 0
    out = pipe(class_labels=[2], num_inference_steps=3, output_type="np", progress=False)
    assert out.images.shape == (1, 16, 16, 3)
    with pytest.raises(ConfigError, match="vae=PATH"):
        load(path, model_config={"num_heads": 2})
    assert reference.transformer.config.freq_shift == 1


def _diffusers_state(folder):
    reader = open_weights(folder / "transformer")
    return {k: reader.get(k) for k in reader.keys()}


def test_truncated_safetensors_is_a_clear_error(folder, tmp_path):
    data = (folder / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load(path)
    path.write_bytes(data[:20])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        load(path)


def test_folder_without_model_index(folder, tmp_path):
    with pytest.raises(CheckpointError, match="has no model_index.json"):
        load(folder / "transformer")


def test_unknown_pipeline_class(folder, tmp_path):
    copy = tmp_path / "other"
    shutil.copytree(folder, copy)
    index = json.loads((copy / "model_index.json").read_text())
    index["_class_name"] = "KandinskyPipeline"
    (copy / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match="'KandinskyPipeline'.*supported: DiTPipeline"):
        load(copy)


def test_unrecognised_checkpoint_file(tmp_path):
    path = tmp_path / "random.safetensors"
    save_file({"foo.weight": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="cannot tell which model"):
        load(path)


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "train.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "args": argparse.Namespace(lr=1)}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        load(path)


def test_missing_path_and_offline_hub(monkeypatch):
    with pytest.raises(HubError, match="no such file or folder"):
        load("./does/not/exist")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="could not download nobody/no-such-model"):
        load("nobody/no-such-model")


def test_bad_device_and_dtype(folder):
    with pytest.raises(Exception, match="dtype"):
        load(folder, dtype="int8")
    if not torch.cuda.is_available():
        with pytest.raises(Exception, match="no CUDA GPU"):
            load(folder, device="cuda")
