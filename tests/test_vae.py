"""VAE parity with diffusers' AutoencoderKL, in the diffusers, old-diffusers and LDM layouts."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import diffusers

from dite.engine.errors import CheckpointError, ConfigError  # noqa: E402
from dite.engine.loading.vae import load_vae  # noqa: E402
from dite.models.vae import VAEConfig, detect_vae, vae_keymap  # noqa: E402
from tiny import vae_to_ldm as to_ldm  # noqa: E402
from tiny_encoders import VAE_TINY as TINY, vae_config as our_config, vae_reference as reference  # noqa: E402

TOL = 1e-4  # the contract; on CPU fp32 today the outputs are bit-identical to diffusers
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module", params=["sd", "sd3"])
def kind(request):
    return request.param


@pytest.fixture(scope="module")
def folder(kind, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"vae_{kind}")
    reference(kind).save_pretrained(path, safe_serialization=True)
    return path


def latents(kind, h=5, w=7, seed=1):
    return torch.randn(2, TINY[kind]["latent_channels"], h, w, generator=torch.Generator().manual_seed(seed))


def images(h, w, seed=2):
    return torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def same_outputs(a, b, kind):
    z, x = latents(kind), images(40, 56)
    with torch.no_grad():
        assert torch.equal(a.decode(z), b.decode(z))
        assert torch.equal(a.encode_mean(x), b.encode_mean(x))


# ----------------------------------------------------------------------------- diffusers layout


@pytest.mark.parametrize("size", [(4, 4), (5, 7)])
def test_diffusers_folder_matches_reference(kind, folder, size):
    ref = reference(kind)
    vae = load_vae(folder)
    assert vae.config == our_config(kind)
    h, w = size
    z, x = latents(kind, h, w), images(8 * h, 8 * w)
    with torch.no_grad():
        assert (vae.decode(z) - ref.decode(z).sample).abs().max() <= TOL
        dist, ref_dist = vae.encode(x), ref.encode(x).latent_dist
        assert (dist.mean - ref_dist.mean).abs().max() <= TOL
        assert (dist.logvar - ref_dist.logvar).abs().max() <= TOL
        assert torch.allclose(dist.sample(torch.Generator().manual_seed(3)),
                              ref_dist.sample(torch.Generator().manual_seed(3)), atol=TOL)


def test_model_space_follows_diffusers_convention(kind, folder):
    ref, vae = reference(kind), load_vae(folder)
    model_latents = latents(kind)
    s, shift = ref.config.scaling_factor, ref.config.shift_factor or 0.0
    # SD3's pipeline: latents / scaling_factor + shift_factor, then decode.
    assert torch.allclose(vae.from_model_space(model_latents), model_latents / s + shift)
    assert torch.allclose(vae.to_model_space(vae.from_model_space(model_latents)), model_latents, atol=1e-6)
    with torch.no_grad():
        ours = vae.decode(vae.from_model_space(model_latents))
        theirs = ref.decode(model_latents / s + shift).sample
    assert (ours - theirs).abs().max() <= TOL


def test_old_attention_names_load(kind, folder, tmp_path):
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {re.sub(r"attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.", lambda m: f"attentions.0.{old[m[1]]}.", k): v
             for k, v in load_file(folder / WEIGHTS).items()}
    assert any(".proj_attn." in k for k in state)
    save_file(state, tmp_path / WEIGHTS)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    same_outputs(load_vae(tmp_path), load_vae(folder), kind)


# ----------------------------------------------------------------------------- LDM layout


@pytest.fixture(scope="module")
def ldm_file(kind, folder, tmp_path_factory):
    state = load_file(folder / WEIGHTS)
    ldm = to_ldm(state, len(TINY[kind]["block_out_channels"]))
    # The reverse map above must agree with diffusers' own LDM converter.
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    n = len(TINY[kind]["block_out_channels"])
    back = convert_ldm_vae_checkpoint(ldm, {"down_block_types": [0] * n, "up_block_types": [0] * n})
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    # As in an SD single file: VAE under first_stage_model., other components beside it.
    full = {f"first_stage_model.{k}": v.contiguous() for k, v in ldm.items()}
    full["model.diffusion_model.x_embedder.proj.weight"] = torch.zeros(3)
    full["loss.logvar"] = torch.zeros(())
    path = tmp_path_factory.mktemp(f"ldm_{kind}") / "model.safetensors"
    save_file(full, path)
    return path


def test_ldm_single_file_matches_diffusers_folder(kind, folder, ldm_file):
    # The SD-like tiny VAE uses 32 groups, so its config is detected from shapes alone;
    # the SD3-like one has 4 groups, which shapes cannot tell: pass its config.
    config = None if kind == "sd" else our_config(kind)
    vae = load_vae(ldm_file, config=config, scaling_factor=TINY[kind].get("scaling_factor"),
                   shift_factor=TINY[kind].get("shift_factor"))
    assert vae.config == our_config(kind)
    same_outputs(vae, load_vae(folder), kind)


def test_bare_ldm_file_ignores_loss_keys(kind, folder, tmp_path):
    ldm = to_ldm(load_file(folder / WEIGHTS), len(TINY[kind]["block_out_channels"]))
    ldm["loss.discriminator.main.0.weight"] = torch.zeros(2)  # left in by VAE training
    save_file(ldm, tmp_path / "vae.safetensors")
    same_outputs(load_vae(tmp_path / "vae.safetensors", config=our_config(kind)), load_vae(folder), kind)


def test_ldm_ckpt_with_training_leftovers(kind, folder, tmp_path):
    # vae-ft-*-ema-pruned.ckpt style: a torch file wrapping the LDM state dict.
    ldm = to_ldm(load_file(folder / WEIGHTS), len(TINY[kind]["block_out_channels"]))
    torch.save({"state_dict": {**ldm, "model_ema.num_updates": torch.tensor(5)}}, tmp_path / "vae.ckpt")
    same_outputs(load_vae(tmp_path / "vae.ckpt", config=our_config(kind)), load_vae(folder), kind)


# ----------------------------------------------------------------------------- detection


@pytest.mark.parametrize(
    "preset, kw",
    [
        (VAEConfig.sd(), {}),
        (VAEConfig.sd3(), dict(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)),
    ],
)
@pytest.mark.parametrize("layout", ["diffusers", "ldm"])
def test_detect_full_size_from_shapes(preset, kw, layout):
    with torch.device("meta"):  # full-size shapes cost nothing on meta
        ref = diffusers.AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, **kw,
        )
    state = ref.state_dict()
    if layout == "ldm":
        state = {f"first_stage_model.{k}": v for k, v in to_ldm(state, 4).items()}
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    config, found = detect_vae(shapes.keys(), shapes)
    assert (config, found) == (preset, layout)
    keymap, ignore = vae_keymap(config, found, shapes.keys(), "first_stage_model." if layout == "ldm" else "")
    assert {k for s in keymap.values() for k in s.keys} == set(shapes) and not ignore


def test_sdxl_scaling_must_be_given():
    shapes = {k: tuple(v.shape) for k, v in _meta_sd_state().items()}
    assert detect_vae(shapes.keys(), shapes)[0].scaling_factor == 0.18215
    assert detect_vae(shapes.keys(), shapes, scaling_factor=0.13025)[0] == VAEConfig.sdxl()


def _meta_sd_state():
    with torch.device("meta"):
        return diffusers.AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        ).state_dict()


SD3_CONFIG_JSON = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.29.0.dev0", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True, "in_channels": 3, "latent_channels": 16, "latents_mean": None, "latents_std": None,
    "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 1024,
    "scaling_factor": 1.5305, "shift_factor": 0.0609, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "use_post_quant_conv": False, "use_quant_conv": False,
}


def test_from_diffusers_config():
    assert VAEConfig.from_diffusers(SD3_CONFIG_JSON) == VAEConfig.sd3()
    sd = {k: v for k, v in SD3_CONFIG_JSON.items() if "quant" not in k and "factor" not in k}
    assert VAEConfig.from_diffusers({**sd, "latent_channels": 4}) == VAEConfig.sd()
    with pytest.raises(ConfigError, match="latents_mean"):
        VAEConfig.from_diffusers({**SD3_CONFIG_JSON, "latents_mean": [0.0] * 16})


# ----------------------------------------------------------------------------- errors


def _broken_folder(folder, tmp_path, edit):
    state = load_file(folder / WEIGHTS)
    edit(state)
    save_file(state, tmp_path / WEIGHTS)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    return tmp_path


KEY = "decoder.mid_block.resnets.0.conv1.weight"


@pytest.mark.parametrize(
    "edit, named",
    [
        (lambda s: s.pop(KEY), KEY),
        (lambda s: s.__setitem__("encoder.extra.weight", torch.zeros(2)), "encoder.extra.weight"),
        (lambda s: s.__setitem__(KEY, torch.zeros(3, 3)), KEY),
    ],
    ids=["missing", "extra", "misshaped"],
)
def test_bad_checkpoint_names_the_key(folder, tmp_path, edit, named):
    with pytest.raises(CheckpointError, match=re.escape(named)):
        load_vae(_broken_folder(folder, tmp_path, edit))


def test_misshaped_ldm_attention_kernel_names_the_key(kind, ldm_file, tmp_path):
    state = load_file(ldm_file)
    key = "first_stage_model.decoder.mid.attn_1.q.weight"
    c = state[key].shape[0]
    state[key] = torch.zeros(c, c, 3, 3)
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match=re.escape(key)):
        load_vae(tmp_path / "bad.safetensors", config=our_config(kind))


def test_config_json_mismatch_is_an_error(tmp_path, folder):
    config = json.loads((folder / "config.json").read_text())
    config["latent_channels"] = 8
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / WEIGHTS).write_bytes((folder / WEIGHTS).read_bytes())
    with pytest.raises(CheckpointError, match="has shape"):
        load_vae(tmp_path)
