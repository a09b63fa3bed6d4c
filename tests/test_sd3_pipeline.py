"""The whole SD3 text-to-image pipeline against diffusers' StableDiffusion3Pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import sentencepiece as spm
import torch
import transformers

from dite.engine import load
from dite.engine.errors import InputError
from test_tokenizers import _fields, t5_training_text, train_clip_files
from tiny import tiny_diffusers_sd3_transformer, tiny_diffusers_vae


def clip_config(projection):
    return transformers.CLIPTextConfig(vocab_size=1000, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                                       num_attention_heads=2, projection_dim=projection, max_position_embeddings=77,
                                       hidden_act="quick_gelu", eos_token_id=2)


def t5_tokenizer(folder):
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(t5_training_text()), model_prefix=str(folder / "spiece"), model_type="unigram",
        vocab_size=700, hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2, num_threads=2)
    sp = spm.SentencePieceProcessor(model_file=str(folder / "spiece.model"))
    normalizer = next(v for n, v in _fields(sp.serialized_model_proto()) if n == 3)
    charsmap = next(v for n, v in _fields(normalizer) if n == 2)
    return transformers.T5Tokenizer(vocab=[(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())],
                                    _spm_precompiled_charsmap=charsmap)


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    """A tiny StableDiffusion3Pipeline saved in diffusers' layout; returns (reference, folder)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    root = tmp_path_factory.mktemp("sd3")
    train_clip_files(root / "vocab")
    tok_l = transformers.CLIPTokenizer(str(root / "vocab/vocab.json"), str(root / "vocab/merges.txt"), model_max_length=77)
    tok_g = transformers.CLIPTokenizer(str(root / "vocab/vocab.json"), str(root / "vocab/merges.txt"), pad_token="!",
                                     model_max_length=77)
    (root / "spm").mkdir()
    torch.manual_seed(0)
    t5 = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=760, d_model=24, d_kv=8, d_ff=32, num_layers=2, num_heads=3, feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=8, relative_attention_max_distance=16)).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=tiny_diffusers_sd3_transformer(qk_norm="rms_norm"),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_diffusers_vae(latent_channels=4, use_quant_conv=False, use_post_quant_conv=False,
                               scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=transformers.CLIPTextModelWithProjection(clip_config(10)).eval(), tokenizer=tok_l,
        text_encoder_2=transformers.CLIPTextModelWithProjection(clip_config(10)).eval(), tokenizer_2=tok_g,
        text_encoder_3=t5, tokenizer_3=t5_tokenizer(root / "spm"),
    )
    pipe.save_pretrained(root / "pipe")
    pipe.set_progress_bar_config(disable=True)
    return pipe, root / "pipe"


def reference_images(pipe, prompts, negative, steps, guidance, size, seed, **kwargs):
    h, w = size
    latents = torch.randn(len(prompts), 4, h // 2, w // 2, generator=torch.Generator().manual_seed(seed))
    images = pipe(prompt=prompts, negative_prompt=negative, height=h, width=w, num_inference_steps=steps,
                  guidance_scale=guidance, latents=latents.clone(), output_type="np", **kwargs).images
    return images, latents


@pytest.mark.parametrize("guidance, size", [(5.0, (16, 24)), (1.0, (16, 16))])
def test_pipeline_matches_diffusers(sd3, guidance, size):
    reference, folder = sd3
    prompts = ["a red circle at the top left", "A small BLUE square, on the right!"]
    negative = ["blurry", ""] if guidance > 1 else None
    expected, latents = reference_images(reference, prompts, negative, 4, guidance, size, seed=3,
                                         max_sequence_length=20)
    pipe = load(folder)
    out = pipe(prompt=prompts, negative_prompt=negative, height=size[0], width=size[1], num_inference_steps=4,
               guidance_scale=guidance, latents=latents.clone(), max_sequence_length=20, output_type="np",
               progress=False)
    assert out.images.shape == expected.shape == (2, size[0], size[1], 3)
    assert np.abs(out.images - expected).max() <= 1e-4


def test_prompt_embeddings_match(sd3):
    reference, folder = sd3
    prompts = ["", "a green triangle", "x " * 300]
    with torch.no_grad():
        ctx, _, pooled, _ = reference.encode_prompt(prompts, prompts, prompts, do_classifier_free_guidance=False,
                                                    max_sequence_length=30)
    with pytest.warns(UserWarning, match="77"):
        ours_ctx, ours_pooled = load(folder).text.encode(prompts, 30)
    assert ours_ctx.shape == ctx.shape == (3, 77 + 30, 24)
    assert (ours_ctx - ctx).abs().max().item() <= 1e-5 and (ours_pooled - pooled).abs().max().item() <= 1e-5


def test_without_t5_its_tokens_are_zeros(sd3):
    reference, folder = sd3
    pipe = load(folder, text_encoder_3=None)
    assert pipe.text.t5 is None
    ctx, _ = pipe.text.encode(["a cat"], 16)
    assert ctx.shape == (1, 77 + 16, 24) and torch.count_nonzero(ctx[:, 77:]) == 0
    out = pipe(prompt="a cat", height=16, width=16, num_inference_steps=2, output_type="np", progress=False)
    assert np.isfinite(out.images).all()


def test_images_per_prompt_and_seeds(sd3):
    _, folder = sd3
    out = load(folder)(prompt=["a", "b"], num_images_per_prompt=2, height=16, width=16, num_inference_steps=2,
                       seed=7, output_type="latent", progress=False)
    assert out.latents.shape[0] == 4
    assert [(p["prompt"], p["seed"]) for p in out.parameters] == [("a", 7), ("a", 8), ("b", 9), ("b", 10)]


@pytest.mark.parametrize("kwargs, message", [
    (dict(height=18), "height 18 must be a positive multiple of 4"),
    (dict(prompt=[]), "prompt must be"),
    (dict(negative_prompt=["a", "b"]), "2 negative prompts for 1 prompts"),
])
def test_bad_arguments(sd3, kwargs, message):
    _, folder = sd3
    args = dict(prompt="a cat", height=16, width=16, num_inference_steps=1, progress=False)
    args.update(kwargs)
    with pytest.raises(InputError, match=message):
        load(folder)(**args)


def test_cli_text_to_image(sd3, tmp_path, capsys):
    from PIL import Image

    from dite.engine.cli import main

    _, folder = sd3
    out = tmp_path / "sd3.png"
    assert main(["generate", "--model", str(folder), "a red circle", "a blue square", "--negative-prompt", "blur",
                 "--size", "24x16", "--steps", "2", "--guidance", "5", "--seed", "3", "--no-t5", "-o", str(out),
                 "--quiet"]) == 0
    paths = [tmp_path / "sd3-0.png", tmp_path / "sd3-1.png"]
    assert capsys.readouterr().out.split() == [str(p) for p in paths]
    params = json.loads(Image.open(paths[1]).text["dite"])
    assert params["prompt"] == "a blue square" and params["negative_prompt"] == "blur" and params["seed"] == 4
    assert params["t5"] is False and params["size"] == "24x16" and params["scheduler"] == "flow_euler"
    assert Image.open(paths[0]).size == (24, 16)
    assert main(["generate", "--model", str(folder), "--class-label", "3"]) == 2
    assert "text-to-image" in capsys.readouterr().err
