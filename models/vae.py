"""The KL autoencoder (VAE) of SD 1.x / SDXL / SD3, and how its checkpoints are named.

One architecture serves all three families (only the latent channels, the quant convs and
the latent scaling differ): an Encoder of ResNet blocks with stride-2 downsampling, one
single-head attention over channels in the middle, and a mirrored Decoder with nearest 2x
upsampling. Parameter names are diffusers' `AutoencoderKL` names, so a diffusers `vae/`
folder maps one to one; the original LDM layout (`encoder.down.k.block.j`, `mid.attn_1`,
reversed `decoder.up.k`) is mapped by `vae_keymap`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from dite.models.attention import attention
from dite.engine.errors import CheckpointError, ConfigError
from dite.models.config_fields import check_fields, check_instance
from dite.models.checkpoint import KeyMap, Source, count_indexed, take, transformed

# diffusers hard-codes eps 1e-6 in every VAE norm (torch's default would be 1e-5).
_EPS = 1e-6

# The config.json fields from_diffusers reads, by kind (models/config_fields.py).
DIFFUSERS_FIELDS = {
    "latent_channels": "size", "block_out_channels": "sizes", "layers_per_block": "size", "norm_num_groups": "size",
    "in_channels": "size", "out_channels": "size", "use_quant_conv": "bool", "use_post_quant_conv": "bool",
    "mid_block_add_attention": "bool", "scaling_factor": "positive", "shift_factor": "number", "force_upcast": "bool",
    "down_block_types": "strings", "up_block_types": "strings", "act_fn": "str",
}


@dataclass(frozen=True)
class VAEConfig:
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2  # encoder resnets per level; the decoder has one more
    norm_num_groups: int = 32
    in_channels: int = 3
    out_channels: int = 3
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    # A hint for pipelines: this VAE overflows in fp16, decode it in fp32 (SDXL, SD3).
    force_upcast: bool = True

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        check_instance(self, "VAE config", signed=("shift_factor",))
        if not self.block_out_channels or min(self.block_out_channels) <= 0:
            raise ConfigError(f"VAE config: block_out_channels must be a non-empty list of positive integers, "
                              f"got {list(self.block_out_channels)}")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ConfigError(
                f"VAE block_out_channels {self.block_out_channels} must be divisible by "
                f"norm_num_groups {self.norm_num_groups}"
            )

    @classmethod
    def sd(cls) -> "VAEConfig":
        """sd-vae-ft-ema / -mse (SD 1.x, DiT, PixArt-α)."""
        return cls(latent_channels=4, scaling_factor=0.18215)

    @classmethod
    def sdxl(cls) -> "VAEConfig":
        """SDXL VAE (PixArt-Σ): same shapes as SD's, only the scaling factor differs."""
        return cls(latent_channels=4, scaling_factor=0.13025)

    @classmethod
    def sd3(cls) -> "VAEConfig":
        """SD3 / SD3.5: 16 latent channels, no quant convs, shifted latents."""
        return cls(
            latent_channels=16,
            use_quant_conv=False,
            use_post_quant_conv=False,
            scaling_factor=1.5305,
            shift_factor=0.0609,
        )

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> "VAEConfig":
        """From a diffusers `vae/config.json`; absent fields take diffusers' defaults."""
        check_fields(config, "VAE config", DIFFUSERS_FIELDS)
        if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            raise ConfigError(f"VAE config is for {config['_class_name']}, dite supports AutoencoderKL only")
        channels = tuple(config.get("block_out_channels", (64,)))
        for field, expected in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = tuple(config.get(field, (expected,) * len(channels)))
            if types != (expected,) * len(channels):
                raise ConfigError(f"VAE {field} {types} unsupported: expected {expected} for each of {len(channels)} levels")
        if config.get("act_fn", "silu") != "silu":
            raise ConfigError(f"VAE act_fn {config['act_fn']!r} unsupported (only silu)")
        for field in ("latents_mean", "latents_std"):
            if config.get(field) is not None:
                raise ConfigError(f"VAE config sets {field}: per-channel latent statistics are not supported")
        shift = config.get("shift_factor")
        return cls(
            latent_channels=config.get("latent_channels", 4),
            block_out_channels=channels,
            layers_per_block=config.get("layers_per_block", 1),
            norm_num_groups=config.get("norm_num_groups", 32),
            in_channels=config.get("in_channels", 3),
            out_channels=config.get("out_channels", 3),
            use_quant_conv=config.get("use_quant_conv", True),
            use_post_quant_conv=config.get("use_post_quant_conv", True),
            mid_block_add_attention=config.get("mid_block_add_attention", True),
            scaling_factor=float(config.get("scaling_factor", 0.18215)),
            shift_factor=float(shift) if shift is not None else 0.0,
            force_upcast=config.get("force_upcast", True),
        )


    def to_diffusers(self) -> dict[str, Any]:
        """The diffusers `vae/config.json` of this config (inverse of from_diffusers)."""
        levels = len(self.block_out_channels)
        return {
            "_class_name": "AutoencoderKL", "act_fn": "silu",
            "in_channels": self.in_channels, "out_channels": self.out_channels,
            "latent_channels": self.latent_channels, "block_out_channels": list(self.block_out_channels),
            "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
            "layers_per_block": self.layers_per_block, "norm_num_groups": self.norm_num_groups,
            "use_quant_conv": self.use_quant_conv, "use_post_quant_conv": self.use_post_quant_conv,
            "mid_block_add_attention": self.mid_block_add_attention,
            "scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor or None,
            "force_upcast": self.force_upcast,
        }

# ----------------------------------------------------------------------------- modules


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=_EPS)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = _norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout, groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Attention(nn.Module):
    """Single-head self-attention over the H*W positions, channels as the head dim."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = _norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.group_norm(x).reshape(b, c, h * w).transpose(1, 2)  # [B, N, C]
        q, k, v = (proj(tokens).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))
        out = self.to_out[0](attention(q, k, v).squeeze(1))
        # Output first, as diffusers does: the transposed view makes the sum channels-last, and
        # keeping that memory format downstream keeps fp32 results bit-identical to diffusers.
        return out.transpose(1, 2).reshape(b, c, h, w) + x


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, add_attention: bool):
        super().__init__()
        self.attentions = nn.ModuleList([Attention(channels, groups)] if add_attention else [])
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # LDM pads right and bottom only, so the stride-2 grid starts at the top-left pixel.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: resnets, then an optional down- or upsampler."""

    def __init__(self, cin: int, cout: int, layers: int, groups: int, resample: type[nn.Module] | None, name: str):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(layers)])
        setattr(self, name, nn.ModuleList([resample(cout)] if resample else []))
        self._resamplers = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        for resample in getattr(self, self._resamplers):
            x = resample(x)
        return x


class Encoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        ch, g = c.block_out_channels, c.norm_num_groups
        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            Level(ch[max(i - 1, 0)], ch[i], c.layers_per_block, g, Downsample if i < len(ch) - 1 else None, "downsamplers")
            for i in range(len(ch))
        )
        self.mid_block = MidBlock(ch[-1], g, c.mid_block_add_attention)
        self.conv_norm_out = _norm(ch[-1], g)
        self.conv_out = nn.Conv2d(ch[-1], 2 * c.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level in self.down_blocks:
            x = level(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        ch, g = tuple(reversed(c.block_out_channels)), c.norm_num_groups
        self.conv_in = nn.Conv2d(c.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g, c.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            Level(ch[max(i - 1, 0)], ch[i], c.layers_per_block + 1, g, Upsample if i < len(ch) - 1 else None, "upsamplers")
            for i in range(len(ch))
        )
        self.conv_norm_out = _norm(ch[-1], g)
        self.conv_out = nn.Conv2d(ch[-1], c.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for level in self.up_blocks:
            x = level(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


@dataclass
class LatentDistribution:
    """The encoder's diagonal Gaussian over raw latents (logvar already clamped)."""

    mean: torch.Tensor
    logvar: torch.Tensor

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        # Draw on the generator's device, as diffusers does, so seeds give the same latents.
        device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        c = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c, c, 1) if config.use_post_quant_conv else None

    @property
    def downscale(self) -> int:
        """Pixels per latent along each side (8 for the real VAEs)."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    def encode(self, images: torch.Tensor) -> LatentDistribution:
        """Images in [-1, 1], [B, 3, H, W] -> distribution over raw latents [B, C, H/8, W/8]."""
        moments = self.encoder(images)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)
        return LatentDistribution(mean, logvar.clamp(-30.0, 20.0))

    def encode_mean(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode(images).mean

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents (not model space) -> images, nominally in [-1, 1] (not clamped)."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def to_model_space(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents -> what the denoiser sees: (z - shift) * scale."""
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def from_model_space(self, latents: torch.Tensor) -> torch.Tensor:
        """Denoiser latents -> raw latents: latents / scale + shift (diffusers' order)."""
        return latents / self.config.scaling_factor + self.config.shift_factor


# ----------------------------------------------------------------------------- checkpoints

LAYOUTS = ("diffusers", "ldm")
_ANCHOR = "decoder.conv_in.weight"
_KNOWN_PREFIXES = ("", "first_stage_model.", "vae.")
# Training leftovers of LDM files: the GAN discriminator / LPIPS loss and EMA bookkeeping.
_IGNORED_SUBTREES = ("loss.", "model_ema.")


def find_vae_prefix(keys: Iterable[str]) -> str:
    """The prefix the VAE's tensors sit under: "", "first_stage_model.", "vae." or other."""
    found = sorted({k[: -len(_ANCHOR)] for k in keys if k.endswith(_ANCHOR)})
    found = [p for p in found if p == "" or p.endswith(".")]
    if not found:
        raise CheckpointError(f"no VAE in this checkpoint: no key ends with {_ANCHOR!r}")
    if len(found) > 1:
        known = [p for p in _KNOWN_PREFIXES if p in found]
        if not known:
            raise CheckpointError(f"several VAEs in this checkpoint (prefixes {found}); pass the prefix to use")
        return known[0]
    return found[0]


def vae_layout(keys: Iterable[str], prefix: str = "") -> str:
    """ "diffusers" (`decoder.up_blocks.*`) or "ldm" (`decoder.up.*`) for the VAE under `prefix`."""
    for key in keys:
        if key.startswith(prefix + "decoder.up_blocks."):
            return "diffusers"
        if key.startswith(prefix + "decoder.up."):
            return "ldm"
    raise CheckpointError(f"cannot tell the VAE layout under prefix {prefix!r}: no decoder up blocks")


def detect_vae(
    keys: Iterable[str],
    shapes: Mapping[str, tuple[int, ...]],
    *,
    prefix: str | None = None,
    scaling_factor: float | None = None,
    shift_factor: float | None = None,
    norm_num_groups: int = 32,
) -> tuple[VAEConfig, str]:
    """Infer the VAE config and layout ("diffusers" or "ldm") from tensor names and shapes.

    Read from shapes: latent channels (`decoder.conv_in.weight` dim 1), block channels and
    levels, resnets per level, in/out channels, quant convs, mid attention. NOT inferable:
    the latent scaling (SD and SDXL VAEs have identical shapes) and the GroupNorm group
    count. Pass `scaling_factor` / `shift_factor` when you know the model family; without
    them 16 latent channels get SD3's (1.5305, 0.0609) and anything else SD's (0.18215, 0),
    which is wrong for the SDXL VAE (0.13025). `norm_num_groups` is 32 in every release.
    """
    keys = list(keys)
    prefix = find_vae_prefix(keys) if prefix is None else prefix
    names = {k[len(prefix):] for k in keys if k.startswith(prefix)}

    def shape(name: str) -> tuple[int, ...]:
        if name not in names:
            raise CheckpointError(f"VAE tensor {prefix + name!r} is missing; the file is not a KL autoencoder")
        return tuple(shapes[prefix + name])

    layout = vae_layout(keys, prefix)
    levels, block = ("encoder.down_blocks.", "resnets") if layout == "diffusers" else ("encoder.down.", "block")

    n_levels = count_indexed(names, levels)
    channels = tuple(shape(f"{levels}{i}.{block}.0.conv1.weight")[0] for i in range(n_levels))
    latent = shape(_ANCHOR)[1]
    attn = "attentions.0" if layout == "diffusers" else "attn_1"
    mid = "mid_block" if layout == "diffusers" else "mid"
    if scaling_factor is None:
        scaling_factor = 1.5305 if latent == 16 else 0.18215
    if shift_factor is None:
        shift_factor = 0.0609 if latent == 16 else 0.0
    config = VAEConfig(
        latent_channels=latent,
        block_out_channels=channels,
        layers_per_block=count_indexed(names, f"{levels}0.{block}."),
        norm_num_groups=norm_num_groups,
        in_channels=shape("encoder.conv_in.weight")[1],
        out_channels=shape("decoder.conv_out.weight")[0],
        use_quant_conv="quant_conv.weight" in names,
        use_post_quant_conv="post_quant_conv.weight" in names,
        mid_block_add_attention=any(n.startswith(f"encoder.{mid}.{attn}.") for n in names),
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    )
    return config, layout


def _conv1x1_as_linear(key: str, features: int) -> Source:
    """LDM's attention projections are 1x1 convs [C, C, 1, 1]; ours are Linear [C, C].

    Flattening (not a fixed reshape) never fails, so a mis-sized kernel reaches the
    loader's shape check and is reported by name."""
    return transformed(key, lambda t: t.reshape(t.shape[0], -1) if t.dim() > 1 else t,
                       lambda t: t.reshape(*t.shape, 1, 1) if t.dim() == 2 else t, f"reshape{(features, features)}")


# Our (= diffusers) attention names -> their names in old diffusers files and in LDM files.
_OLD_ATTN = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn", "group_norm": "group_norm"}
_LDM_ATTN = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out", "group_norm": "norm"}
_ATTN = re.compile(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0|group_norm)\.(weight|bias)$")


def _ldm_name(name: str, n_levels: int) -> str:
    """Our (diffusers) parameter name -> the LDM name; decoder levels count the other way."""
    attn = _ATTN.match(name)
    if attn:
        return f"{attn[1]}.mid.attn_1.{_LDM_ATTN[attn[2]]}.{attn[3]}"
    name = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", name)
    name = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", name)
    up = re.match(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.", name)
    if up:
        part = "block." if up[2] == "resnets" else "upsample."
        name = f"decoder.up.{n_levels - 1 - int(up[1])}.{part}" + name[up.end():]
    name = re.sub(r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m[1]) + 1}.", name)
    return name.replace(".conv_shortcut.", ".nin_shortcut.").replace(".conv_norm_out.", ".norm_out.")


def vae_keymap(config: VAEConfig, layout: str, keys: Iterable[str], prefix: str = "") -> tuple[KeyMap, set[str]]:
    """Key map from a checkpoint in `layout` (under `prefix`) onto AutoencoderKL(config).

    Returns the map and the checkpoint keys to ignore: everything outside `prefix` (the
    denoiser and text encoders of a single-file release) and LDM training leftovers.
    Old diffusers files' attention names (query/key/value/proj_attn) are accepted.
    """
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown VAE layout {layout!r}; expected one of {LAYOUTS}")
    keys = set(keys)
    with torch.device("meta"):
        names = list(AutoencoderKL(config).state_dict())
    channels = config.block_out_channels[-1]
    keymap: KeyMap = {}
    for name in names:
        attn = _ATTN.match(name)
        if layout == "ldm":
            source = _ldm_name(name, len(config.block_out_channels))
            if attn and attn[2] != "group_norm" and attn[3] == "weight":
                keymap[name] = _conv1x1_as_linear(prefix + source, channels)
                continue
        elif attn and prefix + name not in keys:
            source = f"{attn[1]}.mid_block.attentions.0.{_OLD_ATTN[attn[2]]}.{attn[3]}"
            source = source if prefix + source in keys else name  # neither: report the new name
        else:
            source = name
        keymap[name] = take(prefix + source)
    ignore = {k for k in keys if not k.startswith(prefix) or k[len(prefix):].startswith(_IGNORED_SUBTREES)}
    return keymap, ignore


def with_scaling(config: VAEConfig, scaling_factor: float | None, shift_factor: float | None) -> VAEConfig:
    """`config` with the latent scaling replaced where a value is given."""
    if scaling_factor is not None:
        config = replace(config, scaling_factor=float(scaling_factor))
    if shift_factor is not None:
        config = replace(config, shift_factor=float(shift_factor))
    return config
