"""Train dite's demo models on the synthetic scenes of tools/demo_scenes.py, with dite's own modules.

Stages (run in this order by tools/train_all_demo.sh; each resumes from its last checkpoint
in the work directory and skips itself when its final file exists):

    python tools/train_demo.py vae --family sd3     # 16-channel VAE (SD3 layout), then latent stats
    python tools/train_demo.py text                  # tokenizers + frozen random CLIP-L / bigG / T5
    python tools/train_demo.py mmdit                 # SD3-architecture MMDiT, rectified flow
    python tools/train_demo.py vae --family dit      # 4-channel VAE (DiT), then latent stats
    python tools/train_demo.py dit                   # DiT-architecture class-conditional, DDPM hybrid loss

Everything is a function of --seed: the data stream (scene k of step s is
demo_scenes.scene(seed, s * batch + k)), the initial weights, the noise and timesteps of
step s (a generator seeded with (seed, stage, step)). Fixed step counts, not wall-clock
budgets, so a rerun reproduces the same weights (bf16 autocast on CPU is deterministic
for a given thread count). Checkpoints (model, EMA, optimiser, step) are written every
--checkpoint-minutes to <work>/<stage>/last.pt; the final EMA weights go to
<work>/<stage>/final.pt. Loss is logged to <work>/<stage>/loss.tsv.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo_scenes as scenes  # noqa: E402
from demo_diffusion import DIT_BETA_SCHEDULE, GaussianDiffusion  # noqa: E402,F401  (export_demo reads the schedule here)

from dite.models.denoiser import Conditioning  # noqa: E402
from dite.models.vae import AutoencoderKL, VAEConfig  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".demo_work"

# ---------------------------------------------------------------------------- configs
# The shipped architectures. Sizes are chosen for 2 CPU cores and a 30 MB (fp16) budget.

VAE_CONFIGS = {
    # SD3's VAE: 16 latent channels, no quant convs, shifted latents; 4 levels = 8x down.
    "sd3": VAEConfig(latent_channels=16, block_out_channels=(16, 32, 64, 64), layers_per_block=1,
                     norm_num_groups=16, use_quant_conv=False, use_post_quant_conv=False,
                     scaling_factor=1.0, shift_factor=0.0, force_upcast=False),
    # SD's VAE as DiT uses it (4 latent channels, quant convs, scaling only) but 3 levels = 4x
    # down: at 8x down, 4 channels (256 numbers for a 64x64 scene) lost the colour of a seventh
    # of the objects and half the shapes (the checker on reconstructions: colour 85 %, shape 49 %); 16x16x4 keeps
    # them, and gives the DiT 64 tokens, enough for window attention and ToDo to mean something.
    "dit": VAEConfig(latent_channels=4, block_out_channels=(16, 32, 64), layers_per_block=1,
                     norm_num_groups=16, use_quant_conv=True, use_post_quant_conv=True,
                     scaling_factor=1.0, shift_factor=0.0, force_upcast=False),
}
LATENT = scenes.IMAGE_SIZE // 8  # SD3 demo: 8x8x16 latents
DIT_LATENT = scenes.IMAGE_SIZE // 4  # DiT demo: 16x16x4 latents

# Text side of the SD3 demo: tiny frozen random encoders. CLIP reads 16 tokens (prompts here
# are at most 12), T5 16 (the recorded max_sequence_length).
CLIP_MAX_LENGTH = 16
T5_MAX_LENGTH = 16
CLIP_L = dict(width=64, layers=2, heads=2, activation="quick_gelu", projection_dim=64)
CLIP_G = dict(width=96, layers=2, heads=2, activation="gelu", projection_dim=96)
T5 = dict(d_model=192, d_kv=32, d_ff=384, layers=2, heads=4, relative_buckets=32, relative_max_distance=128)


def mmdit_config():
    from dite.models.mmdit import MMDiTConfig

    return MMDiTConfig(depth=12, num_heads=4, head_dim=32, patch_size=2, in_channels=16, out_channels=16,
                       pos_embed_max_size=8, context_dim=T5["d_model"],
                       pooled_dim=CLIP_L["projection_dim"] + CLIP_G["projection_dim"], sample_size=LATENT)


def dit_config():
    from dite.models.dit import DiTConfig

    # freq_shift 1 / mlp_norm_eps 1e-5: the numerics of diffusers' DiTTransformer2DModel,
    # the layout the model ships in, so the trained function is exactly the shipped one.
    # 1000 class rows (only the first NUM_CLASSES are data) because diffusers' DiTPipeline
    # hard-codes 1000 as the null class, as in ImageNet DiTs. diffusers' layout stores the
    # class table and timestep MLP once per block, hence width 96 to stay in the 30 MB budget.
    return DiTConfig(hidden_size=96, depth=12, num_heads=3, patch_size=2, in_channels=4, out_channels=8,
                     num_classes=1000, input_size=DIT_LATENT, freq_shift=1.0, mlp_norm_eps=1e-5)


# ---------------------------------------------------------------------------- helpers


def generator(seed: int, stage: str, step: int) -> torch.Generator:
    code = sum((i + 1) * ord(ch) for i, ch in enumerate(stage))
    return torch.Generator().manual_seed((seed * 1_000_003 + code * 10_007 + step) % (2 ** 63))


class Logger:
    def __init__(self, folder: Path):
        self.path = folder / "loss.tsv"
        self.start = time.time()

    def log(self, step: int, **values):
        line = f"{step}\t{time.time() - self.start:.1f}\t" + "\t".join(f"{k}={v:.5f}" for k, v in values.items())
        with open(self.path, "a") as f:
            f.write(line + "\n")
        print(line, flush=True)


class EMA:
    """Exponential moving average of the weights with a warm-up (decay grows to `decay`)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int):
        d = min(self.decay, (1 + step) / (10 + step))
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1 - d)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class Run:
    """One stage's training loop state: model, EMA, optimiser, step; checkpoint / resume."""

    def __init__(self, name: str, model, args, *, lr: float, ema_decay: float, warmup: int = 200,
                 weight_decay: float = 0.0):
        self.name, self.args = name, args
        self.folder = Path(args.work) / name
        self.folder.mkdir(parents=True, exist_ok=True)
        self.model = model
        self.ema = EMA(model, ema_decay)
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                     weight_decay=weight_decay, betas=(0.9, 0.99))
        self.peak, self.warmup = lr, warmup
        self.step = 0
        self.logger = Logger(self.folder)
        self.last_save = time.time()
        last = self.folder / "last.pt"
        if last.exists() and not args.fresh:
            state = torch.load(last, weights_only=True)
            self.model.load_state_dict(state["model"])
            self.ema.model.load_state_dict(state["ema"])
            self.opt.load_state_dict(state["opt"])
            self.step = state["step"]
            print(f"[{name}] resumed at step {self.step}", flush=True)

    def train_step(self, loss: torch.Tensor):
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.step, self.args.steps, self.peak, self.warmup)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.ema.update(self.model, self.step)
        self.step += 1
        if time.time() - self.last_save > 60 * self.args.checkpoint_minutes:
            self.save()

    def save(self):
        state = {"model": self.model.state_dict(), "ema": self.ema.model.state_dict(),
                 "opt": self.opt.state_dict(), "step": self.step}
        torch.save(state, self.folder / "last.tmp")
        os.replace(self.folder / "last.tmp", self.folder / "last.pt")
        self.last_save = time.time()

    def finish(self, extra: dict):
        self.save()
        torch.save({"ema": self.ema.model.state_dict(), "model": self.model.state_dict(), **extra},
                   self.folder / "final.pt")
        print(f"[{self.name}] done: {self.folder / 'final.pt'}", flush=True)


def autocast(args):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.fp32)


def done(args, name: str) -> bool:
    """True when the stage's final weights exist and reached the step asked for; a stage stopped
    early (--stop-at, --max-minutes) resumes from last.pt when asked for more steps."""
    folder = Path(args.work) / name
    final, meta = folder / "final.pt", folder / "meta.json"
    if not final.exists() or args.fresh:
        return False
    reached = json.loads(meta.read_text()).get("steps", 0) if meta.exists() else 0
    target = args.stop_at or args.steps or 0
    if target and reached < target and (folder / "last.pt").exists():
        print(f"[{name}] {final} stopped at step {reached}; resuming towards {target}", flush=True)
        return False
    print(f"[{name}] {final} exists; skipping (use --fresh to retrain)", flush=True)
    return True


def write_meta(folder: Path, **meta):
    path = folder / "meta.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    old.update(meta)
    path.write_text(json.dumps(old, indent=2))


# ---------------------------------------------------------------------------- VAE


def train_vae(args, data=scenes, model: AutoencoderKL | None = None, warmup: int = 50):
    """Train (or, given `model`, fine-tune) a VAE on the scenes of `data` (a scenes module)."""
    name = f"vae_{args.family}"
    if done(args, name):
        return
    torch.manual_seed(args.seed)
    model = (model or AutoencoderKL(VAE_CONFIGS[args.family])).train()
    config = model.config
    run = Run(name, model, args, lr=args.lr or 1.5e-3, ema_decay=0.995, warmup=warmup)
    started = time.time()
    while run.step < (args.stop_at or args.steps):
        images, found = data.sample_scenes(args.seed, args.batch, start=run.step * args.batch)
        x = scenes.to_tensor(images)
        # Object pixels weigh `object_weight` times more: the object is ~5 % of the image,
        # and without this the decoder learns the background long before the colours.
        # Objects never touch the border, so its median is the (plain) background colour.
        pixels = torch.from_numpy(images).float()
        border = torch.cat([pixels[:, 0], pixels[:, -1], pixels[:, :, 0], pixels[:, :, -1]], dim=1)
        background = border.median(dim=1).values.view(-1, 3, 1, 1)
        on_object = (torch.from_numpy(images).permute(0, 3, 1, 2).float() - background).abs().amax(1, keepdim=True) > 12
        weight = 1 + args.object_weight * on_object.float()
        weight = weight / weight.mean()
        g = generator(args.seed, name, run.step)
        with autocast(args):
            dist = model.encode(x)
            z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g)
            recon = model.decode(z).float()
        l1 = ((recon - x).abs() * weight).mean()
        l2 = ((recon - x).pow(2) * weight).mean()
        kl = 0.5 * (dist.mean.float().pow(2) + dist.logvar.float().exp() - 1 - dist.logvar.float()).mean()
        loss = l1 + l2 + args.kl * kl
        run.train_step(loss)
        if run.step % 20 == 0 or run.step == 1:
            run.logger.log(run.step, loss=loss.item(), l1=l1.item(), l2=l2.item(), kl=kl.item())
        if args.max_minutes and time.time() - started > 60 * args.max_minutes:
            print(f"[{name}] time budget reached at step {run.step}", flush=True)
            break
    stats = latent_stats(run.ema.model, args, data)
    print(f"[{name}] latent stats: {stats}", flush=True)
    run.finish({"config": config.__dict__ | {"block_out_channels": list(config.block_out_channels)}, **stats,
                "steps": run.step})
    write_meta(run.folder, steps=run.step, batch=args.batch, seed=args.seed, wall_s=time.time() - started,
               final_l1=l1.item(), final_l2=l2.item(), **stats)


@torch.no_grad()
def latent_stats(vae: AutoencoderKL, args, data=scenes, n: int = 2048) -> dict:
    """Scaling (and for SD3 shift) so the denoiser sees zero-mean, unit-variance latents."""
    images, _ = data.sample_scenes(args.seed + 777, n)
    zs = []
    for i in range(0, n, 256):
        with autocast(args):
            zs.append(vae.encode_mean(scenes.to_tensor(images[i:i + 256])).float())
    z = torch.cat(zs)
    if vae.config.latent_channels == 16:  # SD3: shift by the mean, scale by 1/std
        shift = z.mean().item()
        return {"shift_factor": shift, "scaling_factor": 1.0 / z.std().item()}
    return {"shift_factor": 0.0, "scaling_factor": 1.0 / z.pow(2).mean().sqrt().item()}


def load_vae(args, family: str) -> AutoencoderKL:
    final = torch.load(Path(args.work) / f"vae_{family}" / "final.pt", weights_only=True)
    cfg = dict(final["config"])
    cfg.update(scaling_factor=final["scaling_factor"], shift_factor=final["shift_factor"])
    vae = AutoencoderKL(VAEConfig(**cfg))
    vae.load_state_dict(final["ema"])
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def latent_pool(vae: AutoencoderKL, args, n: int, data=scenes) -> tuple[torch.Tensor, list]:
    """Model-space latents (encoder means) of training scenes 0..n-1 of stream seed+1, cached."""
    family = "sd3" if vae.config.latent_channels == 16 else "dit"
    down = 2 ** (len(vae.config.block_out_channels) - 1)
    path = Path(args.work) / f"pool_{family}_f{down}_{n}.pt"
    images, found = data.sample_scenes(args.seed + 1, n)
    if path.exists():
        return torch.load(path, weights_only=True), found
    zs = []
    t0 = time.time()
    for i in range(0, n, 256):
        with autocast(args):
            zs.append(vae.to_model_space(vae.encode_mean(scenes.to_tensor(images[i:i + 256])).float()))
    z = torch.cat(zs)
    print(f"encoded {n} scenes in {time.time() - t0:.0f}s; latent mean {z.mean():.3f} std {z.std():.3f}", flush=True)
    torch.save(z, path)
    return z, found


# ---------------------------------------------------------------------------- text encoders


def train_clip_bpe(folder: Path, texts: list[str], pad_token: str | None):
    """CLIP's byte-level BPE learned on the captions, written as OpenAI's vocab.json/merges.txt
    (256 byte characters, the same with "</w>", merges in rank order, then BOS and EOS)."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    split = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), "removed", invert=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    trainer = trainers.BpeTrainer(vocab_size=1000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  end_of_word_suffix="</w>", show_progress=False)
    tok.train_from_iterator(texts, trainer)
    merges = [m if isinstance(m, list) else m.split(" ") for m in json.loads(tok.to_str())["model"]["merges"]]
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(rest))]
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars])}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    pad = pad_token or "<|endoftext|>"
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": CLIP_MAX_LENGTH, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": pad,
        "do_lower_case": True, "clean_up_tokenization_spaces": False}, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": pad}, indent=2))
    return vocab


def train_spiece(folder: Path, texts: list[str]):
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=str(folder / "spiece"), model_type="unigram",
        vocab_size=200, hard_vocab_limit=False, character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        minloglevel=2, num_threads=1, seed_sentencepiece_size=100000, shuffle_input_sentence=False)
    (folder / "spiece.vocab").unlink()
    sp = spm.SentencePieceProcessor(model_file=str(folder / "spiece.model"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "T5Tokenizer", "model_max_length": 512, "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": "<pad>", "extra_ids": 0, "legacy": True}, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}, indent=2))
    return sp.get_piece_size()


def tokenizer_texts() -> list[str]:
    """What the tokenizers learn from: every caption (both splits: the vocabulary is the
    language, not the data) in mixed case, plus the bare words."""
    caps = scenes.all_captions(None)
    words = sorted({w for c in caps for w in c.replace(",", " ").split()})
    return caps + [c.lower() for c in caps] + words


def build_text(args, texts: list[str] | None = None):
    """Tokenizers trained on the caption vocabulary (`texts`, by default the first demos')
    and frozen random text encoders (seeded)."""
    from dite.models.clip import CLIPTextConfig, CLIPTextModel
    from dite.models.t5 import T5Config, T5Encoder

    folder = Path(args.work) / "text"
    if (folder / "encoders.pt").exists() and not args.fresh:
        print(f"[text] {folder} exists; skipping", flush=True)
        return
    texts = texts or tokenizer_texts()
    vocab = train_clip_bpe(folder / "tokenizer", texts, None)
    train_clip_bpe(folder / "tokenizer_2", texts, "!")  # bigG pads with "!", as SD3's does
    pieces = train_spiece(folder / "tokenizer_3", texts)
    torch.manual_seed(args.seed + 17)
    clip_l = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), max_positions=CLIP_MAX_LENGTH, **CLIP_L))
    clip_g = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), max_positions=CLIP_MAX_LENGTH, **CLIP_G))
    t5 = T5Encoder(T5Config(vocab_size=pieces, **T5))
    with torch.no_grad():  # fp16-representable values: the shipped fp16 files hold exactly these encoders
        for module in (clip_l, clip_g, t5):
            for tensor in module.state_dict().values():
                tensor.copy_(tensor.half().float())
    configs = {"clip_l": clip_l.config.__dict__, "clip_g": clip_g.config.__dict__, "t5": t5.config.__dict__}
    torch.save({"clip_l": clip_l.state_dict(), "clip_g": clip_g.state_dict(), "t5": t5.state_dict(),
                "configs": configs}, folder / "encoders.pt")
    enc = load_text(args)
    context, pooled = enc.encode(["a red circle at the top left", "a blue square on the right", ""],
                                 max_sequence_length=T5_MAX_LENGTH)
    print(f"[text] vocab {len(vocab)} / {pieces}; context {tuple(context.shape)} std {context.std():.3f}, "
          f"pooled std {pooled.std():.3f}; caption distance {(context[0] - context[1]).norm() / context[0].norm():.3f}",
          flush=True)


def load_text(args):
    """The SD3TextEncoders that dite's SD3 pipeline runs (same tokenizers, same encode)."""
    from dite.engine.pipelines.sd3_prompts import SD3TextEncoders
    from dite.models.clip import CLIPTextConfig, CLIPTextModel
    from dite.models.t5 import T5Config, T5Encoder
    from dite.models.tokenizers import CLIPTokenizer, T5Tokenizer

    folder = Path(args.work) / "text"
    state = torch.load(folder / "encoders.pt", weights_only=True)
    c = state["configs"]
    clip_l, clip_g, t5 = (CLIPTextModel(CLIPTextConfig(**c["clip_l"])), CLIPTextModel(CLIPTextConfig(**c["clip_g"])),
                          T5Encoder(T5Config(**c["t5"])))
    for module, key in ((clip_l, "clip_l"), (clip_g, "clip_g"), (t5, "t5")):
        module.load_state_dict(state[key])
        module.eval().requires_grad_(False)
    return SD3TextEncoders(clip_l=clip_l, clip_g=clip_g, tokenizer_l=CLIPTokenizer.from_folder(folder / "tokenizer"),
                           tokenizer_g=CLIPTokenizer.from_folder(folder / "tokenizer_2"), t5=t5,
                           tokenizer_t5=T5Tokenizer.from_folder(folder / "tokenizer_3"), t5_width=T5["d_model"])


# ---------------------------------------------------------------------------- denoiser init


def init_denoiser(model: torch.nn.Module):
    """DiT's initialisation: xavier linears, N(0, 0.02) embeddings, zeroed adaLN modulation
    and output projection (each block starts as the identity)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)
    w = model.x_embedder.proj.weight
    torch.nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    torch.nn.init.zeros_(model.x_embedder.proj.bias)
    for lin in (model.t_embedder.mlp[0], model.t_embedder.mlp[2]):
        torch.nn.init.normal_(lin.weight, std=0.02)
    for block in model.blocks:
        for sub in block.modules():
            if hasattr(sub, "adaLN_modulation"):
                torch.nn.init.zeros_(sub.adaLN_modulation[-1].weight)
                torch.nn.init.zeros_(sub.adaLN_modulation[-1].bias)
    torch.nn.init.zeros_(model.final_layer.adaLN_modulation[-1].weight)
    torch.nn.init.zeros_(model.final_layer.adaLN_modulation[-1].bias)
    torch.nn.init.zeros_(model.final_layer.linear.weight)
    torch.nn.init.zeros_(model.final_layer.linear.bias)


# ---------------------------------------------------------------------------- MMDiT (SD3)


def encode_captions(text, found) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SD3 conditioning of every distinct training caption ("" first, for guidance): (context,
    pooled, caption index of each scene)."""
    captions = [""] + sorted({s.caption for s in found})
    index = {c: i for i, c in enumerate(captions)}
    contexts, pooleds = [], []
    for i in range(0, len(captions), 128):
        ctx, pld = text.encode(captions[i:i + 128], max_sequence_length=T5_MAX_LENGTH)
        contexts.append(ctx)
        pooleds.append(pld)
    return torch.cat(contexts), torch.cat(pooleds), torch.tensor([index[s.caption] for s in found])


def dropped(ids: torch.Tensor, null: int, args, g: torch.Generator) -> torch.Tensor:
    """Conditioning indices with a fraction args.drop replaced by the null one (for guidance)."""
    ids = ids.clone()
    ids[torch.rand(len(ids), generator=g) < args.drop] = null
    return ids


def train_mmdit(args, data=scenes, cfg=None):
    """The SD3-architecture denoiser on the scenes of `data` (rectified flow)."""
    from dite.models.layers import sincos_pos_embed_2d
    from dite.models.mmdit import MMDiT

    name = "mmdit"
    if done(args, name):
        return
    vae = load_vae(args, "sd3")
    pool, found = latent_pool(vae, args, args.pool, data)
    contexts, pooleds, caption_ids = encode_captions(load_text(args), found)
    print(f"[mmdit] {len(contexts)} captions encoded: context {tuple(contexts.shape)}", flush=True)

    torch.manual_seed(args.seed)
    cfg = cfg or mmdit_config()
    model = MMDiT(cfg)
    init_denoiser(model)
    m, base = cfg.pos_embed_max_size, cfg.sample_size // cfg.patch_size
    model.pos_embed.copy_(sincos_pos_embed_2d(cfg.hidden_size, m, m, base_size=base).unsqueeze(0))
    model.train()
    run = Run(name, model, args, lr=args.lr or 8e-4, ema_decay=0.999, warmup=100)
    started, avg = time.time(), None
    while run.step < (args.stop_at or args.steps):
        g = generator(args.seed, name, run.step)
        idx = torch.randint(0, len(pool), (args.batch,), generator=g)
        x0 = pool[idx]
        cap = dropped(caption_ids[idx], 0, args, g)  # 0: ""
        t = torch.sigmoid(torch.randn(args.batch, generator=g))  # logit-normal(0, 1)
        noise = torch.randn(x0.shape, generator=g)
        tb = t.view(-1, 1, 1, 1)
        xt = (1 - tb) * x0 + tb * noise
        cond = Conditioning(context=contexts[cap], pooled=pooleds[cap])
        with autocast(args):
            pred = model(xt, t * 1000, cond).float()
        loss = F.mse_loss(pred, noise - x0)
        run.train_step(loss)
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        if run.step % 25 == 0 or run.step == 1:
            run.logger.log(run.step, loss=loss.item(), avg=avg, lr=run.opt.param_groups[0]["lr"] * 1e3)
        if args.max_minutes and time.time() - started > 60 * args.max_minutes:
            print(f"[{name}] time budget reached at step {run.step}", flush=True)
            break
    run.finish({"config": cfg.to_dict(), "steps": run.step, "max_sequence_length": T5_MAX_LENGTH})
    write_meta(run.folder, steps=run.step, batch=args.batch, seed=args.seed, wall_s=time.time() - started,
               final_loss_avg=avg, caption_dropout=args.drop, pool=args.pool, max_sequence_length=T5_MAX_LENGTH)


# ---------------------------------------------------------------------------- DDPM (DiT, PixArt)


def train_ddpm(args, name: str, model, pool: torch.Tensor, condition, extra: dict):
    """The improved-DDPM hybrid-loss loop (cosine schedule, learned range) of the DiT and PixArt
    demos; `condition(idx, g)` gives the Conditioning of the sampled scenes (with dropout)."""
    model.train()
    diffusion = GaussianDiffusion()
    run = Run(name, model, args, lr=args.lr or 5e-4, ema_decay=0.999, warmup=200)
    started, avg = time.time(), None
    while run.step < (args.stop_at or args.steps):
        g = generator(args.seed, name, run.step)
        idx = torch.randint(0, len(pool), (args.batch,), generator=g)
        x0 = pool[idx]
        cond = condition(idx, g)
        t = torch.randint(0, diffusion.T, (args.batch,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        xt = diffusion.q_sample(x0, t, noise)
        with autocast(args):
            out = model(xt, t.float(), cond).float()
        mse, vb = diffusion.loss(out, x0, xt, t, noise, getattr(args, "min_snr", 0.0))
        loss = mse + vb
        run.train_step(loss)
        avg = mse.item() if avg is None else 0.98 * avg + 0.02 * mse.item()
        if run.step % 25 == 0 or run.step == 1:
            run.logger.log(run.step, loss=loss.item(), mse=mse.item(), vb=vb.item(), avg_mse=avg)
        if args.max_minutes and time.time() - started > 60 * args.max_minutes:
            print(f"[{name}] time budget reached at step {run.step}", flush=True)
            break
    run.finish({"config": model.config.to_dict(), "steps": run.step, **extra})
    write_meta(run.folder, steps=run.step, batch=args.batch, seed=args.seed, wall_s=time.time() - started,
               final_mse_avg=avg, conditioning_dropout=args.drop, pool=args.pool, **extra)


def train_dit(args):
    from dite.models.dit import DiT

    name = "dit"
    if done(args, name):
        return
    vae = load_vae(args, "dit")
    pool, found = latent_pool(vae, args, args.pool)
    labels = torch.tensor([s.attributes.class_id for s in found])
    torch.manual_seed(args.seed)
    cfg = dit_config()
    model = DiT(cfg)
    model.init_computed_buffers(torch.device("cpu"))
    init_denoiser(model)
    torch.nn.init.normal_(model.y_embedder.embedding_table.weight, std=0.02)

    def condition(idx, g):  # dropped labels become cfg.num_classes, the null class
        return Conditioning(class_labels=dropped(labels[idx], cfg.num_classes, args, g))

    train_ddpm(args, name, model, pool, condition, {})


# ---------------------------------------------------------------------------- main

DEFAULTS = {  # stage -> (steps, batch, pool)
    "vae": (1200, 8, 0),
    "mmdit": (2000, 24, 8000),
    "dit": (3000, 64, 8000),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["vae", "text", "mmdit", "dit"])
    p.add_argument("--family", choices=["sd3", "dit"], default="sd3", help="which VAE (vae stage)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--pool", type=int, help="training scenes encoded once for the denoiser stages")
    p.add_argument("--lr", type=float)
    p.add_argument("--kl", type=float, default=1e-6, help="KL weight of the VAE loss")
    p.add_argument("--object-weight", type=float, default=20.0, help="extra loss weight of object pixels (VAE)")
    p.add_argument("--drop", type=float, default=0.1, help="caption / class dropout for CFG")
    p.add_argument("--max-minutes", type=float, default=0, help="stop early after this long (0: never)")
    p.add_argument("--stop-at", type=int, default=0,
                   help="stop after this step, the learning-rate schedule still planned for --steps (this is how "
                        "a run that --max-minutes cut short is reproduced exactly)")
    p.add_argument("--checkpoint-minutes", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    p.add_argument("--fresh", action="store_true", help="ignore existing checkpoints")
    p.add_argument("--work", default=str(WORK))
    args = p.parse_args(argv)
    steps, batch, pool = DEFAULTS.get(args.stage, (0, 0, 0))
    args.steps = args.steps or steps
    args.batch = args.batch or batch
    args.pool = args.pool or pool
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    {"vae": train_vae, "text": build_text, "mmdit": train_mmdit, "dit": train_dit}[args.stage](args)


if __name__ == "__main__":
    main()
