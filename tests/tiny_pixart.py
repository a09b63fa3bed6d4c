"""Tiny random PixArt reference models (diffusers) and the original-layout rename, for the
PixArt tests. The rename follows the table in docs/checkpoints.md §2.2, written
independently of dite's key map so that each checks the other."""

from __future__ import annotations

import torch

DEPTH = 2
HEADS, HEAD_DIM = 2, 12  # hidden 24: divisible by 3 for the micro-condition embedders
CAPTION = 16  # T5 width of the tiny pipelines


def tiny_pixart_transformer(*, micro: bool = False, sample_size: int = 8, interpolation_scale=None,
                            seed: int = 0, depth: int = DEPTH):
    """A diffusers PixArtTransformer2DModel with random non-trivial weights (in eval mode)."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(
        num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=8, num_layers=depth,
        cross_attention_dim=HEADS * HEAD_DIM, sample_size=sample_size, patch_size=2, caption_channels=CAPTION,
        interpolation_scale=interpolation_scale, use_additional_conditions=micro,
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def pixart_to_original(state: dict[str, torch.Tensor], depth: int, *, null_caption: torch.Tensor | None = None,
                       pos_embed: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Rename a diffusers PixArt state dict to the original release's names (a `.pth`'s
    `state_dict`): fused self-attention qkv, fused cross-attention kv."""
    out = {}
    emb = "adaln_single.emb."
    for p in ("weight", "bias"):
        out[f"x_embedder.proj.{p}"] = state[f"pos_embed.proj.{p}"]
        out[f"t_embedder.mlp.0.{p}"] = state[emb + f"timestep_embedder.linear_1.{p}"]
        out[f"t_embedder.mlp.2.{p}"] = state[emb + f"timestep_embedder.linear_2.{p}"]
        out[f"t_block.1.{p}"] = state[f"adaln_single.linear.{p}"]
        if emb + f"resolution_embedder.linear_1.{p}" in state:
            out[f"csize_embedder.mlp.0.{p}"] = state[emb + f"resolution_embedder.linear_1.{p}"]
            out[f"csize_embedder.mlp.2.{p}"] = state[emb + f"resolution_embedder.linear_2.{p}"]
            out[f"ar_embedder.mlp.0.{p}"] = state[emb + f"aspect_ratio_embedder.linear_1.{p}"]
            out[f"ar_embedder.mlp.2.{p}"] = state[emb + f"aspect_ratio_embedder.linear_2.{p}"]
        out[f"y_embedder.y_proj.fc1.{p}"] = state[f"caption_projection.linear_1.{p}"]
        out[f"y_embedder.y_proj.fc2.{p}"] = state[f"caption_projection.linear_2.{p}"]
        out[f"final_layer.linear.{p}"] = state[f"proj_out.{p}"]
        for i in range(depth):
            s, o = f"transformer_blocks.{i}.", f"blocks.{i}."
            out[o + f"attn.qkv.{p}"] = torch.cat([state[s + f"attn1.to_{x}.{p}"] for x in "qkv"])
            out[o + f"attn.proj.{p}"] = state[s + f"attn1.to_out.0.{p}"]
            out[o + f"cross_attn.q_linear.{p}"] = state[s + f"attn2.to_q.{p}"]
            out[o + f"cross_attn.kv_linear.{p}"] = torch.cat([state[s + f"attn2.to_{x}.{p}"] for x in "kv"])
            out[o + f"cross_attn.proj.{p}"] = state[s + f"attn2.to_out.0.{p}"]
            out[o + f"mlp.fc1.{p}"] = state[s + f"ff.net.0.proj.{p}"]
            out[o + f"mlp.fc2.{p}"] = state[s + f"ff.net.2.{p}"]
    for i in range(depth):
        out[f"blocks.{i}.scale_shift_table"] = state[f"transformer_blocks.{i}.scale_shift_table"]
    out["final_layer.scale_shift_table"] = state["scale_shift_table"]
    if null_caption is not None:
        out["y_embedder.y_embedding"] = null_caption
    if pos_embed is not None:
        out["pos_embed"] = pos_embed
    return {k: v.contiguous().clone() for k, v in out.items()}


def tiny_pixart_pipeline(root, *, pixart_version: str = "alpha", micro: bool = False, sample_size: int = 8,
                         scheduler: str = "dpm", vae_levels: int = 2, depth: int = DEPTH):
    """A tiny PixArtAlphaPipeline / PixArtSigmaPipeline saved at root/"pipe"; returns
    (reference in eval mode, folder). `vae_levels` 4 gives the real VAE factor 8."""
    import transformers
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtSigmaPipeline

    from tiny import tiny_diffusers_vae
    from tiny_tokenizers import t5_reference_tokenizer, train_t5_spiece

    tokenizer = t5_reference_tokenizer(train_t5_spiece(root / "spm"))
    torch.manual_seed(0)
    t5 = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=760, d_model=CAPTION, d_kv=8, d_ff=32, num_layers=2, num_heads=2, feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=8, relative_attention_max_distance=16)).eval()
    if scheduler == "dpm":
        sched = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, beta_schedule="linear",
                                            lower_order_final=True, timestep_spacing="linspace")
    else:
        sched = DDIMScheduler(beta_schedule="linear", clip_sample=False)
    channels = (8, 8, 16, 16)[:vae_levels]
    vae = tiny_diffusers_vae(block_out_channels=channels, down_block_types=("DownEncoderBlock2D",) * vae_levels,
                             up_block_types=("UpDecoderBlock2D",) * vae_levels,
                             scaling_factor=0.18215 if pixart_version == "alpha" else 0.13025)
    cls = PixArtAlphaPipeline if pixart_version == "alpha" else PixArtSigmaPipeline
    interpolation = None if pixart_version == "alpha" else sample_size * 8 / 512
    pipe = cls(tokenizer=tokenizer, text_encoder=t5, vae=vae, scheduler=sched,
               transformer=tiny_pixart_transformer(micro=micro, sample_size=sample_size,
                                                   interpolation_scale=interpolation, depth=depth))
    pipe.save_pretrained(root / "pipe")
    pipe.set_progress_bar_config(disable=True)
    return pipe, root / "pipe"


def reference_images(pipe, prompts, negative, steps, guidance, size, seed, factor, **kwargs):
    """diffusers' images (output_type "np") and the initial latents they started from;
    `size` is the size generated at (the bin, with binning on)."""
    h, w = size
    latents = torch.randn(len(prompts), 4, h // factor, w // factor, generator=torch.Generator().manual_seed(seed))
    images = pipe(prompt=prompts, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance,
                  latents=latents.clone(), output_type="np", clean_caption=False, **kwargs).images
    return images, latents
