"""The parallel executor: wraps the eager executor so each rank runs its rows (data, CFG)
and its band of tokens (Ulysses) of every step, then exchanges the outputs so that every
rank holds the whole step's prediction. Guidance, the scheduler step and the loop's
bookkeeping then run unchanged, and identically, on every rank.

One generation on one rank:
  begin  -> checks the call (plan.check_call) and that every rank makes the same call
            (fingerprints of shapes, plans, noise and conditioning; faults.check_agree)
  step   -> local rows of x / t / cond -> inner eager step (on the ShardedDenoiser under
            Ulysses, with attend()'s hook set) -> all-gather of the rows group (or, after
            PromptGate, the conditional ranks' gather and a broadcast to the freed ranks)
  stats  -> the inner executor's, plus bytes and collectives per step (accounting.py)
"""

from __future__ import annotations

import hashlib

import torch

from dite.engine.errors import ConfigError
from dite.engine.parallel import plan as plan_checks
from dite.engine.parallel.accounting import Traffic
from dite.engine.parallel.faults import check_agree
from dite.engine.parallel.handoff import hand_over
from dite.engine.parallel.rows import cond_branch, image_share, local_rows, local_slice
from dite.engine.parallel.ulysses import ShardedDenoiser, Ulysses
from dite.engine.runtime.executors.base import Executor, Run
from dite.models.attention import SEQUENCE_PARALLEL
from dite.models.denoiser import Conditioning


def _digest(*values) -> str:
    h = hashlib.sha256()
    for v in values:
        if isinstance(v, torch.Tensor):
            v = v.detach().double().sum().item() if v.is_floating_point() else v.tolist()
        h.update(repr(v).encode())
    return h.hexdigest()[:16]


def select_cond(cond: Conditioning, rows: list[int], layout: str) -> Conditioning:
    index = torch.tensor(rows, dtype=torch.long)
    return Conditioning(**{f: None if getattr(cond, f) is None else getattr(cond, f)[index.to(getattr(cond, f).device)]
                           for f in Conditioning.FIELDS}, cfg_row_order=layout)


class ParallelExecutor(Executor):
    name = "parallel"

    def __init__(self, inner: Executor, ctx):
        if inner.name != "eager":
            raise ConfigError(f"parallel generation runs the eager executor; executor {inner.name!r} under a parallel "
                              "plan is not built: load with executor='eager'")
        super().__init__(inner.attention)
        self.inner, self.ctx = inner, ctx

    def begin(self, transformer, plans, examples):
        return ParallelRun(self, transformer, plans, examples()[0])


class ParallelRun(Run):
    def __init__(self, executor: ParallelExecutor, transformer, plans, example):
        ctx = self.ctx = executor.ctx
        plan = ctx.plan
        self.guided = example.cond.guided
        self.layout = example.cond.cfg_row_order
        rows = example.x.shape[0]
        self.images = rows // 2 if self.guided else rows
        patch = transformer.config.patch_size
        grid = (example.x.shape[2] // patch, example.x.shape[3] // patch)
        depth = len(transformer.blocks)
        plan_checks.check_call(
            plan, guided=self.guided, images=self.images, grid=grid,
            stateful_cfg=any(p.block(i).attention.cfg_share for p in plans for i in range(depth)))
        check_agree(ctx.comm, ctx.world, "the generation call", {
            "plan": plan.label, "latents": _digest(example.x), "timestep": _digest(example.t),
            "conditioning": _digest(*(getattr(example.cond, f) for f in Conditioning.FIELDS), example.cond.cfg_row_order),
            "step_plans": _digest(*(repr(p) for p in plans))})
        self.ulysses = Ulysses(ctx.comm, ctx.ulysses) if plan.ulysses > 1 else None
        model = ShardedDenoiser(transformer, self.ulysses) if self.ulysses else transformer
        self.inner = executor.inner.begin(model, plans, lambda: [])
        self.traffic = ctx.comm.traffic = Traffic()
        self.ungated = self.rows_at(gated=False)
        self.freed_at = None
        # After PromptGate's gate the freed ranks join the conditional ranks' Ulysses group
        # (handoff.py) where the grid rows and heads split 2U ways.
        joined_size = 2 * plan.ulysses
        self.join = (plan.cfg == 2 and self.guided and any(p.cfg_mode == "cond_only" for p in plans)
                     and grid[0] % joined_size == 0 and transformer.config.num_heads % joined_size == 0)
        if self.join:
            self.cond_index = cond_branch(self.layout)
            self.joined = Ulysses(ctx.comm, ctx.joined[self.cond_index])
            self.joined_run = executor.inner.begin(ShardedDenoiser(transformer, self.joined), plans, lambda: [])

    def rows_at(self, gated: bool) -> list[int]:
        return local_rows(self.ctx.plan, self.ctx.coords, self.images, guided=self.guided, gated=gated,
                          layout=self.layout, joined=gated and self.join)

    def step(self, x, t, cond, plan, state):
        gated = self.guided and not cond.guided
        total = x.shape[0]
        if state.local_rows is None:
            state.local_rows = lambda kept: local_slice(self.ungated, kept, 2 * self.images)
        rows = self.rows_at(gated)
        hook, run = self.ulysses, self.inner
        if gated and self.ctx.plan.cfg == 2:
            if self.freed_at is None:
                self.freed_at = state.step_index
                if self.join:
                    hand_over(state, self.ctx, self.cond_index)
            if self.join:
                hook, run = self.joined, self.joined_run
        out = None
        if rows:
            layout = cond.cfg_row_order if (cond.guided and self.ctx.plan.cfg == 1) else "none"
            self._share_decisions(state.ranges, layout, gated)
            index = torch.tensor(rows, dtype=torch.long, device=x.device)
            token = SEQUENCE_PARALLEL.set(hook)
            try:
                out = run.step(x[index], t[index], select_cond(cond, rows, layout), plan, state)
            finally:
                SEQUENCE_PARALLEL.reset(token)
        full = self.exchange(out, rows, total, gated)
        self.traffic.close_step(state.step_index)
        return full

    def _share_decisions(self, ranges, layout: str, gated: bool) -> None:
        """The adaptive cache's per-sample sums over the ranks that hold this rank's samples:
        the local batch's rows per sample, and the group whose partial sums (other CFG rows,
        other token bands) complete them; `decide` all-reduces its [2, samples] sums there."""
        if ranges is None:
            return
        ranges.rows_per_sample = 2 if layout != "none" else 1
        ctx = self.ctx
        if gated and ctx.plan.cfg == 2:  # the conditional rows only
            group = ctx.joined[self.cond_index] if self.join else ctx.ulysses
        else:
            group = ctx.samples
        ranges.reduce = None if group.size == 1 else (lambda sums: ctx.comm.all_reduce(sums, group))

    def exchange(self, out, rows: list[int], total: int, gated: bool) -> torch.Tensor:
        """Every rank's rows -> the whole batch's output on every rank."""
        ctx = self.ctx
        if gated and ctx.plan.cfg == 2 and self.join:  # every rank of the joined group holds its share's rows
            return self._gather(out, ctx.data, lambda d: list(image_share(ctx.plan, self.images, d)), total)
        if gated and ctx.plan.cfg == 2:
            # The conditional ranks gather their images; the freed ranks receive the result.
            source = cond_branch(self.layout)
            if out is not None:
                out = self._gather(out, ctx.data, lambda d: local_rows(
                    ctx.plan, (d, source, 0), self.images, guided=self.guided, gated=True, layout=self.layout), total)
            else:
                out = torch.empty(self._shape_hint(total), dtype=self._dtype, device=self._device)
            return ctx.comm.broadcast(out, source, ctx.cfg)
        self._shape_hint_from(out, total)
        group = ctx.rows

        def rows_of(member: int) -> list[int]:
            rank = group.ranks[member]
            return local_rows(ctx.plan, ctx.plan.coords(rank), self.images, guided=self.guided, gated=gated,
                              layout=self.layout)
        return self._gather(out, group, rows_of, total)

    def _gather(self, out, group, rows_of, total):
        if group.size == 1:
            return out
        full = out.new_empty((total, *out.shape[1:]))
        for member, part in enumerate(self.ctx.comm.all_gather(out, group)):
            full[torch.tensor(rows_of(member), dtype=torch.long, device=out.device)] = part
        return full

    def _shape_hint_from(self, out, total):
        self._shape, self._dtype, self._device = (total, *out.shape[1:]), out.dtype, out.device

    def _shape_hint(self, total):
        return (total, *self._shape[1:])

    def stats(self):
        stats = dict(self.inner.stats())
        p = self.ctx.plan
        stats["parallel"] = {"plan": p.label, "rank": self.ctx.rank, "world": p.world,
                             "coords": dict(zip(("data", "cfg", "ulysses"), self.ctx.coords)),
                             "freed_at_step": self.freed_at,
                             "freed_ranks": ("join the conditional ranks' Ulysses group" if self.join else "idle")
                             if self.freed_at is not None else None, **self.traffic.summary()}
        return stats
