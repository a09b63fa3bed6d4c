"""The demo models shipped in models/demo/, and the export path that writes them.

- config writers: to_diffusers / to_transformers read back by from_* to the same config, and
  accepted by the reference classes, which then take dite's exported state dict strictly;
- each shipped folder loads with dite.engine.load (also by its demo name) and with diffusers'
  pipeline class, and both give the same image from the same latents (fp32, few steps).
"""

from __future__ import annotations

import json
import sys
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest
import torch

from dite.engine import load
from dite.models.checkpoint import export_state_dict
from dite.models.clip import CLIPTextConfig, CLIPTextModel, clip_keymap
from dite.models.dit import DiT, DiTConfig
from dite.models.dit import keymap as dit_keymap
from dite.models.mmdit import MMDiT, MMDiTConfig
from dite.models.mmdit import keymap as mmdit_keymap
from dite.models.t5 import T5Config, T5Encoder, t5_keymap
from dite.models.vae import AutoencoderKL, VAEConfig, vae_keymap

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

DEMO = Path(str(files("dite.models.demo")))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))


def _seeded(module: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.1)
    return module.eval()


def _load_strict(reference: torch.nn.Module, state: dict) -> None:
    missing, unexpected = reference.load_state_dict(state, strict=False)
    # transformers keeps position_ids as a non-persistent buffer in some versions.
    assert not [k for k in missing if not k.endswith("position_ids")] and not unexpected, (missing, unexpected)


def test_mmdit_config_round_trip_and_export():
    cfg = MMDiTConfig(depth=2, num_heads=2, head_dim=8, patch_size=2, in_channels=4, out_channels=4,
                      pos_embed_max_size=6, context_dim=24, pooled_dim=12, sample_size=4, qk_norm=True,
                      dual_attention_layers=(0,))
    assert MMDiTConfig.from_diffusers(cfg.to_diffusers()) == cfg
    ours = _seeded(MMDiT(cfg))
    ref = diffusers.SD3Transformer2DModel.from_config(cfg.to_diffusers()).eval()
    _load_strict(ref, export_state_dict(mmdit_keymap(cfg, "diffusers")[0], ours.state_dict()))
    from dite.models.denoiser import Conditioning

    x, t = torch.randn(2, 4, 4, 4), torch.tensor([500.0, 20.0])
    ctx, pooled = torch.randn(2, 5, 24), torch.randn(2, 12)
    with torch.no_grad():
        expected = ref(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t).sample
        got = ours(x, t, Conditioning(context=ctx, pooled=pooled))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_dit_config_round_trip_and_export():
    cfg = DiTConfig(hidden_size=16, depth=2, num_heads=2, patch_size=2, in_channels=4, out_channels=8,
                    num_classes=10, input_size=4, freq_shift=1.0, mlp_norm_eps=1e-5)
    assert DiTConfig.from_diffusers(cfg.to_diffusers()) == cfg
    ref = diffusers.DiTTransformer2DModel.from_config(cfg.to_diffusers()).eval()
    ours = _seeded(DiT(cfg))
    _load_strict(ref, export_state_dict(dit_keymap(cfg, "diffusers")[0], ours.state_dict()))
    with pytest.raises(Exception, match="freq_shift"):
        DiTConfig(freq_shift=0.0).to_diffusers()


def test_vae_config_round_trip_and_export():
    cfg = VAEConfig(latent_channels=16, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                    use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.7, shift_factor=0.1,
                    force_upcast=False)
    assert VAEConfig.from_diffusers(cfg.to_diffusers()) == cfg
    ours = _seeded(AutoencoderKL(cfg))
    ref = diffusers.AutoencoderKL.from_config(cfg.to_diffusers()).eval()
    names = list(ours.state_dict())
    _load_strict(ref, export_state_dict(vae_keymap(cfg, "diffusers", names)[0], ours.state_dict()))


def test_text_config_round_trips_and_export():
    clip = CLIPTextConfig(vocab_size=50, width=16, layers=2, heads=2, max_positions=16, activation="gelu",
                          projection_dim=12)
    assert CLIPTextConfig.from_transformers(clip.to_transformers()) == clip
    ref = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**clip.to_transformers())).eval()
    ours = _seeded(CLIPTextModel(clip))
    keymap, _ = clip_keymap(clip, "transformers", ["text_model.embeddings.token_embedding.weight"])
    _load_strict(ref, export_state_dict(keymap, ours.state_dict()))
    ids = torch.tensor([[48, 3, 7, 49, 49, 49]])
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
        mine = ours(ids)
    torch.testing.assert_close(mine.hidden_states[-2], out.hidden_states[-2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mine.projected, out.text_embeds, rtol=1e-5, atol=1e-5)

    t5 = T5Config(vocab_size=40, d_model=16, d_kv=4, d_ff=24, layers=2, heads=4, relative_buckets=8,
                  relative_max_distance=16)
    assert T5Config.from_transformers(t5.to_transformers()) == t5
    ref = transformers.T5EncoderModel(transformers.T5Config(**t5.to_transformers())).eval()
    ours = _seeded(T5Encoder(t5))
    keymap, _ = t5_keymap(t5, ["shared.weight", "encoder.embed_tokens.weight"])
    _load_strict(ref, export_state_dict(keymap, ours.state_dict()))
    ids = torch.tensor([[5, 9, 1, 0, 0]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).last_hidden_state, rtol=1e-5, atol=1e-5)


def _needs(name: str) -> Path:
    folder = DEMO / name
    # The demos ship with dite: a missing folder is a packaging failure, not a reason to skip.
    assert (folder / "model_index.json").is_file(), f"demo model {name} missing (tools/export_demo.py {name})"
    return folder


def test_demo_sd3_matches_diffusers():
    folder = _needs("sd3")
    index = json.loads((folder / "model_index.json").read_text())
    length = index["_dite"]["max_sequence_length"]
    pipe = load("demo-sd3")
    assert pipe.defaults["max_sequence_length"] == length
    prompts = ["a red circle on the left", "a small blue square at the top right"]
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = pipe(prompt=prompts, num_inference_steps=3, guidance_scale=5.0, latents=latents.clone(),
                output_type="np", progress=False)
    ref = diffusers.StableDiffusion3Pipeline.from_pretrained(folder, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    expected = ref(prompt=prompts, num_inference_steps=3, guidance_scale=5.0, max_sequence_length=length,
                   latents=latents.clone(), output_type="np").images
    assert ours.images.shape == expected.shape == (2, 64, 64, 3)
    np.testing.assert_allclose(ours.images, expected, atol=2e-4)


def test_demo_dit_matches_diffusers():
    folder = _needs("dit")
    pipe = load("demo-dit")
    side = pipe.transformer.config.input_size
    latents = torch.randn(2, 4, side, side, generator=torch.Generator().manual_seed(0))
    ours = pipe(class_labels=[0, 7], num_inference_steps=3, guidance_scale=4.0, latents=latents.clone(),
                output_type="np", progress=False)
    ref = diffusers.DiTPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    # diffusers' DiTPipeline draws its own noise: hand it ours through its latents argument's absence
    # is impossible, so run its loop on the same initial latents by patching randn_tensor.
    import diffusers.pipelines.dit.pipeline_dit as pd

    original = pd.randn_tensor
    pd.randn_tensor = lambda *a, **k: latents.clone()
    try:
        expected = ref(class_labels=[0, 7], num_inference_steps=3, guidance_scale=4.0, output_type="np").images
    finally:
        pd.randn_tensor = original
    np.testing.assert_allclose(ours.images, expected, atol=2e-4)


def test_demo_sizes_within_budget():
    total = sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file())
    assert total <= 40 * 1024 * 1024, f"demo models take {total / 1e6:.1f} MB"  # issue 21: ~40 MB in all
