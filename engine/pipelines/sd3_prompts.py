"""SD3's prompt conditioning, built exactly as diffusers' StableDiffusion3Pipeline builds it.

Per prompt: CLIP-L and bigG penultimate hidden states (before the final LayerNorm),
concatenated on channels and zero-padded to T5's width; T5's last hidden state (padded to
`max_sequence_length`, no mask) after them on the sequence axis; pooled = the two
projected CLIP pooled vectors side by side. Without T5 its tokens are zeros (diffusers'
behaviour when `text_encoder_3` is absent), a supported low-memory mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dite.engine.errors import InputError
from dite.models.clip import CLIPTextModel
from dite.models.t5 import T5Encoder
from dite.models.tokenizers import CLIPTokenizer, T5Tokenizer

T5_MAX_LENGTH = 512


@dataclass
class SD3TextEncoders:
    clip_l: CLIPTextModel
    clip_g: CLIPTextModel
    tokenizer_l: CLIPTokenizer
    tokenizer_g: CLIPTokenizer
    t5: T5Encoder | None = None
    tokenizer_t5: T5Tokenizer | None = None
    t5_width: int = 4096  # the context width the transformer expects

    def _clip(self, model: CLIPTextModel, tokenizer: CLIPTokenizer, prompts: list[str]):
        device = model.token_embedding.weight.device
        ids = tokenizer.encode(prompts).ids.to(device)
        out = model(ids)
        pooled = out.projected if out.projected is not None else out.pooled
        return out.hidden_states[-2], pooled

    @torch.inference_mode()
    def encode(self, prompts: list[str], max_sequence_length: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """(context [B, 77 + max_sequence_length, t5_width], pooled [B, 2048]) in float32."""
        if not 1 <= max_sequence_length <= T5_MAX_LENGTH:
            raise InputError(f"max_sequence_length must be in 1..{T5_MAX_LENGTH}, got {max_sequence_length}")
        states_l, pooled_l = self._clip(self.clip_l, self.tokenizer_l, prompts)
        states_g, pooled_g = self._clip(self.clip_g, self.tokenizer_g, prompts)
        clip_states = torch.cat([states_l.float(), states_g.float()], dim=-1)
        clip_states = torch.nn.functional.pad(clip_states, (0, self.t5_width - clip_states.shape[-1]))
        if self.t5 is not None:
            device = self.t5.embed_tokens.weight.device
            ids = self.tokenizer_t5.encode(prompts, max_length=max_sequence_length).ids.to(device)
            t5_states = self.t5(ids).float().to(clip_states.device)
        else:
            t5_states = clip_states.new_zeros(len(prompts), max_sequence_length, self.t5_width)
        context = torch.cat([clip_states, t5_states], dim=-2)
        pooled = torch.cat([pooled_l.float(), pooled_g.float()], dim=-1)
        return context, pooled
