"""Export runs each loader key map backwards: real checkpoints in every layout dite reads
(built by diffusers / transformers, or renamed by the tests' independent converters) come
back bit for bit, key for key, after checkpoint -> module names -> checkpoint."""

from __future__ import annotations

import pytest
import torch

from dite.engine.errors import CheckpointError
from dite.models import dit, mmdit, pixart
from dite.models.checkpoint import KeyMap, export_state_dict, take
from dite.models.clip import clip_keymap, detect_clip
from dite.models.t5 import T5Config, t5_keymap
from dite.models.vae import vae_keymap
from tiny import dit_to_original, sd3_to_original, tiny_diffusers_dit, tiny_diffusers_sd3_transformer
from tiny import vae_to_ldm as to_ldm
from tiny_encoders import CLIP_COMMON as COMMON, CLIP_TINY, T5_TINY, VAE_TINY, clip_reference, t5_reference
from tiny_encoders import to_openclip, vae_config as our_vae_config, vae_reference


def assert_round_trip(state: dict[str, torch.Tensor], keymap: KeyMap, ignore: set[str]):
    module_state = {name: source.build([state[k] for k in source.keys]) for name, source in keymap.items()}
    back = export_state_dict(keymap, module_state)
    expected = {k: v for k, v in state.items() if k not in ignore}
    assert sorted(back) == sorted(expected)
    for key, tensor in expected.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key


def shapes(state):
    return {k: tuple(v.shape) for k, v in state.items()}


@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_dit(layout):
    model = tiny_diffusers_dit(num_layers=2)
    state = model.state_dict()
    if layout == "original":
        state = dit_to_original(state, depth=2)
    assert_round_trip(state, *dit.keymap(dit.DiTConfig.from_diffusers(model.config), layout))


@pytest.mark.parametrize("options", [{}, {"qk_norm": "rms_norm", "dual_attention_layers": (0,)}])
@pytest.mark.parametrize("layout,prefix", [("diffusers", ""), ("original", "model.diffusion_model.")])
def test_mmdit(options, layout, prefix):
    model = tiny_diffusers_sd3_transformer(num_layers=2, **options)
    state = model.state_dict()
    if layout == "original":
        state = sd3_to_original(state, depth=2, prefix=prefix)
    cfg = mmdit.MMDiTConfig.from_diffusers(model.config)
    assert_round_trip(state, *mmdit.keymap(cfg, layout, prefix))


@pytest.mark.parametrize("kind", ["sd", "sd3"])
@pytest.mark.parametrize("layout,prefix", [("diffusers", ""), ("ldm", "first_stage_model.")])
def test_vae(kind, layout, prefix):
    state = vae_reference(kind).state_dict()
    if layout == "ldm":
        state = {prefix + k: v for k, v in to_ldm(state, len(VAE_TINY[kind]["block_out_channels"])).items()}
    assert_round_trip(state, *vae_keymap(our_vae_config(kind), layout, state.keys(), prefix))


@pytest.mark.parametrize("kind", ["legacy", "eos"])
@pytest.mark.parametrize("layout", ["transformers", "openclip"])
def test_clip(kind, layout):
    state = clip_reference(kind).state_dict()
    if layout == "openclip":
        state = to_openclip(state, COMMON["num_hidden_layers"])
    t = CLIP_TINY[kind]
    config, found = detect_clip(state, shapes(state), heads=4, activation=t["hidden_act"], eos_token_id=t["eos_token_id"])
    assert found == layout
    keymap, ignore = clip_keymap(config, layout, state.keys())
    ignore |= {"logit_scale"}  # OpenCLIP's, not the text model's
    assert_round_trip(state, keymap, ignore)


def test_clip_export_without_keys_writes_transformers_names():
    state = clip_reference("legacy").state_dict()
    t = CLIP_TINY["legacy"]
    config, _ = detect_clip(state, shapes(state), heads=4, activation=t["hidden_act"], eos_token_id=t["eos_token_id"])
    keymap, _ = clip_keymap(config, "transformers", [])
    assert all(k.startswith(("text_model.", "text_projection.")) for s in keymap.values() for k in s.keys)


def test_t5():
    state = t5_reference().state_dict()
    config = T5Config.from_transformers(T5_TINY)
    keymap, ignore = t5_keymap(config, state.keys())
    assert_round_trip(state, keymap, ignore)


@pytest.mark.parametrize("micro", [False, True])
@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_pixart(layout, micro):
    from tiny_pixart import DEPTH, pixart_to_original, tiny_pixart_transformer

    model = tiny_pixart_transformer(micro=micro)
    state = model.state_dict()
    if layout == "original":
        state = pixart_to_original(state, DEPTH, null_caption=torch.zeros(120, 16), pos_embed=torch.zeros(1, 16, 24))
    cfg = pixart.PixArtConfig.from_diffusers(dict(model.config), "alpha")
    assert_round_trip(state, *pixart.keymap(cfg, layout))


def test_disagreeing_state_is_refused():
    with pytest.raises(CheckpointError, match="not in the key map"):
        export_state_dict({"a": take("x")}, {"a": torch.zeros(1), "b": torch.zeros(1)})
