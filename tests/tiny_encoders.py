"""Tiny random reference encoders (transformers' CLIP and T5, diffusers' AutoencoderKL) and
the tests' own converter to OpenCLIP names (the VAE's to LDM names is tiny.vae_to_ldm),
shared by the encoder, conversion and export tests."""

from __future__ import annotations

import torch

from dite.models.vae import VAEConfig

# ----------------------------------------------------------------------------- CLIP

# "legacy": eos_token_id 2, pooled at the argmax id; "eos": a real EOS id (97) that is not
# the largest id, pooled at its first occurrence, with a square projection (as bigG's) so a
# missed OpenCLIP transpose could not hide behind a shape error.
CLIP_TINY = {
    "legacy": dict(hidden_act="quick_gelu", eos_token_id=2, projection_dim=24),
    "eos": dict(hidden_act="gelu", eos_token_id=97, projection_dim=32),
}
CLIP_COMMON = dict(vocab_size=99, hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
                   max_position_embeddings=12, bos_token_id=0, pad_token_id=1)


def clip_reference(kind: str, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    model = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**CLIP_COMMON, **CLIP_TINY[kind]))
    with torch.no_grad():  # perturb every tensor, norms included, so a swapped name shows
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def to_openclip(state: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """transformers names -> OpenCLIP names (docs/checkpoints.md §5.2), written independently
    of dite's map."""
    hf = {k.removeprefix("text_model."): v for k, v in state.items()}
    out = {
        "token_embedding.weight": hf["embeddings.token_embedding.weight"],
        "positional_embedding": hf["embeddings.position_embedding.weight"],
        "ln_final.weight": hf["final_layer_norm.weight"], "ln_final.bias": hf["final_layer_norm.bias"],
        "text_projection": hf["text_projection.weight"].t().contiguous(),  # OpenCLIP computes x @ P
        "logit_scale": torch.tensor(4.6),
    }
    for i in range(layers):
        a, b = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            out[b + f"attn.in_proj_{p}"] = torch.cat([hf[a + f"self_attn.{x}_proj.{p}"] for x in "qkv"])
            for theirs, ours in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                                 ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                out[b + f"{theirs}.{p}"] = hf[a + f"{ours}.{p}"]
    return out


# ----------------------------------------------------------------------------- T5

# inner width heads * d_kv (3 * 8) differs from d_model, as a transposed map would show.
T5_TINY = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=40, num_layers=3, num_heads=3, feed_forward_proj="gated-gelu")


def t5_reference(seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    model = transformers.T5EncoderModel(transformers.T5Config(**T5_TINY))
    with torch.no_grad():  # perturb every tensor, norms included, so a swapped name shows
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()  # T5 has dropout


# ----------------------------------------------------------------------------- VAE

# 4-channel SD-like (with quant convs, 32 groups so detection from shapes alone works) and
# 16-channel SD3-like (no quant convs, small groups, one resnet per level).
VAE_TINY = {
    "sd": dict(latent_channels=4, block_out_channels=(32, 32, 64, 64), layers_per_block=2, norm_num_groups=32),
    "sd3": dict(
        latent_channels=16, block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4,
        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609,
    ),
}


def vae_reference(kind: str):
    import diffusers

    kw = dict(VAE_TINY[kind])
    n = len(kw["block_out_channels"])
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n, **kw
    )
    with torch.no_grad():  # perturb every tensor, norms included, so a swapped name shows
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return ref.eval()


def vae_config(kind: str) -> VAEConfig:
    return VAEConfig(**VAE_TINY[kind])
