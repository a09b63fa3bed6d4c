"""CLIP text encoder parity with transformers, in the transformers and OpenCLIP layouts."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import transformers

from dite.engine.errors import CheckpointError, ConfigError
from dite.engine.loading.text_encoders import load_clip
from dite.models.clip import CLIPTextConfig, detect_clip
from tiny_encoders import CLIP_COMMON as COMMON, CLIP_TINY as TINY, clip_reference as reference, to_openclip

TOL = 1e-5  # the contract; on CPU fp32 the outputs are bit-identical today


def token_ids(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 97, (3, 12), generator=g)
    eos = 98 if kind == "legacy" else 97
    for row, end in enumerate((4, 11, 7)):
        ids[row, end:] = eos  # padded with EOS: only the first one may be pooled
    if kind == "eos":
        ids[0, 1] = 98  # a larger id before EOS: argmax pooling would pick it
    return ids


def expected(ref, ids):
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
        pooled = ref.text_model(ids).pooler_output
    return out.last_hidden_state, out.hidden_states, pooled, out.text_embeds


def assert_matches(model, ref, ids, projected=True):
    last, states, pooled, embeds = expected(ref, ids)
    with torch.no_grad():
        out = model(ids)
    assert len(out.hidden_states) == len(states) == COMMON["num_hidden_layers"] + 1
    for ours, theirs in zip(out.hidden_states, states):
        assert (ours - theirs).abs().max() <= TOL
    assert (out.hidden_states[-2] - states[-2]).abs().max() <= TOL  # SD3's features, before the final LN
    assert (out.last_hidden_state - last).abs().max() <= TOL
    assert (out.pooled - pooled).abs().max() <= TOL
    if projected:
        assert (out.projected - embeds).abs().max() <= TOL
    else:
        assert out.projected is None


@pytest.fixture(scope="module", params=sorted(TINY))
def kind(request):
    return request.param


@pytest.fixture(scope="module")
def ref(kind):
    return reference(kind)


@pytest.fixture(scope="module")
def folder(ref, kind, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"clip_{kind}")
    ref.save_pretrained(path)
    return path


def our_config(kind: str) -> CLIPTextConfig:
    t = TINY[kind]
    return CLIPTextConfig(vocab_size=99, width=32, layers=3, heads=4, max_positions=12, activation=t["hidden_act"],
                          projection_dim=t["projection_dim"], eos_token_id=t["eos_token_id"], intermediate_size=40)


def test_transformers_folder_matches_reference(kind, ref, folder):
    model = load_clip(folder)
    assert model.config == our_config(kind)
    assert_matches(model, ref, token_ids(kind))


def test_plain_text_model_saved_flat_has_no_projection(kind, ref, tmp_path):
    # transformers >= 5.6 saves CLIPTextModel without the `text_model.` wrapper.
    plain = transformers.CLIPTextModel(ref.config)
    plain.load_state_dict(ref.text_model.state_dict())
    plain.eval().save_pretrained(tmp_path)
    assert not any(k.startswith("text_model.") for k in load_file(tmp_path / "model.safetensors"))
    model = load_clip(tmp_path)
    assert model.text_projection is None
    assert_matches(model, ref, token_ids(kind), projected=False)


def test_sd3_single_file_prefix_and_position_ids(kind, ref, folder, tmp_path):
    state = load_file(folder / "model.safetensors")
    state["text_model.embeddings.position_ids"] = torch.arange(12)[None]  # old saves carry it
    bundle = {f"text_encoders.clip_g.transformer.{k}": v for k, v in state.items()}
    # The other tower has the same names and shapes but other values: loading it would show.
    bundle.update({f"text_encoders.clip_l.transformer.{k}": torch.zeros_like(v) for k, v in state.items()})
    bundle["model.diffusion_model.x_embedder.proj.weight"] = torch.zeros(2, 2)
    save_file(bundle, tmp_path / "sd3.safetensors")
    with pytest.raises(CheckpointError, match="several CLIP"):
        load_clip(tmp_path / "sd3.safetensors", config=our_config(kind))
    model = load_clip(tmp_path / "sd3.safetensors", config=our_config(kind), prefix="text_encoders.clip_g.transformer.")
    assert_matches(model, ref, token_ids(kind))


def test_openclip_layout_matches_reference(kind, ref, folder, tmp_path):
    state = to_openclip(load_file(folder / "model.safetensors"), COMMON["num_hidden_layers"])
    save_file(state, tmp_path / "open_clip.safetensors")
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    t = TINY[kind]
    config, layout = detect_clip(state, shapes, heads=4, activation=t["hidden_act"], eos_token_id=t["eos_token_id"])
    assert (config, layout) == (our_config(kind), "openclip")
    model = load_clip(tmp_path / "open_clip.safetensors", config=config)
    assert_matches(model, ref, token_ids(kind))


def test_detect_released_towers_from_shapes():
    def hf_shapes(width, layers, proj):
        s = {"text_model.embeddings.token_embedding.weight": (49408, width),
             "text_model.embeddings.position_embedding.weight": (77, width), "text_projection.weight": (proj, width)}
        for i in range(layers):
            s[f"text_model.encoder.layers.{i}.self_attn.q_proj.weight"] = (width, width)
            s[f"text_model.encoder.layers.{i}.mlp.fc1.weight"] = (4 * width, width)
        return s

    for preset, (width, layers) in ((CLIPTextConfig.clip_l(), (768, 12)), (CLIPTextConfig.clip_g(), (1280, 32))):
        shapes = hf_shapes(width, layers, width)
        assert detect_clip(shapes, shapes) == (preset, "transformers")
    odd = hf_shapes(96, 2, 96)
    with pytest.raises(ConfigError, match="heads"):
        detect_clip(odd, odd)


def test_from_transformers_config(kind, folder):
    import json

    assert CLIPTextConfig.from_transformers(json.loads((folder / "config.json").read_text())) == our_config(kind)


def test_t5_file_is_refused_with_what_it_is(tmp_path):
    save_file({"shared.weight": torch.zeros(8, 4), "encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(4, 4)},
              tmp_path / "t5.safetensors")
    with pytest.raises(CheckpointError, match="looks like a T5 encoder"):
        load_clip(tmp_path / "t5.safetensors")
