"""Which Stable Diffusion 3 release an MMDiT config is (docs/checkpoints.md §1.3, §1.6).

The releases differ in shapes only where it matters here: depth (hence width, 64 per
head and one head per block), qk-norm and MMDiT-X dual attention. SD3.5-Large and
Large-Turbo share one architecture, so shapes cannot tell them apart; both are
"sd3.5-large" here.
"""

from __future__ import annotations

from dite.models.mmdit import MMDiTConfig

# name -> (depth, qk_norm, has dual-attention blocks, stored position grid side)
RELEASES = {
    "sd3-medium": (24, False, False, 192),
    "sd3.5-large": (38, True, False, 192),
    "sd3.5-medium": (24, True, True, 384),
}
NOT_A_RELEASE = "custom"


def sd3_release(cfg: MMDiTConfig) -> str:
    """"sd3-medium", "sd3.5-large" (or large-turbo) or "sd3.5-medium"; "custom" for shapes
    no release has (fine-tunes keep their base model's shapes and name)."""
    if cfg.head_dim != 64 or cfg.num_heads != cfg.depth:
        return NOT_A_RELEASE
    shape = (cfg.depth, cfg.qk_norm, bool(cfg.dual_attention_layers), cfg.pos_embed_max_size)
    return next((name for name, release in RELEASES.items() if release == shape), NOT_A_RELEASE)
