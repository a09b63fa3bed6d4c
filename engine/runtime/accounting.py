"""What an accelerated call did, against the plain call: `out.stats`.

Block evaluations are counted from what the sampling loop actually ran (rows x blocks per
step). FLOPs are counted by running the same plans on a copy of the denoiser on the meta
device under torch.utils.flop_counter: no memory, no arithmetic, only shapes, so counting
a full-size SD3 costs a fraction of a second, plus about a second the first time in a
process (FlopCounterMode's dispatch mode imports torch._dynamo). So the count is made only
when `out.stats` is read, and kept per model config and call shape (`FlopCounts`): for the
process, and in a folder where the caller names one (the CLI does: `flop_cache_folder()`),
so that the next `dite generate` of the same model and call reads it instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from dite.engine.runtime.sampling import GenerationState
from dite.engine.runtime.step import run_step
from dite.models.denoiser import Conditioning, Denoiser
from dite.models.plan import PLAIN_STEP, RangeOp, StepPlan
from dite.schedulers.base import SchedulerState


def meta_copy(transformer: Denoiser) -> Denoiser:
    dtype = next(transformer.parameters()).dtype
    with torch.device("meta"):
        return type(transformer)(transformer.config).to(dtype)


def _to_meta(cond: Conditioning) -> Conditioning:
    return dataclasses.replace(cond, **{name: getattr(cond, name).to("meta") for name in cond.FIELDS
                                       if isinstance(getattr(cond, name), torch.Tensor)})


# Attention's own products (q.k and p.v): SDPA, which decomposes to bmm on the meta device
# (the models' linear layers count as addmm/mm), and the band attention op.
_ATTENTION_OPS = ("bmm", "scaled_dot_product", "window_attention")


def _split(counter: FlopCounterMode) -> dict[str, int]:
    counts = counter.get_flop_counts().get("Global", {})
    attention = sum(v for op, v in counts.items() if any(name in str(op) for name in _ATTENTION_OPS))
    return {"total": counter.get_total_flops(), "attention": attention}


def denoiser_flops(meta: Denoiser, plans: Sequence[StepPlan], x_shape: tuple[int, ...], cond: Conditioning,
                   part: str = "total") -> list[int]:
    """FLOPs of each step's denoiser call under `plans` (x_shape: one CFG branch's
    latents); `part` "attention" counts only attention's own products (q.k and p.v)."""
    return [step[part] for step in step_flops(meta, plans, x_shape, cond)]


def static_plan(plan: StepPlan, adaptive_action: str) -> StepPlan:
    """`plan` with every adaptive range fixed to `adaptive_action` ("record": every row runs
    it, "apply": none does) and forecasts as plain re-adds: the same FLOPs, no run-time state."""
    if not any(r.forecasts for r in plan.ranges):
        return plan
    ranges = tuple(RangeOp(r.start, r.stop, adaptive_action if r.action == "adaptive" else r.action)
                   for r in plan.ranges)
    return dataclasses.replace(plan, ranges=ranges)


def step_flops(meta: Denoiser, plans: Sequence[StepPlan], x_shape: tuple[int, ...],
               cond: Conditioning, adaptive_action: str = "record") -> list[dict[str, int]]:
    """{"total", "attention"} FLOPs of each step's denoiser call under `plans`, with
    adaptive ranges run by every row ("record") or by none ("apply").

    Steps are walked in order so cached ranges have a recorded delta to apply, and the
    batch halves where a plan turns cond-only, exactly as the sampling loop does."""
    cond = _to_meta(cond)
    dtype = next(meta.parameters()).dtype
    # The per-call caches of a real call (the scheduler's state is a stand-in: only shapes run).
    state = GenerationState(scheduler=SchedulerState(torch.zeros(len(plans))))
    gated, per_signature, out = False, {}, []
    for plan in plans:
        plan = static_plan(plan, adaptive_action)
        step_cond = cond
        if plan.cfg_mode == "cond_only" and cond.guided:
            if not gated:
                state.keep_rows(cond.cond_rows(2 * x_shape[0]))
                gated = True
            step_cond = cond.conditional_only()
        rows = x_shape[0] * (2 if step_cond.guided else 1)
        x = torch.empty((rows, *x_shape[1:]), device="meta", dtype=dtype)
        t = torch.empty((rows,), device="meta", dtype=dtype)
        signature = (plan, rows)
        if signature not in per_signature:
            # A repeated signature costs the same; the ranges it would record already hold
            # a delta of the right shape, which is all an apply needs on meta.
            counter = FlopCounterMode(display=False)
            if adaptive_action == "apply":
                # An all-skip step needs a delta of the right shape to add (on meta, nothing
                # but its shape): the record version of the plan leaves one.
                run_step(meta, x, t, step_cond, static_plan(dataclasses.replace(
                    plan, ranges=tuple(RangeOp(r.start, r.stop, "record") for r in plan.ranges)), "record"),
                    state.deltas, state.attention)
            with counter:
                run_step(meta, x, t, step_cond, plan, state.deltas, state.attention)
            per_signature[signature] = _split(counter)
        out.append(per_signature[signature])
    return out


def accel_spec(methods: list) -> str:
    """The accel methods as resolved, spelled out ("none" without any)."""
    return "+".join(m.spec() for m in methods) or "none"


def accel_stats(transformer: Denoiser, methods: list, plans: Sequence[StepPlan], steps_run: list[dict[str, Any]],
                x_shape: tuple[int, ...], cond: Conditioning, counts: "FlopCounts | None" = None) -> dict:
    """The stats dict of one call: the methods as resolved, per step what ran, block
    evaluations and FLOPs against the plain run of the same call. `counts` keeps the FLOPs
    counted for a model config and call shape (default: the process's)."""
    depth = len(transformer.blocks)
    plain_rows = x_shape[0] * (2 if cond.guided else 1)
    evaluations = sum(s.get("block_rows", s["rows"] * s["blocks"]) for s in steps_run)
    plain_evaluations = len(steps_run) * plain_rows * depth
    stats: dict[str, Any] = {
        "accel": accel_spec(methods),
        "steps": steps_run,
        "block_evaluations": evaluations,
        "plain_block_evaluations": plain_evaluations,
        "distinct_plans": len({(p, s["rows"]) for p, s in zip(plans, steps_run)}),
    }
    stats["compute_fraction"] = evaluations / plain_evaluations
    counted = (counts or PROCESS_COUNTS).get(transformer, plans, x_shape, cond)
    fractions = [_adaptive_fraction(p, s, depth) for p, s in zip(plans, steps_run)]
    totals = {}
    for part in ("total", "attention"):
        skip = counted["skip"] or counted["run"]
        totals[part] = (sum(s[part] + f * (r[part] - s[part]) for r, s, f in zip(counted["run"], skip, fractions)),
                        sum(s[part] for s in counted["plain"]))
    (flops, plain), (attention, plain_attention) = totals["total"], totals["attention"]
    stats.update(denoiser_flops=flops, plain_denoiser_flops=plain, flops_ratio=flops / plain,
                 attention_flops=attention, attention_flops_ratio=attention / max(plain_attention, 1))
    return stats


def count_call(transformer: Denoiser, plans: Sequence[StepPlan], x_shape: tuple[int, ...],
               cond: Conditioning) -> dict[str, list | None]:
    """Per step {"total", "attention"} FLOPs of a call under `plans` ("run"), with its
    adaptive ranges skipped by every row ("skip", None without adaptive ranges), and of the
    plain call of as many steps ("plain")."""
    meta = meta_copy(transformer)
    run = step_flops(meta, plans, x_shape, cond)
    plain_plans = [PLAIN_STEP] * len(plans)
    return {"run": run,
            "skip": step_flops(meta, plans, x_shape, cond, "apply") if any(p.adaptive for p in plans) else None,
            # A plain call is its own baseline: counted once (counting costs seconds on 2 cores).
            "plain": run if list(plans) == plain_plans else step_flops(meta, plain_plans, x_shape, cond)}


class FlopCounts:
    """Counted FLOPs (count_call) per model config and call shape: in memory, and as one
    JSON file per key in `folder` where given. The key holds everything a count depends on:
    the model's class and config, its dtype, the plans, the latent and conditioning shapes,
    torch's version and a digest of dite's model and runtime sources (a changed model file
    is a new key, never a stale count). A folder that cannot be read or written is passed
    over: the count is made again."""

    def __init__(self, folder: Path | None = None):
        self.folder = folder
        self.memory: dict[str, dict] = {}

    def get(self, transformer: Denoiser, plans: Sequence[StepPlan], x_shape: tuple[int, ...],
            cond: Conditioning) -> dict[str, list | None]:
        key = count_key(transformer, plans, x_shape, cond)
        if key not in self.memory:
            counted = self._read(key)
            if counted is None:
                counted = count_call(transformer, plans, x_shape, cond)
                self._write(key, counted)
            self.memory[key] = counted
        return self.memory[key]

    def _read(self, key: str) -> dict | None:
        if self.folder is None:
            return None
        try:
            counted = json.loads((self.folder / f"{key}.json").read_text())
        except (OSError, ValueError):
            return None
        return counted if isinstance(counted, dict) and {"run", "skip", "plain"} <= set(counted) else None

    def _write(self, key: str, counted: dict) -> None:
        if self.folder is None:
            return
        path = self.folder / f"{key}.json"
        partial = path.with_name(f"{key}.{os.getpid()}.partial")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps(counted))
            os.replace(partial, path)  # whole or not at all, also with two processes at once
        except OSError:
            with contextlib.suppress(OSError):
                partial.unlink(missing_ok=True)


PROCESS_COUNTS = FlopCounts()  # what this process counted, for every pipeline


def flop_cache_folder() -> Path:
    """Where the CLI keeps counted FLOPs: `flops/` in dite's per-machine cache
    (engine/runtime/user_cache.py: $DITE_CACHE_DIR, else $XDG_CACHE_HOME/dite, else ~/.cache/dite)."""
    from dite.engine.runtime.user_cache import cache_dir

    return cache_dir() / "flops"


def count_key(transformer: Denoiser, plans: Sequence[StepPlan], x_shape: tuple[int, ...], cond: Conditioning) -> str:
    what = [f"{type(transformer).__module__}.{type(transformer).__qualname__}", transformer.config.to_dict(),
            str(next(transformer.parameters()).dtype), [repr(p) for p in plans], list(x_shape), repr(_shapes(cond)),
            torch.__version__, _source_digest()]
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=repr).encode()).hexdigest()[:32]


@functools.lru_cache(maxsize=1)
def _source_digest() -> str:
    """A digest of the code a count runs: dite's models and the engine's runtime."""
    digest = hashlib.sha256()
    for package in ("dite.models", "dite.engine.runtime"):
        root = Path(importlib.import_module(package).__path__[0])
        for path in sorted(root.rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _adaptive_fraction(plan: StepPlan, step: dict, depth: int) -> float:
    """The share of rows x blocks of a step's adaptive ranges that actually ran (1.0 for a
    step without adaptive ranges, whose FLOPs are the plan's)."""
    span = sum(r.stop - r.start for r in plan.ranges if r.action == "adaptive")
    if not span:
        return 1.0
    return (step["block_rows"] - step["rows"] * step["blocks"]) / (step["rows"] * span)


def _shapes(cond: Conditioning) -> tuple:
    return tuple((name, tuple(v.shape)) for name in cond.FIELDS
                 if isinstance(v := getattr(cond, name), torch.Tensor)) + (cond.cfg_row_order,)


def summary_line(stats: dict, timings: dict[str, float]) -> str:
    """One line for the CLI."""
    parts = [f"accel {stats['accel']}",
             f"blocks {stats['block_evaluations']}/{stats['plain_block_evaluations']}"]
    parts.append(f"denoiser FLOPs {stats['denoiser_flops'] / 1e12:.3g} T ({stats['flops_ratio']:.1%} of plain)")
    executor = stats.get("executor") or {}
    if "graphs" in executor:
        parts.append(f"{executor['name']} {executor['graphs']} graphs ({executor['graphs_built']} built, "
                     f"compile {executor['compile_seconds']:.1f}s)")
    parts.append(" ".join(f"{k} {v:.2f}s" for k, v in timings.items()))
    return " | ".join(parts)
