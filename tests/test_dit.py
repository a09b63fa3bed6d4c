"""DiT transformer: parity with diffusers, and the original release layout."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from dite.engine.errors import CheckpointError, ConfigError
from dite.engine.loading.weights import StateDictReader, load_weights, open_weights
from dite.models import dit
from dite.models.checkpoint import export_state_dict
from dite.models.denoiser import Conditioning
from tiny import dit_to_original, tiny_diffusers_dit

DEPTH = 3


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dit")
    model = tiny_diffusers_dit(num_layers=DEPTH)
    model.save_pretrained(folder)
    return model, folder


def build(cfg, reader, layout):
    with torch.device("meta"):
        module = dit.DiT(cfg)
    keymap, ignore = dit.keymap(cfg, layout)
    return load_weights(module, keymap, reader, ignore=ignore)


def inputs(batch=4, side=8):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(batch, 4, side, side, generator=g)
    t = torch.tensor([999, 500, 1, 0][:batch])
    labels = torch.tensor([0, 7, 999, 1000][:batch])
    return x, t, labels


def test_transformer_matches_diffusers(reference):
    model, folder = reference
    cfg = dit.DiTConfig.from_diffusers(json.loads((folder / "config.json").read_text()))
    ours = build(cfg, open_weights(folder), "diffusers")
    x, t, labels = inputs()
    with torch.no_grad():
        expected = model(x, timestep=t, class_labels=labels).sample
        got = ours(x, t, Conditioning(class_labels=labels))
    assert got.shape == expected.shape == (4, 8, 8, 8)
    assert (got - expected).abs().max().item() <= 1e-5


def test_diffusers_numeric_switches_matter(reference):
    """The two diffusers deviations are real: switching them off changes the output."""
    model, folder = reference
    cfg = dit.DiTConfig.from_diffusers(json.loads((folder / "config.json").read_text()))
    assert cfg.freq_shift == 1 and cfg.mlp_norm_eps == 1e-5
    x, t, labels = inputs()
    with torch.no_grad():
        expected = model(x, timestep=t, class_labels=labels).sample
        original_math = build(replace(cfg, freq_shift=0.0, mlp_norm_eps=1e-6), open_weights(folder), "diffusers")
        got = original_math(x, t, Conditioning(class_labels=labels))
    assert (got - expected).abs().max().item() > 1e-4


def mae_pos_embed(dim: int, side: int) -> np.ndarray:
    """facebookresearch/DiT's numpy position table, written out independently."""
    grid_h = np.arange(side, dtype=np.float32)
    grid_w = np.arange(side, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, side, side)

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)


def test_original_layout_loads_and_matches(reference, tmp_path):
    model, folder = reference
    state = dit_to_original(model.state_dict(), DEPTH)
    state["pos_embed"] = torch.from_numpy(mae_pos_embed(32, 4)).float().unsqueeze(0)
    path = tmp_path / "DiT-tiny.pt"
    torch.save(state, path)

    reader = open_weights(path)
    assert dit.detect_layout(reader.keys()) == "original"
    cfg = dit.detect_config(reader.shapes(), num_heads=2)
    assert (cfg.hidden_size, cfg.depth, cfg.patch_size, cfg.out_channels, cfg.num_classes, cfg.input_size) == (
        32, DEPTH, 2, 8, 1000, 8)
    assert cfg.freq_shift == 0 and cfg.mlp_norm_eps == 1e-6
    original = build(cfg, reader, "original")  # strict: no missing or unexpected key
    # Our computed position table is the one the release stores.
    torch.testing.assert_close(original.pos_embed, state["pos_embed"][0], rtol=0, atol=1e-7)

    # The same weights in the diffusers layout, with the original's numeric fields, agree.
    diffusers_cfg = dit.DiTConfig.from_diffusers(json.loads((folder / "config.json").read_text()))
    same_math = build(replace(diffusers_cfg, freq_shift=0.0, mlp_norm_eps=1e-6), open_weights(folder), "diffusers")
    x, t, labels = inputs()
    with torch.no_grad():
        a = original(x, t, Conditioning(class_labels=labels))
        b = same_math(x, t, Conditioning(class_labels=labels))
    assert torch.equal(a, b)


def test_heads_of_unpublished_width_must_be_given(reference):
    model, _ = reference
    shapes = {k: tuple(v.shape) for k, v in dit_to_original(model.state_dict(), DEPTH).items()}
    with pytest.raises(ConfigError, match="num_heads"):
        dit.detect_config(shapes)


def test_published_sizes_are_detected():
    with torch.device("meta"):
        module = dit.DiT(dit.DiTConfig.preset("DiT-XL/2-512"))
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    shapes["pos_embed"] = (1, 1024, 1152)
    cfg = dit.detect_config(shapes)
    assert cfg == dit.DiTConfig.preset("DiT-XL/2-512")
    # DiT-XL/2-256 has 675,129,632 parameters counting its stored 256 x 1152 position table.
    assert sum(p.numel() for p in module.parameters()) == 675_129_632 - 256 * 1152


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    """A DiT as diffusers initialises one (a model made or fine-tuned in diffusers): every
    block's timestep and class embedders are separate modules with their own random init."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(11)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                  num_layers=DEPTH, sample_size=8, patch_size=2, num_embeds_ada_norm=1000).eval()
    folder = tmp_path_factory.mktemp("dit-untied")
    model.save_pretrained(folder)
    return model, folder


def load_folder_transformer(folder):
    reader = open_weights(folder)
    cfg = dit.DiTConfig.from_diffusers(json.loads((folder / "config.json").read_text()))
    cfg = dit.fit_embedders(cfg, reader.keys(), reader.get)
    return cfg, build(cfg, reader, "diffusers")


def test_untied_embedders_load_and_match_diffusers(untied):
    model, folder = untied
    emb = [block.norm1.emb for block in model.transformer_blocks]
    assert not torch.equal(emb[1].timestep_embedder.linear_1.weight, emb[0].timestep_embedder.linear_1.weight)
    assert not torch.equal(emb[2].class_embedder.embedding_table.weight, emb[0].class_embedder.embedding_table.weight)
    cfg, ours = load_folder_transformer(folder)
    assert cfg.per_block_embedders and len(ours.block_embedders) == DEPTH
    x, t, labels = inputs()
    with torch.no_grad():
        expected = model(x, timestep=t, class_labels=labels).sample
        got = ours(x, t, Conditioning(class_labels=labels))
    assert (got - expected).abs().max().item() <= 1e-5
    # Every stored tensor is a parameter of ours, once: the counts agree.
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in model.parameters())


def test_untied_embedders_each_matter(untied):
    """Block i really uses its own embedder: changing block 2's copy changes the output."""
    model, folder = untied
    _, ours = load_folder_transformer(folder)
    x, t, labels = inputs()
    with torch.no_grad():
        before = ours(x, t, Conditioning(class_labels=labels))
        ours.block_embedders[2].y_embedder.embedding_table.weight.add_(0.5)
        after = ours(x, t, Conditioning(class_labels=labels))
    assert (before - after).abs().max().item() > 1e-4


def test_untied_embedders_export_back_to_diffusers_names(untied):
    model, folder = untied
    cfg, ours = load_folder_transformer(folder)
    keymap, _ = dit.keymap(cfg, "diffusers")
    exported = export_state_dict(keymap, ours.state_dict())
    state = model.state_dict()
    assert set(exported) == set(state)  # diffusers does not store its position table either
    assert all(torch.equal(exported[k], state[k]) for k in exported)
    with pytest.raises(ConfigError, match="per block.*original layout"):
        dit.keymap(cfg, "original")


def test_tied_embedders_are_stored_once(reference):
    model, folder = reference
    cfg, ours = load_folder_transformer(folder)
    assert not cfg.per_block_embedders and not hasattr(ours, "block_embedders")
    one = sum(p.numel() for p in model.transformer_blocks[0].norm1.emb.parameters())
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in model.parameters()) - (DEPTH - 1) * one


def test_missing_unexpected_and_misshaped_keys_are_named(reference):
    model, _ = reference
    good = dit_to_original(model.state_dict(), DEPTH)
    cfg = dit.detect_config({k: tuple(v.shape) for k, v in good.items()}, num_heads=2)

    missing = dict(good)
    del missing["blocks.1.attn.proj.bias"]
    with pytest.raises(CheckpointError, match=r"blocks\.1\.attn\.proj\.bias"):
        build(cfg, StateDictReader(missing, "m.pt"), "original")

    extra = dict(good, **{"blocks.9.mystery": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"unexpected.*blocks\.9\.mystery"):
        build(cfg, StateDictReader(extra, "e.pt"), "original")

    wrong = dict(good, **{"final_layer.linear.bias": torch.zeros(7)})
    with pytest.raises(CheckpointError, match=r"final_layer\.linear\.bias in s\.pt has shape \(7,\).*\(32,\)"):
        build(cfg, StateDictReader(wrong, "s.pt"), "original")
