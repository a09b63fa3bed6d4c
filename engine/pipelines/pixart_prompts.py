"""PixArt's prompt conditioning, as diffusers' PixArtAlpha/SigmaPipeline builds it: each prompt
lower-cased and stripped, T5-tokenized and padded to the model's length (120 α, 300 Σ), and
encoded by T5 with its padding mask; the states and the mask both reach the transformer.

diffusers' optional caption cleaning (`clean_caption=True`, active only where bs4 and ftfy
are installed) is not reproduced: dite always takes its fallback, lower().strip().
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dite.engine.errors import InputError
from dite.models.t5 import T5Encoder
from dite.models.tokenizers import T5Tokenizer

MAX_LENGTH = 512  # T5's relative positions are trained to 512 tokens


@dataclass
class PixArtText:
    t5: T5Encoder
    tokenizer: T5Tokenizer

    @torch.inference_mode()
    def encode(self, prompts: list[str], max_sequence_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(states [B, L, d_model] float32, mask [B, L] long: 1 on real tokens, EOS included)."""
        if not isinstance(max_sequence_length, int) or not 1 <= max_sequence_length <= MAX_LENGTH:
            raise InputError(f"max_sequence_length must be an integer in 1..{MAX_LENGTH}, got {max_sequence_length!r}")
        batch = self.tokenizer.encode([p.lower().strip() for p in prompts], max_length=max_sequence_length)
        device = self.t5.embed_tokens.weight.device
        states = self.t5(batch.ids.to(device), attention_mask=batch.mask.to(device))
        return states.float(), batch.mask
