"""Write a randomly initialised DiT checkpoint and VAE, in their real release layouts.

Until dite ships trained demo weights, this gives a fresh machine something to run the
whole class-to-image path on, offline: an original-layout DiT `.pt` (facebookresearch
names, with its stored position table, as the release ships it) and a diffusers-layout VAE
folder. The images are noise: the weights are random.

    python tools/make_random_dit.py random-dit [--preset DiT-S/8]
    dite generate --model random-dit/DiT-S-8.pt --vae random-dit/vae --class-label 207 -o out.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from dite.models.dit import DiT, DiTConfig
from dite.models.vae import AutoencoderKL, VAEConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--preset", default="DiT-S/8", help="DiT preset, e.g. DiT-S/8, DiT-B/4, DiT-XL/2-512")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    cfg = DiTConfig.preset(args.preset)
    model = DiT(cfg)
    model.init_computed_buffers(torch.device("cpu"))
    state = model.state_dict()
    state["pos_embed"] = model.pos_embed.unsqueeze(0).clone()  # the release stores it
    args.folder.mkdir(parents=True, exist_ok=True)
    dit_path = args.folder / (args.preset.replace("/", "-") + ".pt")
    torch.save(state, dit_path)

    vae_cfg = VAEConfig.sd()
    vae = AutoencoderKL(vae_cfg)
    (args.folder / "vae").mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()},
              args.folder / "vae" / "diffusion_pytorch_model.safetensors")
    (args.folder / "vae" / "config.json").write_text(json.dumps(vae_cfg.to_diffusers(), indent=2))
    print(dit_path)
    print(args.folder / "vae")


if __name__ == "__main__":
    main()
