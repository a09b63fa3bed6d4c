"""Text-encoder LoRAs on SD3 (engine/lora, docs/lora.md): CLIP-L/CLIP-G parity with diffusers'
load_lora_weights, the same weights in kohya keys (lora_te1_/lora_te2_), T5 (lora_te3_) against
peft on transformers' T5, exact unload, refusals."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from dite.engine import load
from dite.engine.lora import LoraError, read_lora
from tiny_lora import PROMPTS, dite_lora_call
from tiny_lora import diffusers_lora_images as diffusers_images
from tiny_sd3 import reference_images

CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
T5_TARGETS = ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]
KOHYA_PREFIX = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_", "text_encoder_3": "lora_te3_",
                "transformer": "lora_unet_"}


def randomised_adapter(model, config, seed):
    """A copy of `model` with a peft LoRA whose B weights are random too (so it changes outputs)."""
    adapted = copy.deepcopy(model)
    adapted.add_adapter(config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    return adapted


@pytest.fixture(scope="module")
def clip_lora(sd3, tmp_path_factory):
    """Rank-4 LoRAs on both CLIPs (alpha 8 on CLIP-L, 4 on CLIP-G), saved by diffusers'
    StableDiffusion3Pipeline.save_lora_weights with both adapter configs (diffusers' loader
    needs either both or none)."""
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    reference, _ = sd3
    config_l = LoraConfig(r=4, lora_alpha=8, target_modules=CLIP_TARGETS)
    config_g = LoraConfig(r=4, lora_alpha=4, target_modules=CLIP_TARGETS)
    clip_l = randomised_adapter(reference.text_encoder, config_l, 11)
    clip_g = randomised_adapter(reference.text_encoder_2, config_g, 12)
    folder = tmp_path_factory.mktemp("te-lora")
    StableDiffusion3Pipeline.save_lora_weights(
        folder, text_encoder_lora_layers=get_peft_model_state_dict(clip_l),
        text_encoder_2_lora_layers=get_peft_model_state_dict(clip_g),
        text_encoder_lora_adapter_metadata=config_l.to_dict(), text_encoder_2_lora_adapter_metadata=config_g.to_dict())
    return folder / "pytorch_lora_weights.safetensors"


def to_kohya(path, out, alphas):
    """The test's own converter: <component>.<module>.lora_A/B -> sd-scripts' SD3 names
    (lora_te1_<module with _>.lora_down/up + .alpha), `alphas` per component."""
    kohya = {}
    for key, tensor in load_file(str(path)).items():
        component, rest = key.split(".", 1)
        module, part = rest.rsplit(".lora_", 1)
        stem = KOHYA_PREFIX[component] + module.replace(".", "_")
        kohya[f"{stem}.lora_{'down' if part.startswith('A') else 'up'}.weight"] = tensor
        kohya[f"{stem}.alpha"] = torch.tensor(float(alphas[component]))
    save_file(kohya, str(out))
    return out


def test_clip_loras_match_diffusers_and_kohya(sd3, clip_lora, tmp_path):
    reference, folder = sd3
    lora = read_lora(clip_lora)
    assert lora.components == {"text_encoder", "text_encoder_2"}
    alphas = {component: pair.alpha for (component, _), pair in lora.pairs.items()}
    assert alphas == {"text_encoder": 8.0, "text_encoder_2": 4.0}  # each from its own config in the metadata
    assert any(module.startswith("text_model.encoder.layers.1.mlp.fc2") for _, module in lora.pairs)
    expected, latents = diffusers_images(reference, clip_lora)
    plain, _ = reference_images(reference, PROMPTS, None, 3, 1.0, (16, 16), seed=5, max_sequence_length=16)
    assert np.abs(expected - plain).max() > 1e-2  # the text-encoder LoRA changes the images
    ours_diffusers = ours(load(folder, loras=[(clip_lora, 1.0)]), latents)
    assert np.abs(ours_diffusers - expected).max() <= 1e-4
    kohya = to_kohya(clip_lora, tmp_path / "kohya.safetensors", {"text_encoder": 8, "text_encoder_2": 4})
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_self_attn_q_proj.") for k in load_file(kohya))
    assert np.abs(ours(load(folder, loras=[(kohya, 1.0)]), latents) - expected).max() <= 1e-4


def test_clip_keys_without_the_text_model_wrapper(sd3, clip_lora, tmp_path):
    """Savers that drop transformers' `text_model.` wrapper name the same modules."""
    _, folder = sd3
    flat = {k.replace(".text_model.", "."): v for k, v in load_file(str(clip_lora)).items()}
    path = tmp_path / "flat.safetensors"
    save_file(flat, str(path), metadata={"lora_adapter_metadata": '{"text_encoder.lora_alpha": 8}'})
    _, latents = reference_images(sd3[0], PROMPTS, None, 1, 1.0, (16, 16), seed=5, max_sequence_length=16)
    a = ours(load(folder, loras=[(clip_lora, 1.0)]), latents)
    b = ours(load(folder, loras=[(path, 1.0)]), latents)
    assert np.array_equal(a, b)


def test_t5_lora_kohya_matches_peft_on_transformers_t5(sd3, tmp_path):
    """diffusers' SD3 loader takes no T5 LoRA; the reference is its pipeline with peft's
    LoRA injected into transformers' T5 (unmerged forward), the file written in sd-scripts'
    lora_te3_ names (train_t5xxl), alpha 2 on rank 4."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    reference, folder = sd3
    adapted = randomised_adapter(reference.text_encoder_3, LoraConfig(r=4, lora_alpha=2, target_modules=T5_TARGETS), 13)
    peft_file = tmp_path / "t5_peft.safetensors"
    save_file({f"text_encoder_3.{k}": v.contiguous() for k, v in get_peft_model_state_dict(adapted).items()},
              str(peft_file))
    kohya = to_kohya(peft_file, tmp_path / "t5_kohya.safetensors", {"text_encoder_3": 2})
    assert any(k.startswith("lora_te3_encoder_block_0_layer_1_DenseReluDense_wi_0.") for k in load_file(kohya))
    plain, latents = reference_images(reference, PROMPTS, None, 3, 1.0, (16, 16), seed=5, max_sequence_length=16)
    base, reference.text_encoder_3 = reference.text_encoder_3, adapted
    try:
        expected, _ = reference_images(reference, PROMPTS, None, 3, 1.0, (16, 16), seed=5, max_sequence_length=16)
    finally:
        reference.text_encoder_3 = base
    assert np.abs(expected - plain).max() > 1e-2
    assert np.abs(ours(load(folder, loras=[(kohya, 1.0)]), latents) - expected).max() <= 1e-4


def test_unload_restores_text_encoders_bit_for_bit_and_fingerprint(sd3, clip_lora, tmp_path):
    _, folder = sd3
    pipe = load(folder, dtype="float16")
    encoders = {"clip_l": pipe.text.clip_l, "clip_g": pipe.text.clip_g, "t5": pipe.text.t5}
    before = {(e, n): p.detach().clone() for e, m in encoders.items() for n, p in m.named_parameters()}
    plain_id = pipe.model_id
    kohya = to_kohya(clip_lora, tmp_path / "kohya.safetensors", {"text_encoder": 8, "text_encoder_2": 4})
    pipe.load_lora(clip_lora, 0.5)
    assert pipe.model_id != plain_id  # plans calibrated on the plain encoders are not reused
    pipe.load_lora(kohya, -0.7, name="second")
    changed = [k for k in before if not torch.equal(dict(encoders[k[0]].named_parameters())[k[1]], before[k])]
    assert len(changed) == 2 * 2 * 6  # 2 CLIPs x 2 layers x (q, k, v, out, fc1, fc2)
    pipe.unload_lora(clip_lora.stem)
    pipe.unload_lora("second")
    for (e, n), value in before.items():
        assert torch.equal(dict(encoders[e].named_parameters())[n], value), (e, n)
    assert pipe._lora_state.originals == {} and pipe.model_id == plain_id


def rewrite(tensors, pattern, replace):
    return {re.sub(pattern, replace, k): v for k, v in tensors.items()}


def test_text_encoder_refusals(sd3, clip_lora, tmp_path):
    _, folder = sd3
    pipe = load(folder)
    before = {n: p.detach().clone() for n, p in pipe.text.clip_l.named_parameters()}
    tensors = load_file(str(clip_lora))
    key_a = next(k for k in tensors if k.startswith("text_encoder.") and k.endswith("q_proj.lora_A.weight"))
    key_b = key_a.replace("lora_A", "lora_B")
    cases = {
        "unknown": (rewrite(tensors, r"layers\.1\.", "layers.7."), r"text_encoder .*does not have .*layers\.7"),
        "shape": ({**tensors, key_a: torch.ones(4, 11)}, r"text_encoder\.text_model.*q_proj is \(8, 8\) .* \(8, 11\)"),
        "rank": ({**tensors, key_b: torch.ones(8, 5)}, "rank 4 .* but 5"),
        "sd1": (rewrite(load_file(to_kohya(clip_lora, tmp_path / "k.safetensors", {"text_encoder": 8, "text_encoder_2": 4})),
                        r"^lora_te1_", "lora_te_"), "an SD 1.x/2.x LoRA"),
    }
    for case, (content, message) in cases.items():
        path = tmp_path / f"{case}.safetensors"
        save_file(content, str(path))
        with pytest.raises(LoraError, match=message):
            pipe.load_lora(path)
    t5 = tmp_path / "t5.safetensors"
    save_file({"lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight": torch.ones(2, 24),
               "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight": torch.ones(24, 2)}, str(t5))
    with pytest.raises(LoraError, match="loaded without it"):
        load(folder, text_encoder_3=None).load_lora(t5)
    with pytest.raises(LoraError, match="release_encoders"):
        load(folder, release_encoders=True).load_lora(clip_lora)
    for n, p in pipe.text.clip_l.named_parameters():
        assert torch.equal(p, before[n]), n
    # Merged at load time, before the encoders are released, it works; unloading after the
    # release restores the denoiser and forgets the dropped encoders' originals.
    released = load(folder, release_encoders=True, loras=[(clip_lora, 1.0)])
    released(prompt="a", height=16, width=16, num_inference_steps=1, max_sequence_length=8, output_type="latent",
             progress=False)
    assert released.text.clip_l is None and released._lora_state.originals
    released.unload_lora()
    assert released._lora_state.originals == {} and not released._lora_state.loaded


def test_text_encoder_lora_refused_on_pixart(clip_lora, tmp_path_factory):
    from tiny_pixart import tiny_pixart_pipeline

    _, folder = tiny_pixart_pipeline(tmp_path_factory.mktemp("pixart-te"))
    with pytest.raises(LoraError, match="SD3's CLIP-L, CLIP-G and T5 only; this is a pixart pipeline"):
        load(folder).load_lora(clip_lora)


def test_cli_generate_with_text_encoder_lora(sd3, clip_lora, tmp_path):
    import json

    from PIL import Image

    from dite.engine.cli import main

    _, folder = sd3
    out = tmp_path / "te.png"
    assert main(["generate", "--model", str(folder), "a boat", "--lora", f"{clip_lora}:0.5", "--steps", "2",
                 "--seed", "2", "--size", "16x16", "-o", str(out), "--quiet"]) == 0
    assert json.loads(Image.open(out).text["dite"])["loras"][0]["scale"] == 0.5
    lib = load(folder, loras=[(clip_lora, 0.5)])(prompt="a boat", height=16, width=16, num_inference_steps=2,
                                                 seed=2, output_type="np", progress=False)
    assert np.abs(np.asarray(Image.open(out), dtype=np.float32) / 255 - lib.images[0]).max() <= 1 / 255 + 1e-6


def test_one_file_for_transformer_and_text_encoders_matches_diffusers(sd3, tmp_path):
    """What diffusers' SD3 DreamBooth-LoRA training saves with --train_text_encoder: the
    transformer's and both CLIPs' LoRAs in one file, each with its adapter config."""
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    reference, folder = sd3
    configs = {"transformer": LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
               "text_encoder": LoraConfig(r=2, lora_alpha=1, target_modules=CLIP_TARGETS),
               "text_encoder_2": LoraConfig(r=4, lora_alpha=2, target_modules=["q_proj", "v_proj"])}
    modules = {"transformer": reference.transformer, "text_encoder": reference.text_encoder,
               "text_encoder_2": reference.text_encoder_2}
    layers = {name: get_peft_model_state_dict(randomised_adapter(modules[name], configs[name], 20 + i))
              for i, name in enumerate(configs)}
    StableDiffusion3Pipeline.save_lora_weights(
        tmp_path, **{f"{name}_lora_layers": value for name, value in layers.items()},
        **{f"{name}_lora_adapter_metadata": configs[name].to_dict() for name in configs})
    path = tmp_path / "pytorch_lora_weights.safetensors"
    assert read_lora(path).components == {"transformer", "text_encoder", "text_encoder_2"}
    expected, latents = diffusers_images(reference, path)
    assert np.abs(ours(load(folder, loras=[(path, 1.0)]), latents) - expected).max() <= 1e-4


def test_cli_low_memory_with_a_text_encoder_lora(sd3, clip_lora, tmp_path):
    """--low-memory releases the encoders after encoding; the LoRA is merged before that."""
    from PIL import Image

    from dite.engine.cli import main

    _, folder = sd3
    argv = ["generate", "--model", str(folder), "a boat", "--lora", str(clip_lora), "--steps", "2", "--seed", "2",
            "--size", "16x16", "--quiet"]
    assert main(argv + ["--low-memory", "-o", str(tmp_path / "low.png")]) == 0
    assert main(argv + ["-o", str(tmp_path / "full.png")]) == 0
    plain = tmp_path / "plain.png"
    assert main(argv[:4] + argv[6:] + ["-o", str(plain)]) == 0
    low, full = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("low", "full"))
    assert np.array_equal(low, full) and not np.array_equal(full, np.asarray(Image.open(plain)))


def ours(pipe, latents):
    return dite_lora_call(pipe, latents).images
