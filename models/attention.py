"""Attention dispatch: the functions every model calls for attention.

A leaf module (imports only torch, the kernels and the plan types) so models can use it
without depending on the rest of the engine.

`attention` is one kernel call: models hand over q, k, v already split into heads and a
full-attention policy. The kernel is the policy's `backend` (SDPA by default; "math" and
Ascend's "npu" in attention_kernels.py): executors write the backend a pipeline was loaded
with into every block's policy, so the choice travels with the plan into compiled frames
instead of living in process-wide state. Attention outside the denoiser's blocks (text
encoders, VAE) passes no policy and runs SDPA.

`attend` is a denoiser layer's attention under its step's AttentionPolicy, the one place
that implements full attention, ToDo's downsampled keys (through the caller's projection),
DiTFastAttn's window + residual (WA-RS), output sharing (AST) and CFG sharing (ASC) for
DiT, PixArt and MMDiT alike. It is a pure function: what the policy reads of the layer's
earlier steps comes in as an AttentionState, what it keeps for later steps goes out as one.
Whoever calls it owns the store (`load_state` / `save_state` over the block's
`Hidden.attn_cache`: the call's AttentionCache when eager, explicit graph inputs and
outputs in a compiled segment).
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import replace
from typing import Callable, NamedTuple

import torch

from dite.engine.errors import ConfigError
from dite.models.attention_kernels import KERNELS
from dite.models.plan import AttentionPolicy, FULL_ATTENTION
from dite.models.window_attention import window_attention


# Sequence parallelism (engine/parallel/ulysses.py) sets this for the duration of a step to
# an object with `wrap(qkv, text, project) -> (qkv, text, project)` (the all-to-alls over
# heads around the attention) and `gather_tokens(x, grid)` (ToDo's K/V source, layers.py).
# None (the default) on one device: attend() then costs one ContextVar read more.
SEQUENCE_PARALLEL: ContextVar = ContextVar("dite_sequence_parallel", default=None)


def sequence_parallel():
    """The active sequence-parallel hook, or None. Always None inside a graph being compiled
    (parallel runs are eager, and Dynamo cannot trace ContextVar.get)."""
    if torch.compiler.is_compiling():
        return None
    return SEQUENCE_PARALLEL.get()


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    policy: AttentionPolicy = FULL_ATTENTION,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention on [batch, heads, tokens, head_dim] tensors.

    `mask` is a boolean [batch, 1 or heads, q_tokens or 1, kv_tokens] tensor where True
    means "attend", or None. `bias` is a float tensor broadcastable to the scores and added
    to them before the softmax (T5's relative position bias). `scale` multiplies q·k
    (default 1/sqrt(head_dim); T5 uses 1). Returns [batch, heads, q_tokens, head_dim].
    """
    if policy.kind != "full":
        raise ValueError(f"attention() computes full attention; policy {policy.kind!r} is run by attend() "
                         "(window attention in models/window_attention.py, sharing from the stored state)")
    return KERNELS[policy.backend](q, k, v, mask, bias, scale)


class AttentionState(NamedTuple):
    """What one attention layer keeps from one step for a later one (DiTFastAttn).

    `residual`: full minus window attention of the band tokens' queries, [B, H, N, d] (WA-RS
    adds it to a later window step). `output`: the layer's projected output (AST returns
    it): a tensor, or a tuple of one per token stream (MMDiT's (image, text), text None on
    the pre-only last block). Rows are the whole batch, both CFG halves included."""

    residual: torch.Tensor | None = None
    output: torch.Tensor | tuple | None = None

    @property
    def empty(self) -> bool:
        return self.residual is None and self.output is None


NO_STATE = AttentionState()


def reads(policy: AttentionPolicy) -> tuple[str, ...]:
    """The AttentionState fields a step under `policy` needs from the layer's earlier steps."""
    return {"window": ("residual",), "share": ("output",)}.get(policy.kind, ())


def writes(policy: AttentionPolicy) -> tuple[str, ...]:
    """The fields a step under `policy` stores (a residual only where full attention runs,
    an output only where one is computed)."""
    out = ("residual",) if policy.store_residual and policy.kind == "full" else ()
    return out + (("output",) if policy.store_output and policy.kind != "share" else ())


def stateful(policy: AttentionPolicy) -> bool:
    """Whether a step under `policy` reads or writes per-layer state, or runs half the batch
    (ASC): what a row-gathering runner (the adaptive block cache) cannot follow."""
    return bool(reads(policy) or writes(policy) or policy.cfg_share)


def map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], value):
    """`fn` of a stored tensor, or of each tensor of a tuple of them (None entries kept)."""
    if isinstance(value, tuple):
        return tuple(None if t is None else fn(t) for t in value)
    return fn(value)


def tensors(value) -> list[torch.Tensor]:
    """The tensors of a stored value (a tensor or a tuple of tensors and Nones)."""
    return [t for t in (value if isinstance(value, tuple) else (value,)) if t is not None]


def load_state(store, layer, policy: AttentionPolicy, rows: int) -> AttentionState:
    """What `policy` reads of `layer` from `store` (anything with `load(layer, policy,
    rows)`: the call's AttentionCache, or a compiled segment's inputs); nothing is asked
    of the store for a policy that reads nothing."""
    if not reads(policy):
        return NO_STATE
    if store is None:
        raise ConfigError(f"attention layer {layer}: policy {policy.label!r} reuses a stored {reads(policy)[0]}, "
                          "but this forward has no attention cache: run it through run_step or an executor")
    return store.load(layer, policy, rows)


def save_state(store, layer, state: AttentionState) -> None:
    """Hand what a step stored to `store` (`save(layer, state)`); without a store nothing
    can read it later, so it is dropped."""
    if store is not None and not state.empty:
        store.save(layer, state)


def cond_half(rows: int, row_order: str) -> slice:
    """The conditional rows of a CFG batch whose halves come in `row_order`."""
    half = rows // 2
    return slice(0, half) if row_order == "cond_first" else slice(half, rows)


def _given(value, what: str):
    if value is None:
        raise ConfigError(f"the attention policy reuses a stored {what}, but none was passed in: the plan must "
                          "compute this layer before reusing it")
    return value


QKV = Callable[[slice], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def attend(qkv: QKV, policy: AttentionPolicy, state: AttentionState = NO_STATE, *, rows: int,
           project: Callable, text: QKV | None = None):
    """One attention layer under `policy`: (its output, the AttentionState it stores).

    qkv(batch_rows) -> q, k, v of the layer's tokens ([b, H, N, d], keys and values maybe
    fewer under ToDo) for the batch rows `batch_rows`: every row, or ASC's conditional half;
    AST calls nothing and projects nothing. `rows` is the batch size. project(o) maps the
    attention output [b, H, N, d] to the layer's output (a tensor or a tuple of them).
    `text` (MMDiT's joint attention): the q, k, v of a second token group placed after the
    first; DiTFastAttn's band applies to the first group's queries, which see every text key
    beside their band, while text queries always attend fully, and the residual covers the
    first group's queries only. `state` holds what `reads(policy)` names.

    full: exact attention, storing full - window of the band queries with `store_residual`.
    window (WA-RS): band attention plus the stored residual. share (AST): the stored output.
    cfg_share (ASC): attention of the conditional rows, copied to both halves (a stored
    residual likewise). `store_output` keeps the (copied) projected output.
    """
    if policy.kind == "share":
        return _given(state.output, "output"), NO_STATE
    hook = sequence_parallel()
    if hook is not None:  # Ulysses: everything below sees all tokens of a share of the heads
        qkv, text, project = hook.wrap(qkv, text, project)
    half = cond_half(rows, policy.cfg_share) if policy.cfg_share else slice(None)
    q, k, v = qkv(half)
    tq = tk = tv = None
    if text is not None:
        tq, tk, tv = text(half)
    residual = None
    if policy.kind == "window":
        out = window_attention(q, k, v, policy.window, tk, tv) + _given(state.residual, "residual")[half]
        if tq is not None:
            keys, values = torch.cat([k, tk], 2), torch.cat([v, tv], 2)
            rest = attention(tq, keys, values, policy=replace(FULL_ATTENTION, backend=policy.backend))
            out = torch.cat([out, rest], 2)
    else:
        if tq is None:
            out = attention(q, k, v, policy=policy)
        else:
            out = attention(torch.cat([q, tq], 2), torch.cat([k, tk], 2), torch.cat([v, tv], 2), policy=policy)
        if policy.store_residual:
            band = out if tq is None else out[:, :, :q.shape[2]]
            residual = band - window_attention(q, k, v, policy.window, tk, tv)
            if policy.cfg_share:
                residual = torch.cat([residual, residual])
    out = project(out)
    if policy.cfg_share:  # ASC: the conditional half's output for both halves
        out = map_tensors(lambda t: torch.cat([t, t]), out)
    return out, AttentionState(residual=residual, output=out if policy.store_output else None)
