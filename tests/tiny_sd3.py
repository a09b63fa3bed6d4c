"""The tiny SD3 pipeline of the SD3 tests: diffusers' folder layout and the original releases.

`tiny_sd3_pipeline` saves a StableDiffusion3Pipeline folder. `write_release` writes the
same weights as Stability's single files name them (docs/checkpoints.md §1.1-1.2): the
MMDiT under `model.diffusion_model.`, the VAE under `first_stage_model.` in LDM names, and
the text encoders in transformers' names, either beside the model file in
`text_encoders/{clip_l,clip_g,t5xxl_fp16}.safetensors` or bundled into it under
`text_encoders.{clip_l,clip_g,t5xxl}.transformer.`. The renames are the test's own
(tests/tiny.py), not dite's key maps.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tiny import sd3_to_original, tiny_diffusers_sd3_transformer, tiny_diffusers_vae, vae_to_ldm

DEPTH = 3  # tiny_diffusers_sd3_transformer's default
BUNDLED_PREFIX = {"clip_l": "text_encoders.clip_l.transformer.", "clip_g": "text_encoders.clip_g.transformer.",
                  "t5xxl": "text_encoders.t5xxl.transformer."}
FOLDER_OF = {"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5xxl": "text_encoder_3"}


def clip_config(width: int, projection: int):
    import transformers

    return transformers.CLIPTextConfig(vocab_size=1000, hidden_size=width, intermediate_size=2 * width,
                                       num_hidden_layers=2, num_attention_heads=2, projection_dim=projection,
                                       max_position_embeddings=77, hidden_act="quick_gelu", eos_token_id=2)


def tiny_sd3_pipeline(root: Path):
    """A tiny StableDiffusion3Pipeline saved at root/"pipe"; returns (reference in eval mode, folder).

    CLIP-L's projection is the identity: the single files carry none (or one that nobody
    applies), and diffusers' single-file loader installs an identity in its place, so with
    it the folder and the single files describe the same model. The two CLIPs differ in
    width (8 and 12, as 768 and 1280 do), which diffusers' single-file loader relies on to
    tell them apart; pooled: 8 + 12 = 20, hidden states 8 + 12 padded to T5's 24.
    """
    import transformers
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from tiny_tokenizers import t5_reference_tokenizer, train_clip_files, train_t5_spiece

    train_clip_files(root / "vocab")
    vocab, merges = str(root / "vocab/vocab.json"), str(root / "vocab/merges.txt")
    tok_l = transformers.CLIPTokenizer(vocab, merges, model_max_length=77)
    tok_g = transformers.CLIPTokenizer(vocab, merges, pad_token="!", model_max_length=77)
    tok_t5 = t5_reference_tokenizer(train_t5_spiece(root / "spm"))
    torch.manual_seed(0)
    clip_l = transformers.CLIPTextModelWithProjection(clip_config(8, 8)).eval()
    with torch.no_grad():
        clip_l.text_projection.weight.copy_(torch.eye(8))
    clip_g = transformers.CLIPTextModelWithProjection(clip_config(12, 12)).eval()
    t5 = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=760, d_model=24, d_kv=8, d_ff=32, num_layers=2, num_heads=3, feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=8, relative_attention_max_distance=16)).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=tiny_diffusers_sd3_transformer(qk_norm="rms_norm", num_layers=DEPTH),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_diffusers_vae(latent_channels=4, use_quant_conv=False, use_post_quant_conv=False,
                               scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=clip_l, tokenizer=tok_l, text_encoder_2=clip_g, tokenizer_2=tok_g,
        text_encoder_3=t5, tokenizer_3=tok_t5,
    )
    pipe.save_pretrained(root / "pipe")
    pipe.set_progress_bar_config(disable=True)
    return pipe, root / "pipe"


def reference_images(pipe, prompts, negative, steps, guidance, size, seed, **kwargs):
    """diffusers' images (output_type "np") and the initial latents they started from."""
    h, w = size
    latents = torch.randn(len(prompts), 4, h // 2, w // 2, generator=torch.Generator().manual_seed(seed))
    images = pipe(prompt=prompts, negative_prompt=negative, height=h, width=w, num_inference_steps=steps,
                  guidance_scale=guidance, latents=latents.clone(), output_type="np", **kwargs).images
    return images, latents


def hints(folder: Path) -> dict:
    """`model_config` for a single file of the tiny pipeline: what shapes cannot tell about
    sizes no release has (heads of a 32-wide MMDiT and 8-wide CLIPs, T5's bucket distance,
    the VAE's group count), given as the folder's own config.json files."""
    config = {name: json.loads((folder / name / "config.json").read_text())
              for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae")}
    return {"num_heads": 2, **config}


def component_state(folder: Path, name: str) -> dict[str, torch.Tensor]:
    files = sorted((folder / name).glob("*.safetensors"))
    assert len(files) == 1, files
    return load_file(files[0])


def original_parts(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The release's parts in their own names: "model" (MMDiT + VAE, prefixed), and
    "clip_l", "clip_g", "t5xxl" as the standalone text_encoders/ files name them."""
    vae = component_state(folder, "vae")
    levels = len(json.loads((folder / "vae" / "config.json").read_text())["block_out_channels"])
    model = sd3_to_original(component_state(folder, "transformer"), DEPTH)
    model.update({f"first_stage_model.{k}": v.contiguous() for k, v in vae_to_ldm(vae, levels).items()})
    parts = {"model": model}
    for part, name in FOLDER_OF.items():
        parts[part] = {k: v.contiguous() for k, v in component_state(folder, name).items()}
    # The released clip_l carries no projection (diffusers and the reference use its pooled
    # output as is).
    del parts["clip_l"]["text_projection.weight"]
    return parts


T5_FILE = "t5xxl_fp16.safetensors"


def write_release(folder: Path, out: Path, *, bundled: bool, t5: bool = True) -> Path:
    """Write the tiny pipeline as an original release under `out`; return the model file.

    bundled: one `sd3_tiny_incl_clips_t5xxlfp16.safetensors` holding everything, with a
    random CLIP-L projection in it that must be ignored as diffusers ignores it, and T5's
    token embedding under both of its names. Otherwise
    `sd3_tiny.safetensors` (MMDiT + VAE) and text_encoders/clip_l, clip_g and (t5) T5 files.
    """
    parts = original_parts(folder)
    out.mkdir(parents=True, exist_ok=True)
    if bundled:
        state = dict(parts["model"])
        for part in ("clip_l", "clip_g", "t5xxl") if t5 else ("clip_l", "clip_g"):
            state.update({BUNDLED_PREFIX[part] + k: v for k, v in parts[part].items()})
        state[BUNDLED_PREFIX["clip_l"] + "text_projection.weight"] = torch.randn(8, 8)
        if t5:  # T5 files may hold the token embedding twice (diffusers' loader needs the second)
            state[BUNDLED_PREFIX["t5xxl"] + "encoder.embed_tokens.weight"] = parts["t5xxl"]["shared.weight"].clone()
        path = out / ("sd3_tiny_incl_clips_t5xxlfp16.safetensors" if t5 else "sd3_tiny_incl_clips.safetensors")
        save_file(state, path)
        return path
    encoders = out / "text_encoders"
    encoders.mkdir(exist_ok=True)
    save_file(parts["clip_l"], encoders / "clip_l.safetensors")
    save_file(parts["clip_g"], encoders / "clip_g.safetensors")
    if t5:
        save_file(parts["t5xxl"], encoders / T5_FILE)
    save_file(parts["model"], out / "sd3_tiny.safetensors")
    return out / "sd3_tiny.safetensors"
