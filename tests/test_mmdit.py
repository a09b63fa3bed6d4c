"""MMDiT (SD3 / SD3.5): parity with diffusers in its layout and in the original single-file layout."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from dite.engine.errors import CheckpointError
from dite.engine.loading.weights import SafetensorsReader, load_weights, open_weights
from dite.models import mmdit
from dite.models.denoiser import Conditioning
from tiny import sd3_to_original, tiny_diffusers_sd3_transformer

VARIANTS = {
    "sd3-medium": dict(qk_norm=None, dual_attention_layers=()),
    "sd3.5-large": dict(qk_norm="rms_norm", dual_attention_layers=()),
    "sd3.5-medium": dict(qk_norm="rms_norm", dual_attention_layers=(0, 1)),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def reference(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    model = tiny_diffusers_sd3_transformer(**VARIANTS[request.param])
    model.save_pretrained(folder)
    return model, folder


def build(cfg, reader, layout, prefix=""):
    with torch.device("meta"):
        module = mmdit.MMDiT(cfg)
    keymap, ignore = mmdit.keymap(cfg, layout, prefix)
    return load_weights(module, keymap, reader, ignore=ignore)


def inputs(h=8, w=12):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, h, w, generator=g)
    cond = Conditioning(context=torch.randn(2, 7, 24, generator=g), pooled=torch.randn(2, 20, generator=g))
    return x, torch.tensor([999.0, 3.5]), cond


def run_reference(model, x, t, cond):
    with torch.no_grad():
        return model(x, encoder_hidden_states=cond.context, pooled_projections=cond.pooled, timestep=t).sample


def test_diffusers_layout_matches(reference):
    model, folder = reference
    cfg = mmdit.MMDiTConfig.from_diffusers(json.loads((folder / "config.json").read_text()))
    ours = build(cfg, open_weights(folder), "diffusers")
    for h, w in ((8, 12), (12, 4)):  # non-square both ways
        x, t, cond = inputs(h, w)
        with torch.no_grad():
            got = ours(x, t, cond)
        expected = run_reference(model, x, t, cond)
        assert got.shape == expected.shape == (2, 4, h, w)
        assert (got - expected).abs().max().item() <= 1e-5


def test_original_single_file_matches(reference, tmp_path):
    model, folder = reference
    depth = model.config.num_layers
    path = tmp_path / "sd3_tiny.safetensors"
    state = sd3_to_original(model.state_dict(), depth)
    state["first_stage_model.decoder.conv_in.weight"] = torch.zeros(1)  # a bundled VAE, not ours to read
    save_file(state, path)
    reader = SafetensorsReader([path], key_prefix="model.diffusion_model.")
    cfg = mmdit.detect_config(reader.shapes(), num_heads=2)
    expected = mmdit.MMDiTConfig.from_diffusers(json.loads((folder / "config.json").read_text()))
    assert cfg == replace(expected, sample_size=128)  # the default size is not in a state dict
    ours = build(cfg, reader, "original")
    x, t, cond = inputs()
    with torch.no_grad():
        got = ours(x, t, cond)
    assert (got - run_reference(model, x, t, cond)).abs().max().item() <= 1e-5


def test_diffusers_single_file_loader_agrees_with_our_original_layout(reference, tmp_path):
    """diffusers' own converter reads the original-layout file we wrote: the key maps are
    checked against an implementation we did not write."""
    from diffusers import SD3Transformer2DModel

    model, folder = reference
    path = tmp_path / "sd3_tiny.safetensors"
    save_file(sd3_to_original(model.state_dict(), model.config.num_layers), path)
    theirs = SD3Transformer2DModel.from_single_file(str(path), config=str(folder), local_files_only=True).eval()
    x, t, cond = inputs()
    assert torch.equal(run_reference(theirs, x, t, cond), run_reference(model, x, t, cond))


def test_position_table_is_cropped_centred(reference):
    model, folder = reference
    cfg = mmdit.MMDiTConfig.from_diffusers(json.loads((folder / "config.json").read_text()))
    ours = build(cfg, open_weights(folder), "diffusers")
    table = ours.pos_embed.reshape(12, 12, -1)
    assert torch.equal(ours.cropped_pos_embed((4, 6))[0], table[4:8, 3:9].reshape(24, -1))
    with pytest.raises(ValueError, match="exceeds the model's position table"):
        ours.cropped_pos_embed((13, 2))


def test_full_size_configs_are_detected():
    """The published variants' shapes give their published configs (on meta, free)."""
    for cfg in (
        mmdit.MMDiTConfig(depth=24, num_heads=24, pos_embed_max_size=192),
        mmdit.MMDiTConfig(depth=38, num_heads=38, pos_embed_max_size=192, qk_norm=True),
        mmdit.MMDiTConfig(depth=24, num_heads=24, pos_embed_max_size=384, qk_norm=True,
                          dual_attention_layers=tuple(range(13))),
    ):
        with torch.device("meta"):
            module = mmdit.MMDiT(cfg)
        shapes = {k.replace("blocks.", "joint_blocks.", 1) if k.startswith("blocks.") else k: tuple(v.shape)
                  for k, v in module.state_dict().items()}
        assert mmdit.detect_config(shapes) == cfg
    with torch.device("meta"):
        medium = mmdit.MMDiT(mmdit.MMDiTConfig(depth=24, num_heads=24, pos_embed_max_size=192))
    # SD3-medium: 2,028,328,000 parameters + the 192^2 x 1536 position table.
    assert sum(p.numel() for p in medium.parameters()) == 2_028_328_000


def test_mis_shaped_key_is_named(reference):
    model, _ = reference
    state = sd3_to_original(model.state_dict(), model.config.num_layers, prefix="")
    state["joint_blocks.1.x_block.mlp.fc1.bias"] = torch.zeros(3)
    from dite.engine.loading.weights import StateDictReader

    cfg = mmdit.detect_config({k: tuple(v.shape) for k, v in state.items()}, num_heads=2)
    with pytest.raises(CheckpointError, match=r"joint_blocks\.1\.x_block\.mlp\.fc1\.bias .*shape \(3,\)"):
        build(cfg, StateDictReader(state, "bad"), "original")
