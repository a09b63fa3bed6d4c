"""PixArt transformer parity with diffusers' PixArtTransformer2DModel (tiny random weights,
fp32): α with and without micro-conditions, Σ's interpolation, masks that mask, non-square
grids, and the original layout."""

from __future__ import annotations

import pytest
import torch

from dite.engine.errors import CheckpointError, ConfigError
from dite.engine.loading.weights import StateDictReader, build_module
from dite.models import pixart
from dite.models.denoiser import Conditioning
from tiny_pixart import CAPTION, DEPTH, HEADS, pixart_to_original, tiny_pixart_transformer

TOL = 1e-5


def inputs(batch=3, h=6, w=10, tokens=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, h, w, generator=g)
    t = torch.tensor([999, 500, 3][:batch], dtype=torch.float32)
    context = torch.randn(batch, tokens, CAPTION, generator=g)
    mask = torch.ones(batch, tokens, dtype=torch.long)
    mask[0, 3:] = 0  # captions of different lengths: the mask must matter
    mask[1, 5:] = 0
    sizes = torch.tensor([[h * 8.0, w * 8.0, h / w]]).repeat(batch, 1)
    return x, t, context, mask, sizes


def reference_output(model, x, t, context, mask, sizes):
    added = {"resolution": sizes[:, :2], "aspect_ratio": sizes[:, 2:]} if model.config.use_additional_conditions else None
    with torch.no_grad():
        return model(x, encoder_hidden_states=context, encoder_attention_mask=mask, timestep=t,
                     added_cond_kwargs=added, return_dict=False)[0]


def load_ours(model, variant="alpha", layout="diffusers", state=None):
    cfg = pixart.PixArtConfig.from_diffusers(dict(model.config), variant)
    state = model.state_dict() if state is None else state
    keymap, ignore = pixart.keymap(cfg, layout)
    return build_module(lambda: pixart.PixArt(cfg), keymap, StateDictReader(state, "test"), ignore=ignore)


@pytest.mark.parametrize("micro, variant, interpolation, size", [
    (False, "alpha", None, (6, 10)),     # α-256/512: no micro-conditions, diffusers' fallback interpolation
    (True, "alpha", None, (8, 8)),       # α-1024: micro-conditions, square
    (True, "alpha", None, (6, 10)),
    (False, "sigma", 0.5, (10, 6)),      # Σ-256: interpolation written in the config
])
def test_transformer_matches_diffusers(micro, variant, interpolation, size):
    model = tiny_pixart_transformer(micro=micro, interpolation_scale=interpolation)
    ours = load_ours(model, variant)
    x, t, context, mask, sizes = inputs(h=size[0], w=size[1])
    expected = reference_output(model, x, t, context, mask, sizes)
    cond = Conditioning(context=context, context_mask=mask, pooled=sizes if micro else None)
    with torch.no_grad():
        got = ours(x, t, cond)
    assert got.shape == expected.shape == (3, 8, *size)
    assert (got - expected).abs().max().item() <= TOL


def test_mask_matters_and_padding_is_ignored():
    model = tiny_pixart_transformer()
    ours = load_ours(model)
    x, t, context, mask, _ = inputs()
    changed = context.clone()
    changed[0, 3:] += 5  # only padded tokens of row 0
    with torch.no_grad():
        a = ours(x, t, Conditioning(context=context, context_mask=mask))
        b = ours(x, t, Conditioning(context=changed, context_mask=mask))
        c = ours(x, t, Conditioning(context=context))
    assert torch.equal(a, b)
    assert (a[0] - c[0]).abs().max() > 1e-3


def test_original_layout_loads_with_nothing_missing_or_extra():
    model = tiny_pixart_transformer(micro=True, sample_size=8)
    null = torch.randn(120, CAPTION)
    state = pixart_to_original(model.state_dict(), DEPTH, null_caption=null, pos_embed=torch.zeros(1, 16, 24))
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    cfg = pixart.detect_config(shapes, num_heads=HEADS)
    assert cfg.pixart_version == "alpha" and cfg.micro_conditions and cfg.sample_size == 8 and cfg.learned_sigma
    keymap, ignore = pixart.keymap(cfg, "original")
    ours = build_module(lambda: pixart.PixArt(cfg), keymap, StateDictReader(state, "test"), ignore=ignore)
    # The original's α rule gives interpolation 1 for this size, as diffusers' fallback does.
    assert cfg.interpolation_scale == model.pos_embed.interpolation_scale == 1
    x, t, context, mask, sizes = inputs(h=8, w=8)
    with torch.no_grad():
        got = ours(x, t, Conditioning(context=context, context_mask=mask, pooled=sizes))
    assert (got - reference_output(model, x, t, context, mask, sizes)).abs().max().item() <= TOL


def test_variant_from_null_caption_not_embedders():
    model = tiny_pixart_transformer(micro=False)
    sigma = pixart_to_original(model.state_dict(), DEPTH, null_caption=torch.zeros(300, CAPTION),
                               pos_embed=torch.zeros(1, 64 * 64, 24))
    shapes = {k: tuple(v.shape) for k, v in sigma.items()}
    cfg = pixart.detect_config(shapes, num_heads=HEADS)
    assert cfg.pixart_version == "sigma" and cfg.sample_size == 128 and cfg.interpolation_scale == 2.0
    assert cfg.max_sequence_length == 300
    with pytest.raises(ConfigError, match="PixArt-Σ .*300 rows"):
        pixart.detect_config(shapes, num_heads=HEADS, pixart_version="alpha")
    del shapes["y_embedder.y_embedding"]
    with pytest.raises(ConfigError, match="cannot be told apart"):
        pixart.detect_config(shapes, num_heads=HEADS)
    assert pixart.detect_config(shapes, num_heads=HEADS, pixart_version="alpha").interpolation_scale == 2.0
    shapes["y_embedder.y_embedding"] = (77, CAPTION)
    with pytest.raises(CheckpointError, match="77 rows"):
        pixart.detect_config(shapes, num_heads=HEADS)


@pytest.mark.parametrize("variant, sample_size, expected", [
    ("alpha", 32, 1.0), ("alpha", 64, 1.0), ("alpha", 128, 2.0),
    ("sigma", 32, 0.5), ("sigma", 64, 1.0), ("sigma", 128, 2.0), ("sigma", 256, 4.0)])
def test_family_interpolation(variant, sample_size, expected):
    assert pixart.family_interpolation(variant, sample_size) == expected


def test_config_round_trip_and_diffusers_fallbacks():
    model = tiny_pixart_transformer(micro=True, interpolation_scale=0.5)
    cfg = pixart.PixArtConfig.from_diffusers(dict(model.config), "sigma")
    assert pixart.PixArtConfig.from_diffusers(cfg.to_diffusers(), "sigma") == cfg
    bare = {k: v for k, v in cfg.to_diffusers().items() if k not in ("interpolation_scale", "use_additional_conditions")}
    fallback = pixart.PixArtConfig.from_diffusers({**bare, "sample_size": 128}, "alpha")
    assert fallback.interpolation_scale == 2.0 and fallback.micro_conditions


def test_micro_conditions_are_required():
    model = tiny_pixart_transformer(micro=True)
    ours = load_ours(model)
    x, t, context, mask, _ = inputs()
    with pytest.raises(ConfigError, match="micro-conditions"):
        ours(x, t, Conditioning(context=context, context_mask=mask))
