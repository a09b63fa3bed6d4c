"""Train the second demo generation on tools/demo_scenes_v2.py's 128x128 multi-object scenes.

Two models with 256 image tokens each, so token-level methods (ToDo, window attention,
sequence parallelism) and the adaptive caches can be judged on them:

    demo-sd3-256   SD3 MMDiT, 16-channel 8x-down VAE -> 16x16x16 latents, patch 1 -> 256 tokens
    demo-pixart    PixArt-α (adaLN-single, cross-attention to T5), 4-channel 4x-down VAE ->
                   32x32x4 latents, patch 2 -> 256 tokens

Why those two routes to 256 tokens: both VAEs are fine-tuned from the first demos' (they
are fully convolutional, so the 64-px weights are a good start at 128 px; from scratch they
cost the CPU most of an hour each), and 128 px keeps every VAE pass 4x cheaper than 256 px.
The SD3 route keeps SD3's 16-channel VAE, so it needs patch 1 (real SD3 uses 2); the
PixArt route keeps PixArt's patch 2 on a 4x-down VAE.

Stages, each resuming from its checkpoint in the work directory (.demo_work_v2/):

    python tools/train_demo_v2.py vae --family sd3      # fine-tune demo-sd3's VAE on v2 scenes
    python tools/train_demo_v2.py vae --family pixart   # fine-tune demo-dit's VAE on v2 scenes
    python tools/train_demo_v2.py text                  # tokenizers + frozen random CLIP-L / bigG / T5
    python tools/train_demo_v2.py mmdit                 # rectified flow, as the first SD3 demo
    python tools/train_demo_v2.py pixart                # DDPM (cosine), hybrid loss, T5 with its mask

The loop machinery (checkpoints, EMA, schedules, bf16 autocast) is tools/train_demo.py's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo_scenes_v2 as scenes  # noqa: E402
import train_demo as td  # noqa: E402

from dite.models.denoiser import Conditioning  # noqa: E402

WORK = td.ROOT / ".demo_work_v2"
VAE_FROM = {"sd3": td.ROOT / "models" / "demo" / "sd3", "pixart": td.ROOT / "models" / "demo" / "dit"}
LATENT = {"sd3": scenes.IMAGE_SIZE // 8, "pixart": scenes.IMAGE_SIZE // 4}  # 16 and 32
T5_MAX_LENGTH = td.T5_MAX_LENGTH  # captions are at most 10 words; 16 tokens hold them


def mmdit_config():
    from dite.models.mmdit import MMDiTConfig

    return MMDiTConfig(depth=12, num_heads=4, head_dim=32, patch_size=1, in_channels=16, out_channels=16,
                       pos_embed_max_size=LATENT["sd3"], context_dim=td.T5["d_model"],
                       pooled_dim=td.CLIP_L["projection_dim"] + td.CLIP_G["projection_dim"],
                       sample_size=LATENT["sd3"])


def pixart_config():
    from dite.models.pixart import PixArtConfig

    # sample_size 32 (not 128): no micro-conditions, interpolation scale 1, no resolution bins.
    return PixArtConfig(hidden_size=128, depth=12, num_heads=4, patch_size=2, in_channels=4, out_channels=8,
                        caption_channels=td.T5["d_model"], sample_size=LATENT["pixart"], interpolation_scale=1.0,
                        pixart_version="alpha")


def shipped_vae(family: str):
    """The first demo's VAE in fp32, the starting point of the fine-tune."""
    from dite.engine import load

    return load(str(VAE_FROM[family]), dtype=torch.float32).vae.float().requires_grad_(True)


def train_mmdit(args):
    td.train_mmdit(args, scenes, mmdit_config())


def init_pixart(model):
    """PixArt's initialisation: xavier linears and patch embedding, N(0, 0.02) timestep and
    caption MLPs, zeroed cross-attention outputs and final projection (each block's
    cross-attention starts silent), tables N(0, 1/D)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(m.weight)
            torch.nn.init.zeros_(m.bias)
    w = model.x_embedder.proj.weight
    torch.nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    for lin in (model.t_embedder.mlp[0], model.t_embedder.mlp[2], model.t_block[1],
                model.y_embedder.y_proj.fc1, model.y_embedder.y_proj.fc2):
        torch.nn.init.normal_(lin.weight, std=0.02)
    dim = model.config.hidden_size
    for block in model.blocks:
        torch.nn.init.zeros_(block.cross_attn.proj.weight)
        torch.nn.init.zeros_(block.cross_attn.proj.bias)
        torch.nn.init.normal_(block.scale_shift_table, std=dim ** -0.5)
    torch.nn.init.normal_(model.final_layer.scale_shift_table, std=dim ** -0.5)
    torch.nn.init.zeros_(model.final_layer.linear.weight)


def train_pixart(args):
    from dite.engine.pipelines.pixart_prompts import PixArtText
    from dite.models.pixart import PixArt

    name = "pixart"
    if td.done(args, name):
        return
    vae = td.load_vae(args, "pixart")
    pool, found = td.latent_pool(vae, args, args.pool, scenes)
    text = td.load_text(args)
    captions = [""] + sorted({s.caption for s in found})
    index = {c: i for i, c in enumerate(captions)}
    caption_ids = torch.tensor([index[s.caption] for s in found])
    # PixArt reads T5's last states with the padding masked out: the pipeline's own encoder.
    t5 = PixArtText(t5=text.t5, tokenizer=text.tokenizer_t5)
    contexts, masks = zip(*(t5.encode(captions[i:i + 128], T5_MAX_LENGTH) for i in range(0, len(captions), 128)))
    contexts, masks = torch.cat(contexts), torch.cat(masks).bool()
    print(f"[pixart] {len(captions)} captions encoded: context {tuple(contexts.shape)}", flush=True)
    torch.manual_seed(args.seed)
    model = PixArt(pixart_config())
    init_pixart(model)

    def condition(idx, g):  # dropped captions become index 0, ""
        cap = td.dropped(caption_ids[idx], 0, args, g)
        return Conditioning(context=contexts[cap], context_mask=masks[cap])

    td.train_ddpm(args, name, model, pool, condition, {"max_sequence_length": T5_MAX_LENGTH, "min_snr": args.min_snr})


def train_vae(args):
    td.train_vae(args, scenes, shipped_vae(args.family), warmup=20)


DEFAULTS = {  # stage -> (steps, batch, pool, lr)
    "vae": (400, 8, 0, 5e-4),
    "mmdit": (1600, 16, 8000, None),
    "pixart": (1600, 16, 8000, None),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["vae", "text", "mmdit", "pixart"])
    p.add_argument("--family", choices=["sd3", "pixart"], default="sd3", help="which VAE (vae stage)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--pool", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--kl", type=float, default=1e-6)
    p.add_argument("--object-weight", type=float, default=20.0)
    p.add_argument("--drop", type=float, default=0.1)
    p.add_argument("--min-snr", type=float, default=0.0,
                   help="pixart: Min-SNR-gamma weight of the epsilon loss (0: unweighted)")
    p.add_argument("--max-minutes", type=float, default=0)
    p.add_argument("--stop-at", type=int, default=0)
    p.add_argument("--checkpoint-minutes", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--fp32", action="store_true")
    p.add_argument("--fresh", action="store_true")
    p.add_argument("--work", default=str(WORK))
    args = p.parse_args(argv)
    steps, batch, pool, lr = DEFAULTS.get(args.stage, (0, 0, 0, None))
    args.steps, args.batch, args.pool = args.steps or steps, args.batch or batch, args.pool or pool
    args.lr = args.lr or lr
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    stages = {"vae": train_vae, "text": lambda a: td.build_text(a, scenes.vocabulary_texts()),
              "mmdit": train_mmdit, "pixart": train_pixart}
    stages[args.stage](args)


if __name__ == "__main__":
    main()
