"""Tiny random reference models (diffusers), saved in their own layouts, for parity tests."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch


def tiny_diffusers_dit(num_layers: int = 3, sample_size: int = 8, out_channels: int = 8, seed: int = 0):
    """A diffusers DiT transformer with random non-zero weights (adaLN-Zero init would make
    every block the identity) and the per-block embedder copies tied, as in a converted
    checkpoint. num_classes is 1000 because DiTPipeline hard-codes null class 1000."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    model = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=out_channels,
        num_layers=num_layers, sample_size=sample_size, patch_size=2, num_embeds_ada_norm=1000,
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
        first = model.transformer_blocks[0].norm1.emb
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(first.state_dict())
    return model


def tiny_diffusers_vae(latent_channels: int = 4, seed: int = 1, **kwargs):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    options = dict(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=16,
    )
    options.update(kwargs)
    return AutoencoderKL(**options).eval()


def tiny_dit_pipeline(folder: Path, scheduler: str = "ddim", **dit_kwargs):
    """Save a diffusers DiTPipeline folder; return the reference pipeline (eval mode)."""
    from diffusers import DDIMScheduler, DDPMScheduler, DiTPipeline

    if scheduler == "ddim":
        sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    else:
        sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False,
                              variance_type="learned_range", timestep_spacing="linspace")
    pipe = DiTPipeline(transformer=tiny_diffusers_dit(**dit_kwargs), vae=tiny_diffusers_vae(), scheduler=sched)
    pipe.save_pretrained(folder)
    # The hub's facebook/DiT-XL-2-* model_index.json embeds ImageNet's id2label map (which
    # save_pretrained does not write); a few entries in the same form.
    index = json.loads((folder / "model_index.json").read_text())
    index["id2label"] = {"0": "tench, Tinca tinca", "1": "goldfish, Carassius auratus"}
    (folder / "model_index.json").write_text(json.dumps(index))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def dit_to_original(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Rename a diffusers DiT state dict to facebookresearch/DiT names (docs/checkpoints.md §3.2,
    written independently of dite's key map so each checks the other)."""
    out = {}
    emb = "transformer_blocks.0.norm1.emb."
    out["x_embedder.proj.weight"] = state["pos_embed.proj.weight"]
    out["x_embedder.proj.bias"] = state["pos_embed.proj.bias"]
    for p in ("weight", "bias"):
        out[f"t_embedder.mlp.0.{p}"] = state[emb + f"timestep_embedder.linear_1.{p}"]
        out[f"t_embedder.mlp.2.{p}"] = state[emb + f"timestep_embedder.linear_2.{p}"]
        out[f"final_layer.adaLN_modulation.1.{p}"] = state[f"proj_out_1.{p}"]
        out[f"final_layer.linear.{p}"] = state[f"proj_out_2.{p}"]
        for i in range(depth):
            s = f"transformer_blocks.{i}."
            out[f"blocks.{i}.adaLN_modulation.1.{p}"] = state[s + f"norm1.linear.{p}"]
            out[f"blocks.{i}.attn.qkv.{p}"] = torch.cat([state[s + f"attn1.to_{x}.{p}"] for x in "qkv"])
            out[f"blocks.{i}.attn.proj.{p}"] = state[s + f"attn1.to_out.0.{p}"]
            out[f"blocks.{i}.mlp.fc1.{p}"] = state[s + f"ff.net.0.proj.{p}"]
            out[f"blocks.{i}.mlp.fc2.{p}"] = state[s + f"ff.net.2.{p}"]
    out["y_embedder.embedding_table.weight"] = state[emb + "class_embedder.embedding_table.weight"]
    return {k: v.contiguous().clone() for k, v in out.items()}


def tiny_diffusers_sd3_transformer(qk_norm=None, dual_attention_layers=(), seed: int = 0, num_layers: int = 3,
                                   channels: int = 4):
    """A diffusers SD3 transformer with random non-trivial weights (norm scales near 1)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    model = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=channels, out_channels=channels, num_layers=num_layers,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=32,
        pooled_projection_dim=20, pos_embed_max_size=12, qk_norm=qk_norm, dual_attention_layers=dual_attention_layers,
    ).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm_q.weight", "norm_k.weight", "norm_added_q.weight", "norm_added_k.weight")):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.2)
    return model


def sd3_to_original(state: dict[str, torch.Tensor], depth: int, prefix: str = "model.diffusion_model."):
    """Rename a diffusers SD3 transformer state dict to the original single-file names
    (docs/checkpoints.md §1.4, written independently of dite's key map): fused qkv, and the
    (scale, shift) -> (shift, scale) swap of the final layer and the last block's context adaLN."""

    def swap(t):
        a, b = t.chunk(2)
        return torch.cat([b, a])

    out = {"pos_embed": state["pos_embed.pos_embed"]}
    for p in ("weight", "bias"):
        out[f"x_embedder.proj.{p}"] = state[f"pos_embed.proj.{p}"]
        out[f"t_embedder.mlp.0.{p}"] = state[f"time_text_embed.timestep_embedder.linear_1.{p}"]
        out[f"t_embedder.mlp.2.{p}"] = state[f"time_text_embed.timestep_embedder.linear_2.{p}"]
        out[f"y_embedder.mlp.0.{p}"] = state[f"time_text_embed.text_embedder.linear_1.{p}"]
        out[f"y_embedder.mlp.2.{p}"] = state[f"time_text_embed.text_embedder.linear_2.{p}"]
        out[f"context_embedder.{p}"] = state[f"context_embedder.{p}"]
        out[f"final_layer.linear.{p}"] = state[f"proj_out.{p}"]
        out[f"final_layer.adaLN_modulation.1.{p}"] = swap(state[f"norm_out.linear.{p}"])
    for i in range(depth):
        s, o = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        for p in ("weight", "bias"):
            out[o + f"x_block.attn.qkv.{p}"] = torch.cat([state[s + f"attn.to_{x}.{p}"] for x in "qkv"])
            out[o + f"context_block.attn.qkv.{p}"] = torch.cat([state[s + f"attn.add_{x}_proj.{p}"] for x in "qkv"])
            out[o + f"x_block.attn.proj.{p}"] = state[s + f"attn.to_out.0.{p}"]
            out[o + f"x_block.adaLN_modulation.1.{p}"] = state[s + f"norm1.linear.{p}"]
            out[o + f"x_block.mlp.fc1.{p}"] = state[s + f"ff.net.0.proj.{p}"]
            out[o + f"x_block.mlp.fc2.{p}"] = state[s + f"ff.net.2.{p}"]
            if i == depth - 1:
                out[o + f"context_block.adaLN_modulation.1.{p}"] = swap(state[s + f"norm1_context.linear.{p}"])
            else:
                out[o + f"context_block.adaLN_modulation.1.{p}"] = state[s + f"norm1_context.linear.{p}"]
                out[o + f"context_block.attn.proj.{p}"] = state[s + f"attn.to_add_out.{p}"]
                out[o + f"context_block.mlp.fc1.{p}"] = state[s + f"ff_context.net.0.proj.{p}"]
                out[o + f"context_block.mlp.fc2.{p}"] = state[s + f"ff_context.net.2.{p}"]
            if s + f"attn2.to_q.{p}" in state:
                out[o + f"x_block.attn2.qkv.{p}"] = torch.cat([state[s + f"attn2.to_{x}.{p}"] for x in "qkv"])
                out[o + f"x_block.attn2.proj.{p}"] = state[s + f"attn2.to_out.0.{p}"]
        for ours, theirs in (("ln_q", "q"), ("ln_k", "k")):
            if s + f"attn.norm_{theirs}.weight" in state:
                out[o + f"x_block.attn.{ours}.weight"] = state[s + f"attn.norm_{theirs}.weight"]
                out[o + f"context_block.attn.{ours}.weight"] = state[s + f"attn.norm_added_{theirs}.weight"]
            if s + f"attn2.norm_{theirs}.weight" in state:
                out[o + f"x_block.attn2.{ours}.weight"] = state[s + f"attn2.norm_{theirs}.weight"]
    return {prefix + k: v.contiguous().clone() for k, v in out.items()}


def vae_to_ldm(state: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """Rename a diffusers AutoencoderKL state dict to the original LDM names
    (docs/checkpoints.md §4.2, written independently of dite's map): reversed decoder levels,
    1x1-conv attention."""
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, value in state.items():
        new = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        new = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", new)
        new = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", new)
        new = re.sub(r"up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{levels - 1 - int(m[1])}.block.", new)
        new = re.sub(r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{levels - 1 - int(m[1])}.upsample.", new)
        new = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", new)
        match = re.match(r"(\w+)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(\w+)$", new)
        if match:
            new = f"{match[1]}.mid.attn_1.{attn[match[2]]}.{match[3]}"
            if value.dim() == 2:  # LDM's projections are 1x1 convs
                value = value[:, :, None, None]
        out[new] = value
    return out
