"""T5 encoder parity with transformers' T5EncoderModel: layouts, masks, fp8 files, half precision."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import transformers

from dite.engine.errors import CheckpointError, ConfigError
from dite.engine.loading.text_encoders import load_t5
from dite.models.t5 import T5Config, detect_t5, relative_position_buckets
from tiny_encoders import T5_TINY as TINY, t5_reference as reference

TOL = 1e-5  # the contract; on CPU fp32 the outputs are bit-identical today
OURS = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=40, layers=3, heads=3)
T = 24  # beyond 8 positions, so log-spaced buckets are used


@pytest.fixture(scope="module")
def ref():
    return reference()


@pytest.fixture(scope="module")
def folder(ref, tmp_path_factory):
    path = tmp_path_factory.mktemp("t5")
    ref.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def state(folder):
    return load_file(folder / "model.safetensors")


def inputs():
    ids = torch.randint(0, 64, (2, T), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, 15:] = 0  # PixArt-style padding on the second prompt
    return ids, mask


def assert_matches(model, ref, tol=TOL):
    ids, mask = inputs()
    with torch.no_grad():
        for m in (None, mask):
            expected = ref(input_ids=ids, attention_mask=m).last_hidden_state
            assert (model(ids, m).float() - expected.float()).abs().max() <= tol


def test_buckets_match_transformers():
    rel = torch.arange(300)[None, :] - torch.arange(300)[:, None]
    theirs = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(rel, True, 32, 128)
    assert torch.equal(relative_position_buckets(300, 32, 128), theirs)


def test_transformers_folder_matches_reference(ref, folder, state):
    assert "encoder.embed_tokens.weight" not in state  # transformers saves the tied table once
    model = load_t5(folder)
    assert model.config == OURS
    assert_matches(model, ref)


def test_mask_changes_only_what_it_should(folder):
    model = load_t5(folder)
    ids, mask = inputs()
    with torch.no_grad():
        plain, masked = model(ids), model(ids, mask)
    assert torch.equal(plain[0], masked[0]) and not torch.allclose(plain[1], masked[1])


@pytest.mark.parametrize("stored", [("encoder.embed_tokens.weight",), ("shared.weight", "encoder.embed_tokens.weight")])
def test_embedding_under_either_name_and_prefix(ref, state, tmp_path, stored):
    table = state["shared.weight"]
    bundle = {k: v for k, v in state.items() if k != "shared.weight"}
    bundle.update({name: table.clone() for name in stored})
    prefix = "text_encoders.t5xxl.transformer."
    bundle = {prefix + k: v for k, v in bundle.items()}
    bundle["model.diffusion_model.pos_embed"] = torch.zeros(1, 4)  # the rest of an SD3 file
    save_file(bundle, tmp_path / "sd3.safetensors")
    assert_matches(load_t5(tmp_path / "sd3.safetensors"), ref)


def test_untied_embedding_copies_are_refused(state, tmp_path):
    save_file({**state, "encoder.embed_tokens.weight": state["shared.weight"] + 1}, tmp_path / "t5.safetensors")
    with pytest.raises(CheckpointError, match="differs"):
        load_t5(tmp_path / "t5.safetensors")


def test_fp8_file_is_upcast(state, tmp_path):
    fp8 = {k: v.to(torch.float8_e4m3fn) for k, v in state.items()}
    save_file(fp8, tmp_path / "t5xxl_fp8_e4m3fn.safetensors")
    ref = transformers.T5EncoderModel(transformers.T5Config(**TINY)).eval()
    ref.load_state_dict({k: v.float() for k, v in fp8.items()}, strict=False)  # same fp8-rounded weights
    ref.encoder.embed_tokens.weight = ref.shared.weight
    model = load_t5(tmp_path / "t5xxl_fp8_e4m3fn.safetensors")
    assert model.blocks[0].ff.wo.weight.dtype == torch.float32
    assert_matches(model, ref)


def test_bf16_is_close_to_fp32(ref, folder):
    model = load_t5(folder, dtype=torch.bfloat16)
    assert model.blocks[0].attn.q.weight.dtype == torch.bfloat16
    assert_matches(model, ref, tol=0.1)  # outputs are RMS-normalised, O(1)
    theirs = transformers.T5EncoderModel.from_pretrained(folder, dtype=torch.bfloat16).eval()
    assert_matches(model, theirs, tol=0.0)  # and transformers' own bf16 run, bit for bit


def test_fp16_keeps_wo_in_fp32_and_survives_overflow(state, tmp_path):
    # Scale the feed-forward output past fp16's range (65504), as T5-XXL's activations go.
    big = {k: v * 50000 if k.endswith("wo.weight") else v for k, v in state.items()}
    save_file(big, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({**TINY, "architectures": ["T5EncoderModel"]}))
    model = load_t5(tmp_path, dtype=torch.float16)
    assert model.blocks[0].ff.wo.weight.dtype == torch.float32
    assert model.blocks[0].ff.wi_0.weight.dtype == torch.float16
    theirs = transformers.T5EncoderModel.from_pretrained(tmp_path, dtype=torch.float16).eval()
    assert theirs.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    ids, _ = inputs()
    with torch.no_grad():
        out = model(ids)
        assert torch.isfinite(out).all()
        assert torch.equal(out, theirs(input_ids=ids).last_hidden_state)
        all_half = load_t5(tmp_path, dtype=torch.float16).half()  # wo in fp16 too: overflows
        assert not torch.isfinite(all_half.blocks[0].ff(all_half.blocks[0].ff_norm(all_half.embed_tokens(ids)))).all()


def test_detect_xxl_from_shapes():
    shapes = {"shared.weight": (32128, 4096), "encoder.final_layer_norm.weight": (4096,)}
    for i in range(24):
        b = f"encoder.block.{i}.layer."
        shapes[b + "0.SelfAttention.q.weight"] = (4096, 4096)
        shapes[b + "1.DenseReluDense.wi_0.weight"] = (10240, 4096)
    shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = (32, 64)
    assert detect_t5(shapes, shapes) == T5Config.t5_xxl()


def test_t5_v1_0_is_refused(state, tmp_path):
    with pytest.raises(ConfigError, match="gated-gelu"):
        T5Config.from_transformers({**TINY, "feed_forward_proj": "relu"})
    v10 = {k.replace("wi_0", "wi"): v for k, v in state.items() if "wi_1" not in k}
    save_file(v10, tmp_path / "t5.safetensors")
    with pytest.raises(CheckpointError, match="v1.0"):
        load_t5(tmp_path / "t5.safetensors")


def test_clip_file_is_refused_with_what_it_is(tmp_path):
    save_file({"text_model.embeddings.token_embedding.weight": torch.zeros(8, 4),
               "text_model.encoder.layers.0.self_attn.q_proj.weight": torch.zeros(4, 4)}, tmp_path / "clip.safetensors")
    with pytest.raises(CheckpointError, match="looks like a CLIP text model"):
        load_t5(tmp_path / "clip.safetensors")
