"""Write the trained demo models (tools/train_demo.py's work directory) as diffusers folders.

    python tools/export_demo.py sd3    # -> models/demo/sd3/
    python tools/export_demo.py dit    # -> models/demo/dit/

Weights are the EMA weights in fp16 safetensors, renamed to the diffusers / transformers
layout by running dite's own loader key maps backwards (dite.models.checkpoint.
export_state_dict); configs come from the config classes' to_diffusers / to_transformers.
So `dite.engine.load(folder)` and diffusers' StableDiffusion3Pipeline / DiTPipeline both
load the result. Tokenizers: CLIP's vocab.json + merges.txt as trained; T5's spiece.model
plus the tokenizer.json that transformers reads without protobuf.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo_scenes as scenes  # noqa: E402
import train_demo as td  # noqa: E402
from t5_reference_tokenizer import t5_reference_tokenizer  # noqa: E402

from dite.engine.checkpoints.layouts import DIFFUSERS_VERSION, TRANSFORMERS_VERSION  # noqa: E402  (one place)
from dite.models import dit as dit_module  # noqa: E402
from dite.models import mmdit as mmdit_module  # noqa: E402
from dite.models import pixart as pixart_module  # noqa: E402
from dite.models.checkpoint import export_state_dict  # noqa: E402
from dite.models.clip import clip_keymap  # noqa: E402
from dite.models.t5 import t5_keymap  # noqa: E402
from dite.models.vae import vae_keymap  # noqa: E402
from dite.schedulers import (DDIMConfig, DDIMScheduler, DPMSolverConfig, DPMSolverMultistepScheduler,  # noqa: E402
                             FlowMatchEulerConfig, FlowMatchEulerScheduler)

DEMO = td.ROOT / "models" / "demo"
# Sampling defaults recorded with each demo: dite reads them from model_index.json's
# "_dite" entry (diffusers ignores keys starting with "_").
SD3_DEFAULTS = {"max_sequence_length": td.T5_MAX_LENGTH, "num_inference_steps": 28, "guidance_scale": 5.0}
DIT_DEFAULTS = {"num_inference_steps": 50, "guidance_scale": 4.0}
# Trained at 128 px only: no aspect-ratio bins (diffusers would bin a sample_size-32 model to
# its 256-px table), so diffusers callers pass use_resolution_binning=False.
PIXART_DEFAULTS = {"max_sequence_length": td.T5_MAX_LENGTH, "num_inference_steps": 20, "guidance_scale": 4.5,
                   "use_resolution_binning": False}
V2_WORK = td.ROOT / ".demo_work_v2"


def fp16(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(torch.float16).contiguous() for k, v in state.items()}


def write_component(folder: Path, config: dict, state: dict[str, torch.Tensor], weights: str, kind: str):
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "diffusers":
        config = {"_diffusers_version": DIFFUSERS_VERSION, **config}
    else:
        config = {**config, "transformers_version": TRANSFORMERS_VERSION, "torch_dtype": "float16"}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(fp16(state), str(folder / weights), metadata={"format": "pt"})


def export_vae(vae, folder: Path):
    names = list(vae.state_dict())
    keymap, _ = vae_keymap(vae.config, "diffusers", names)
    write_component(folder, vae.config.to_diffusers(), export_state_dict(keymap, vae.state_dict()),
                    "diffusion_pytorch_model.safetensors", "diffusers")


def export_scheduler(scheduler, folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    config = {"_diffusers_version": DIFFUSERS_VERSION, **scheduler.to_diffusers_config()}
    (folder / "scheduler_config.json").write_text(json.dumps(config, indent=2) + "\n")


def t5_tokenizer_json(folder: Path):
    """transformers' tokenizer.json for spiece.model (transformers 5 reads spiece.model only
    with protobuf installed; the tokenizers pipeline it builds matches sentencepiece)."""
    tok = t5_reference_tokenizer(folder / "spiece.model", extra_ids=0)
    tmp = folder.parent / (folder.name + ".tmp")
    tok.save_pretrained(tmp)
    shutil.copy(tmp / "tokenizer.json", folder / "tokenizer.json")
    shutil.rmtree(tmp)


def model_index(out: Path, content: dict):
    (out / "model_index.json").write_text(json.dumps({"_diffusers_version": DIFFUSERS_VERSION, **content}, indent=2) + "\n")


def export_sd3(args):
    out = Path(args.out or DEMO / "sd3")
    if out.exists():
        shutil.rmtree(out)
    work = Path(args.work)
    export_vae(td.load_vae(args, "sd3"), out / "vae")

    text = td.load_text(args)
    for name, model in (("text_encoder", text.clip_l), ("text_encoder_2", text.clip_g)):
        keymap, _ = clip_keymap(model.config, "transformers", ["text_model.embeddings.token_embedding.weight"])
        write_component(out / name, model.config.to_transformers(), export_state_dict(keymap, model.state_dict()),
                        "model.safetensors", "transformers")
    for name in ("tokenizer", "tokenizer_2"):
        shutil.copytree(work / "text" / name, out / name)
    export_t5(text.t5, work, out / "text_encoder_3", out / "tokenizer_3")

    final = torch.load(work / "mmdit" / "final.pt", weights_only=True)
    cfg = mmdit_module.MMDiTConfig(**{**final["config"],
                                      "dual_attention_layers": tuple(final["config"]["dual_attention_layers"])})
    keymap, _ = mmdit_module.keymap(cfg, "diffusers")
    write_component(out / "transformer", cfg.to_diffusers(), export_state_dict(keymap, final["ema"]),
                    "diffusion_pytorch_model.safetensors", "diffusers")
    export_scheduler(FlowMatchEulerScheduler(FlowMatchEulerConfig(shift=1.0)), out / "scheduler")
    model_index(out, {
        "_class_name": "StableDiffusion3Pipeline",
        "_dite": SD3_DEFAULTS,
        "feature_extractor": [None, None], "image_encoder": [None, None],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_3": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "tokenizer_3": ["transformers", "T5Tokenizer"],
        "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
    })
    report(out)


def export_t5(t5, work: Path, encoder: Path, tokenizer: Path):
    keymap, _ = t5_keymap(t5.config, ["shared.weight", "encoder.embed_tokens.weight"])
    write_component(encoder, t5.config.to_transformers(), export_state_dict(keymap, t5.state_dict()),
                    "model.safetensors", "transformers")
    shutil.copytree(work / "text" / "tokenizer_3", tokenizer)
    t5_tokenizer_json(tokenizer)


def export_pixart(args):
    """demo-pixart: PixArt-α transformer, T5 (the SD3-128 demo's frozen encoder), 4x-down VAE."""
    out = Path(args.out or DEMO / "pixart")
    if out.exists():
        shutil.rmtree(out)
    work = Path(args.work)
    export_vae(td.load_vae(args, "pixart"), out / "vae")
    export_t5(td.load_text(args).t5, work, out / "text_encoder", out / "tokenizer")
    final = torch.load(work / "pixart" / "final.pt", weights_only=True)
    cfg = pixart_module.PixArtConfig(**final["config"])
    keymap, _ = pixart_module.keymap(cfg, "diffusers")
    write_component(out / "transformer", cfg.to_diffusers(), export_state_dict(keymap, final["ema"]),
                    "diffusion_pytorch_model.safetensors", "diffusers")
    # The training schedule is improved DDPM's cosine; its lambda(t) falls to -10 at t = 999, where
    # an epsilon error is magnified 2e4x in x0. diffusers' remedy for cosine schedules is to clip
    # lambda at -5.1 (its docstring's value), so DPM-Solver++ starts where x0 is still readable.
    export_scheduler(DPMSolverMultistepScheduler(DPMSolverConfig(beta_schedule=td.DIT_BETA_SCHEDULE, lambda_min_clipped=-5.1)),
                     out / "scheduler")
    model_index(out, {
        "_class_name": "PixArtAlphaPipeline",
        "_dite": PIXART_DEFAULTS,
        "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
        "text_encoder": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "T5Tokenizer"],
        "transformer": ["diffusers", "PixArtTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
    })
    report(out)


def export_dit(args):
    out = Path(args.out or DEMO / "dit")
    if out.exists():
        shutil.rmtree(out)
    work = Path(args.work)
    export_vae(td.load_vae(args, "dit"), out / "vae")
    final = torch.load(work / "dit" / "final.pt", weights_only=True)
    cfg = dit_module.DiTConfig(**final["config"])
    keymap, _ = dit_module.keymap(cfg, "diffusers")
    write_component(out / "transformer", cfg.to_diffusers(), export_state_dict(keymap, final["ema"]),
                    "diffusion_pytorch_model.safetensors", "diffusers")
    # DDIM, not the DDPM learned-range sampler: diffusers' DiTPipeline drops the variance channels.
    # The cosine schedule's alpha_bar(999) is 2e-9, so sampling must not start at t = 999 (an
    # epsilon error there is magnified 2e4x in x0): "leading" spacing with offset 1 starts at 981.
    export_scheduler(DDIMScheduler(DDIMConfig(beta_schedule=td.DIT_BETA_SCHEDULE, clip_sample=False,
                                              set_alpha_to_one=True, timestep_spacing="leading", steps_offset=1)),
                     out / "scheduler")
    model_index(out, {
        "_class_name": "DiTPipeline",
        "_dite": DIT_DEFAULTS,
        "id2label": {str(i): scenes.class_name(i) for i in range(scenes.NUM_CLASSES)},
        "scheduler": ["diffusers", "DDIMScheduler"],
        "transformer": ["diffusers", "DiTTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
    })
    report(out)


def report(out: Path):
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{out}: {total / 1e6:.2f} MB")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", choices=["sd3", "dit", "sd3-128", "pixart"],
                   help="sd3 / dit: the first demos (tools/train_demo.py); sd3-128 / pixart: the second "
                        "generation (tools/train_demo_v2.py, work directory .demo_work_v2)")
    p.add_argument("--work", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    args.fp32, args.seed = False, 0
    second = args.model in ("sd3-128", "pixart")
    args.work = args.work or str(V2_WORK if second else td.WORK)
    if args.model == "sd3-128":
        args.out = args.out or str(td.ROOT / "demos" / "sd3_128")  # outside the wheel (models/demo/README.md)
    {"sd3": export_sd3, "dit": export_dit, "sd3-128": export_sd3, "pixart": export_pixart}[args.model](args)


if __name__ == "__main__":
    main()
