"""Conversion of DiT, VAE, CLIP and T5 checkpoints (SD3 single files: test_convert_sd3.py).

Sources are tiny random models saved by diffusers / transformers, or renamed to the
original layouts by the tests' own converters (tests/tiny.py, tests/tiny_encoders.py),
so dite's maps are checked against names it did not write. Round trips are bitwise,
tensor by tensor; converted folders load in diffusers / transformers and compute what the
source computes in dite.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dite.engine import convert, load
from dite.engine.cli import main
from dite.engine.checkpoints.convert import ConversionNote
from dite.engine.errors import CheckpointError, DiteError
from dite.engine.checkpoints.tensor_stream import PrecisionWarning
from dite.models.denoiser import Conditioning
from tiny import dit_to_original, tiny_dit_pipeline, vae_to_ldm as to_ldm
from tiny_encoders import CLIP_COMMON as COMMON, VAE_TINY, clip_reference, t5_reference, to_openclip, vae_reference


def assert_same(actual: dict, expected: dict):
    assert sorted(actual) == sorted(expected)
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype and torch.equal(actual[key], tensor), key


def folder_state(folder) -> dict:
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(file))
    return state


# ----------------------------------------------------------------------------- DiT

@pytest.fixture(scope="module")
def dit_pipe(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dit") / "pipe"
    return tiny_dit_pipeline(folder, scheduler="ddpm"), folder


def dit_original_state(folder) -> dict:
    return dit_to_original(load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors"), depth=3)


def test_dit_folder_to_original_and_back(dit_pipe, tmp_path):
    _, folder = dit_pipe
    original = tmp_path / "DiT-tiny.safetensors"
    with pytest.warns(ConversionNote, match="the vae is not part of dit.s original checkpoint"):
        convert(folder, original, to="original")
    written = load_file(original)
    pos_embed = written.pop("pos_embed")
    assert_same(written, dit_original_state(folder))
    assert pos_embed.shape == (1, 16, 32)  # the original's fixed table, which its code loads strictly
    back = tmp_path / "back"
    convert(original, back, to="diffusers", vae=folder / "vae", model_config={"num_heads": 2})
    assert_same(folder_state(back / "transformer"), folder_state(folder / "transformer"))
    assert_same(folder_state(back / "vae"), folder_state(folder / "vae"))


def test_dit_pt_to_folder_runs_in_diffusers(dit_pipe, tmp_path):
    """An original .pt -> a diffusers folder that diffusers loads and runs as dite runs it;
    the weights are the .pt's, bit for bit."""
    from diffusers import DiTPipeline

    _, folder = dit_pipe
    pt = tmp_path / "DiT-tiny.pt"
    torch.save(dit_original_state(folder), pt)
    out = tmp_path / "pipe"
    convert(pt, out, to="diffusers", vae=folder / "vae", model_config={"num_heads": 2})
    theirs = DiTPipeline.from_pretrained(out).transformer.eval()
    ours = load(out)
    from_pt = load(pt, vae=folder / "vae", model_config={"num_heads": 2})
    assert_same(ours.transformer.state_dict(), from_pt.transformer.state_dict())
    g = torch.Generator().manual_seed(0)
    x, t, labels = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([999, 10]), torch.tensor([1, 7])
    with torch.no_grad():
        expected = theirs(x, timestep=t, class_labels=labels).sample
        actual = ours.transformer(x, t, Conditioning(class_labels=labels))
    assert (actual - expected).abs().max() <= 1e-5
    # The folder samples as the .pt does: the original's respaced learned-range DDPM.
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["variance_type"] == "learned_range"
    back = tmp_path / "again.pt"
    convert(out, back, to="original")
    saved = torch.load(back, weights_only=True)  # {"ema": weights, "dite": metadata}, as DiT's train.py wraps
    state = saved["ema"]
    state.pop("pos_embed")
    assert_same(state, dit_original_state(folder))
    assert json.loads(saved["dite"]["config"])["num_heads"] == 2


def test_dtype_conversion(dit_pipe, tmp_path):
    _, folder = dit_pipe
    for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        out = tmp_path / name
        convert(folder, out, to="diffusers", dtype=name)
        for component in ("transformer", "vae"):
            expected = {k: v.to(dtype) for k, v in folder_state(folder / component).items()}
            assert_same(folder_state(out / component), expected)
        assert load(out, dtype=name).transformer.x_embedder.proj.weight.dtype == dtype


def test_fp16_overflow_is_named(tmp_path):
    state = vae_reference("sd").state_dict()
    state["decoder.conv_in.bias"] = state["decoder.conv_in.bias"].clone()
    state["decoder.conv_in.bias"][0] = 1e6
    save_file(to_ldm(state, 4), tmp_path / "vae.safetensors")
    with pytest.warns(PrecisionWarning, match="decoder.conv_in.bias has values beyond fp16"):
        convert(tmp_path / "vae.safetensors", tmp_path / "vae", to="diffusers", dtype="fp16")
    assert load_file(tmp_path / "vae" / "diffusion_pytorch_model.safetensors")["decoder.conv_in.bias"][0] == 65504


def test_sharding(dit_pipe, tmp_path):
    from diffusers import DiTTransformer2DModel

    _, folder = dit_pipe
    out = tmp_path / "sharded"
    convert(folder, out, to="diffusers", max_shard_size="20KB")
    index = json.loads((out / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = sorted((out / "transformer").glob("diffusion_pytorch_model-*-of-*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == {s.name for s in shards}
    for shard in shards:  # within the limit (plus its header), or a single tensor over it
        with safe_open(shard, "pt") as f:
            assert shard.stat().st_size <= 20_000 + 4_000 or len(list(f.keys())) == 1
    assert_same(folder_state(out / "transformer"), folder_state(folder / "transformer"))
    theirs = DiTTransformer2DModel.from_pretrained(out / "transformer")
    assert_same(dict(theirs.state_dict()), folder_state(folder / "transformer"))
    assert load(out).transformer is not None


def test_overwrite_is_refused(dit_pipe, tmp_path):
    _, folder = dit_pipe
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="exists; pass --force"):
        convert(folder, out, to="diffusers")
    assert (out / "keep.txt").read_text() == "mine"
    convert(folder, out, to="diffusers", force=True)
    assert not (out / "keep.txt").exists() and (out / "model_index.json").exists()
    assert not list(tmp_path.glob("*dite-partial*"))


def test_cli_convert(dit_pipe, tmp_path, capsys):
    _, folder = dit_pipe
    out = tmp_path / "dit.safetensors"
    assert main(["convert", str(folder), str(out), "--to", "original", "--dtype", "bf16"]) == 0
    assert str(out) in capsys.readouterr().out
    with safe_open(out, "pt") as f:
        meta = f.metadata()
        assert f.get_tensor("blocks.0.attn.qkv.weight").dtype == torch.bfloat16
    assert meta["family"] == "dit" and json.loads(meta["config"])["depth"] == 3 and meta["source"] == folder.name
    assert main(["convert", str(folder), str(out), "--to", "original"]) == 2
    assert "exists; pass --force" in capsys.readouterr().err


# ----------------------------------------------------------------------------- VAE

@pytest.mark.parametrize("names", ["current", "old attention names"])
def test_vae_ldm_round_trip(names, tmp_path):
    from diffusers import AutoencoderKL

    reference = vae_reference("sd")
    state = reference.state_dict()
    folder = tmp_path / "vae"
    reference.save_pretrained(folder)
    if names != "current":  # 2022 diffusers files: query/key/value/proj_attn
        old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
        renamed = {}
        for key, value in state.items():
            for new, legacy in old.items():
                key = key.replace(f"attentions.0.{new}.", f"attentions.0.{legacy}.")
            renamed[key] = value
        save_file(renamed, folder / "diffusion_pytorch_model.safetensors")
    levels = len(VAE_TINY["sd"]["block_out_channels"])
    ldm = tmp_path / "vae-ldm.safetensors"
    convert(folder, ldm, to="original")
    assert_same(load_file(ldm), {k: v.contiguous() for k, v in to_ldm(state, levels).items()})
    back = tmp_path / "back"
    convert(ldm, back, to="diffusers")
    assert_same(folder_state(back), {k: v.contiguous() for k, v in state.items()})
    theirs = AutoencoderKL.from_pretrained(back)
    assert_same(dict(theirs.state_dict()), dict(state))


# ----------------------------------------------------------------------------- CLIP, T5

def test_openclip_to_transformers_folder_and_back(tmp_path):
    import transformers

    reference = clip_reference("legacy")
    openclip = {k: v.contiguous() for k, v in to_openclip(reference.state_dict(), COMMON["num_hidden_layers"]).items()}
    openclip.pop("logit_scale", None)
    source = tmp_path / "open_clip.safetensors"
    save_file(openclip, source)
    folder = tmp_path / "text_encoder"
    convert(source, folder, to="diffusers", model_config={"text_encoder": reference.config.to_dict()})
    theirs = transformers.CLIPTextModelWithProjection.from_pretrained(folder).eval()
    expected = {k: v for k, v in reference.state_dict().items() if "position_ids" not in k}
    assert_same({k: v for k, v in theirs.state_dict().items() if "position_ids" not in k}, expected)
    back = tmp_path / "clip.safetensors"
    convert(folder, back, to="original")  # SD3's text_encoders/ files: transformers names
    assert_same(load_file(back), folder_state(folder))


def test_t5_folder_to_file_and_back(tmp_path):
    import transformers

    reference = t5_reference()
    folder = tmp_path / "text_encoder_3"
    reference.save_pretrained(folder)
    file = tmp_path / "t5xxl_fp32.safetensors"
    convert(folder, file, to="original")
    state = {k: v for k, v in reference.state_dict().items() if k != "encoder.embed_tokens.weight"}
    assert_same(load_file(file), state)
    back = tmp_path / "back"
    convert(file, back, to="diffusers")
    assert_same(folder_state(back), state)
    theirs = transformers.T5EncoderModel.from_pretrained(back).eval()
    ids = torch.tensor([[5, 9, 13, 1]])
    with torch.no_grad():
        assert torch.equal(theirs(ids).last_hidden_state, reference(ids).last_hidden_state)


def test_t5_fp16_keeps_fp32_only_tensors(tmp_path):
    reference = t5_reference()
    folder = tmp_path / "t5"
    reference.save_pretrained(folder)
    with pytest.warns(PrecisionWarning, match="stay fp32"):
        convert(folder, tmp_path / "t5.safetensors", to="original", dtype="fp16")
    state = load_file(tmp_path / "t5.safetensors")
    assert state["encoder.block.0.layer.1.DenseReluDense.wo.weight"].dtype == torch.float32
    assert state["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].dtype == torch.float16


# ----------------------------------------------------------------------------- bad inputs

def test_unknown_state_dict_names_the_closest_family(tmp_path):
    path = tmp_path / "vae-part.safetensors"
    save_file({"decoder.conv_out.weight": torch.zeros(3, 2, 3, 3), "encoder.conv_out.weight": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="not a supported model: closest is vae, .* lacks decoder.conv_in.weight"):
        convert(path, tmp_path / "out", to="diffusers")
    save_file({"foo": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="not a supported model: none of its 1 tensors"):
        convert(path, tmp_path / "out", to="diffusers")


def test_truncated_file_is_refused(dit_pipe, tmp_path):
    _, folder = dit_pipe
    good = tmp_path / "dit.safetensors"
    convert(folder, good, to="original")
    data = good.read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[: len(data) - 1000])  # mid-tensor
    with pytest.raises(CheckpointError, match="truncated"):
        convert(bad, tmp_path / "out", to="diffusers", model_config={"num_heads": 2})
    assert not (tmp_path / "out").exists()


def test_corrupted_file_is_refused_by_name(dit_pipe, tmp_path):
    _, folder = dit_pipe
    state = dit_original_state(folder)
    del state["blocks.1.mlp.fc2.bias"]
    state["blocks.2.attn.qkv.weight"] = state["blocks.2.attn.qkv.weight"][:-1].contiguous()
    state["extra.weight"] = torch.zeros(2)
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match=r"1 missing \(e.g. blocks.1.mlp.fc2.bias\); 1 unexpected "
                                              r"\(e.g. extra.weight\); 1 mis-shaped \(e.g. blocks.2.attn.qkv.weight"):
        convert(tmp_path / "bad.safetensors", tmp_path / "out", to="diffusers", model_config={"num_heads": 2})


# ----------------------------------------------------------------------------- inspect

def test_inspect_lists_the_bad_keys_of_a_corrupted_file(dit_pipe, tmp_path, capsys):
    _, folder = dit_pipe
    state = dit_original_state(folder)
    del state["blocks.1.mlp.fc2.bias"]
    state["blocks.2.attn.qkv.weight"] = state["blocks.2.attn.qkv.weight"][:-1].contiguous()
    state["extra.weight"] = torch.zeros(2)
    path = tmp_path / "DiT-tiny.safetensors"
    save_file(state, path)
    assert main(["inspect", str(path), "--json", "--model-config", '{"num_heads": 2}']) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "dit" and info["clean"] is False
    problems = info["components"]["transformer"]["problems"]
    assert problems["missing"] == ["blocks.1.mlp.fc2.bias"] and problems["unexpected"] == ["extra.weight"]
    assert problems["misshaped"] == [{"key": "blocks.2.attn.qkv.weight", "shape": [95, 32], "expected": [96, 32]}]
    assert info["config"]["num_heads"] == 2 and "config_error" not in info
    assert main(["inspect", str(path), "--model-config", '{"num_heads": 2}']) == 0
    text = capsys.readouterr().out
    assert "- blocks.1.mlp.fc2.bias" in text and "- blocks.2.attn.qkv.weight is (95, 32), expected (96, 32)" in text


def test_inspect_components_of_files_and_folders(dit_pipe, tmp_path, capsys):
    _, folder = dit_pipe
    assert main(["inspect", str(folder), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    vae = info["components"]["vae"]
    assert vae["kind"] == "vae" and vae["config"]["block_out_channels"] == [8, 16] and "problems" not in vae
    ldm = tmp_path / "vae.safetensors"
    convert(folder / "vae", ldm, to="original", dtype="fp16")
    hints = tmp_path / "hints.json"  # the tiny VAE's 4 norm groups are not in its shapes
    hints.write_text(json.dumps({"vae": json.loads((folder / "vae" / "config.json").read_text())}))
    assert main(["inspect", str(ldm), "--json", "--model-config", str(hints)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["family"], info["layout"]) == ("vae", "original")
    assert info["components"]["vae"]["dtypes"] == {"F16": info["components"]["vae"]["tensors"]}
    unknown = tmp_path / "unknown.safetensors"
    save_file({"shared.weight": torch.zeros(6, 2), "encoder.final_layer_norm.weight": torch.zeros(2)}, unknown)
    assert main(["inspect", str(unknown)]) == 2
    assert "not a supported model: closest is t5" in capsys.readouterr().err


def test_convert_folder_tool(tmp_path, capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import convert_folder

    batch = tmp_path / "in"
    vae_reference("sd").save_pretrained(batch / "sd-vae")
    convert(batch / "sd-vae", batch / "vae-ldm.safetensors", to="original")
    save_file({"foo": torch.zeros(1)}, batch / "junk.safetensors")
    assert convert_folder.main([str(batch), str(tmp_path / "out"), "--to", "original"]) == 1  # junk fails
    captured = capsys.readouterr()
    assert "sd-vae ->" in captured.out and "junk.safetensors: FAILED: " in captured.err
    assert_same(load_file(tmp_path / "out" / "sd-vae.safetensors"), load_file(batch / "vae-ldm.safetensors"))
    assert_same(load_file(tmp_path / "out" / "vae-ldm.safetensors"), load_file(batch / "vae-ldm.safetensors"))


def test_truncated_pt_is_refused(dit_pipe, tmp_path):
    _, folder = dit_pipe
    pt = tmp_path / "DiT.pt"
    torch.save(dit_original_state(folder), pt)
    data = pt.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        convert(tmp_path / "cut.pt", tmp_path / "out", to="diffusers", model_config={"num_heads": 2})
    with pytest.raises(DiteError, match="no such file or folder"):
        convert(tmp_path / "missing.pt", tmp_path / "out", to="diffusers")


# ----------------------------------------------------------------------------- what dite records

def test_demo_dit_round_trip_keeps_its_scheduler(tmp_path, capsys):
    """demo-dit samples with a cosine DDIM, not the original DiT's linear DDPM: folder -> .pt ->
    folder gives the same scheduler, transformer config and model_index (class names)."""
    from dite.engine.loading.hub import demo_folder

    demo = demo_folder("demo-dit")
    pt = tmp_path / "demo-dit.pt"
    assert main(["convert", "demo-dit", str(pt), "--to", "original"]) == 0
    back = tmp_path / "back"
    assert main(["convert", str(pt), str(back), "--to", "diffusers", "--vae", str(demo / "vae")]) == 0
    for name in ("scheduler/scheduler_config.json", "transformer/config.json", "model_index.json"):
        assert json.loads((back / name).read_text()) == json.loads((demo / name).read_text()), name
    pipe = load(pt, vae=demo / "vae")  # no model_config: the heads are recorded too
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    assert pipe.transformer.config == load("demo-dit").transformer.config  # heads, eps, timestep shift
    assert pipe.label_ids(["cyan circle"]) == [3]  # the class names come along
    capsys.readouterr()
    assert main(["inspect", "demo-dit", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["family"] == "dit"


def test_recorded_config_is_read_back_by_load_convert_and_inspect(dit_pipe, tmp_path, capsys):
    _, folder = dit_pipe
    file = tmp_path / "dit.safetensors"
    convert(folder, file, to="original")
    with safe_open(file, "pt") as f:
        meta = f.metadata()
    assert meta["source"] == folder.name and not any(str(tmp_path) in v or "/tmp" in v for v in meta.values())
    assert json.loads(meta["scheduler_config"]) == json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    # 32 wide with 2 heads is no published DiT: without the record this needs model_config.
    pipe = load(file, vae=folder / "vae")
    assert pipe.transformer.config == load(folder).transformer.config
    assert type(pipe.scheduler).__name__ == "DDPMScheduler"
    back = tmp_path / "back"
    convert(file, back, to="diffusers", vae=folder / "vae")
    assert json.loads((back / "transformer" / "config.json").read_text()) == json.loads(
        (folder / "transformer" / "config.json").read_text())
    assert main(["inspect", str(file), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config"]["num_heads"] == 2 and info["recorded"]["source"] == folder.name
    with pytest.raises(DiteError, match=r"num_heads=4 contradicts num_heads=2 recorded in dit.safetensors"):
        load(file, vae=folder / "vae", model_config={"num_heads": 4})


def test_metadata_never_records_local_paths(dit_pipe, tmp_path):
    _, folder = dit_pipe
    convert(folder, tmp_path / "out", to="diffusers")
    for weights in (tmp_path / "out").rglob("*.safetensors"):
        with safe_open(weights, "pt") as f:
            meta = f.metadata()
        assert meta["source"] == folder.name and not any(str(folder.parent) in v for v in meta.values())
