"""Ulysses sequence parallelism: each rank of the ulysses group keeps a band of token-grid
rows through every block; attention swaps to all tokens of a share of the heads.

Around every attention that goes through `models.attention.attend` (MMDiT's joint and
MMDiT-X's image-only attention, PixArt's and DiT's self-attention):
- q, k, v [b, H, n, d] of this rank's n = N/P tokens go through one all-to-all over heads
  to [b, H/P, N, d]; attention runs there unchanged, so DiTFastAttn's window attention
  (a band in raster order) and its stored residual are computed on the gathered sequence
  with no halo: the window needs tokens of both neighbouring shards, and after the swap
  every rank already holds the whole sequence for its heads;
- MMDiT's text tokens are replicated on every rank (small: 154 tokens beside 4096), so the
  text q, k, v need no exchange, each rank takes its heads; the text rows of the output
  are all-gathered over heads to stay replicated;
- the output goes back with the inverse all-to-all to [b, H, n, d] before the projection.
PixArt's cross-attention (image queries over caption keys) needs nothing: each query
token sees all caption keys on its own rank. ToDo's downsampled keys and values are
computed from the all-gathered K/V source on every rank (`gather_tokens`), so the
downsampling is the one-device one for any factor and mode; each rank keeps its heads.

Everything else in a block (norms, MLPs, modulation) is per token and runs on the band.
Caches (DiTCache, Δ-Cache deltas, DiTFastAttn's residuals and outputs) hold this rank's
band or heads; each rank reuses only what it stored, under the same fixed plan.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from dite.models.denoiser import Hidden


class Ulysses:
    """The hook attend() calls (models/attention.SEQUENCE_PARALLEL) for one ulysses group."""

    def __init__(self, comm, group):
        self.comm, self.group = comm, group
        self.size, self.index = group.size, group.index
        self._kv_gathered = False

    def heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.chunk(self.size, dim=1)[self.index]

    def scatter_heads(self, stacked: torch.Tensor) -> torch.Tensor:
        """[s, b, H, n, d] (s tensors of this rank's tokens) -> [s, b, H/P, N, d]."""
        got = self.comm.all_to_all(list(stacked.chunk(self.size, dim=2)), self.group)
        return torch.cat(got, dim=3)

    def gather_heads(self, out: torch.Tensor) -> torch.Tensor:
        """[b, H/P, N, d] -> [b, H, n, d] (this rank's tokens, every head)."""
        got = self.comm.all_to_all(list(out.chunk(self.size, dim=2)), self.group)
        return torch.cat(got, dim=1)

    def gather_tokens(self, x: torch.Tensor, grid: tuple[int, int]):
        """[b, n, D] of this rank's rows -> the whole grid's tokens, and the whole grid."""
        self._kv_gathered = True
        return torch.cat(self.comm.all_gather(x, self.group), dim=1), (grid[0] * self.size, grid[1])

    def wrap(self, qkv, text, project):
        image_tokens = {}

        def sharded_qkv(rows):
            self._kv_gathered = False
            q, k, v = qkv(rows)
            if self._kv_gathered:  # ToDo: k, v already cover the whole (downsampled) grid
                self._kv_gathered = False
                q = self.scatter_heads(q.unsqueeze(0))[0]
                k, v = self.heads(k), self.heads(v)
            elif k.shape == q.shape:
                q, k, v = self.scatter_heads(torch.stack([q, k, v])).unbind(0)
            else:
                q = self.scatter_heads(q.unsqueeze(0))[0]
                k, v = self.scatter_heads(torch.stack([k, v])).unbind(0)
            image_tokens["n"] = q.shape[2]
            return q, k, v

        def text_heads(rows):
            return tuple(self.heads(t) for t in text(rows))

        def gathered_project(out):
            n = image_tokens["n"]
            merged = self.gather_heads(out[:, :, :n])
            if out.shape[2] > n:  # text rows: every rank keeps all of them
                merged = torch.cat([merged, torch.cat(self.comm.all_gather(out[:, :, n:], self.group), dim=1)], 2)
            return project(merged)

        return sharded_qkv, (text_heads if text is not None else None), gathered_project


class ShardedDenoiser:
    """A denoiser seen by the step runner with its image tokens split by grid rows:
    prepare keeps this rank's band (and its grid), finalize all-gathers the output rows."""

    def __init__(self, inner, ulysses: Ulysses):
        self.inner, self.ulysses = inner, ulysses
        self.blocks, self.streams, self.config = inner.blocks, inner.streams, inner.config

    def prepare(self, x, t, cond) -> Hidden:
        hidden = self.inner.prepare(x, t, cond)
        rows, width = hidden.grid
        band = rows // self.ulysses.size
        start = self.ulysses.index * band * width
        return replace(hidden, image=hidden.image[:, start:start + band * width], grid=(band, width))

    def run_blocks(self, hidden, plan, start=0, stop=None):
        return self.inner.run_blocks(hidden, plan, start, stop)

    def finalize(self, hidden: Hidden) -> torch.Tensor:
        out = self.inner.finalize(hidden)  # [b, C, band * patch, W]: per token, so per band
        return torch.cat(self.ulysses.comm.all_gather(out, self.ulysses.group), dim=2)
