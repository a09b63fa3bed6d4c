"""The compiled executor: torch.compile of prepare, each block segment a plan uses, and
finalize, with fullgraph=True and dynamic=False.

One graph per distinct piece: (prepare | segment kind and range with its blocks' plans |
finalize) x the shapes of its inputs. All of them are built and run once before the first
step, from the plans and the batch layouts (PromptGate's halved batch included), so the
number of graphs is known in advance and checked; each piece is its own isolated compile
with a recompile limit of 1 and the steps run under `fail_on_recompile`, so a recompile
the plan did not foresee is an error, never a silent fallback to eager.

DiTFastAttn plans run here too: the stored residuals / outputs a segment's layers read go
into its graph as explicit tensors and the ones they store come out as results, copied into
the call's AttentionCache buffers like deltas. Pieces are warmed in an order where every
read has been stored by an earlier piece, so the graph count stays known in advance.

Host syncs per step: none for plain, cached-range, forecasting and fastattn plans (the eager
code between graphs only picks tensors by plan and shape, copies them device-side and
checks shapes, which are host metadata; tests/test_attend.py counts them); one per adaptive
range (its per-sample decision).

Graphs live in the executor (the pipeline's), so a second generation of the same shapes
builds nothing; what one call built, hit and spent is counted in its Run.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Sequence

import torch

from dite.engine.runtime.adaptive import RangeState, adaptive_range, adaptive_signal, applied_delta, keep_delta
from dite.engine.runtime.attention_cache import AttentionCache
from dite.engine.runtime.delta_store import DeltaStore
from dite.engine.errors import ConfigError, DiteError
from dite.engine.runtime.executors.base import Executor, Run, StepExample, with_attention_backend
from dite.engine.runtime.executors.units import (attention_reads, cond_tensors, finalize_unit, prepare_unit,
                                                 segment_unit, signature)
from dite.models.attention import AttentionState, map_tensors, reads, stateful, writes
from dite.models.denoiser import Denoiser
from dite.models.plan import StepPlan


class RecompileError(DiteError, RuntimeError):
    """A compiled piece was about to be built again, or a step needed a graph the plan did
    not foresee."""


def _unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def settled(t: torch.Tensor | None) -> torch.Tensor | None:
    """`t` as an inference tensor when inference mode is on. Graphs are specialised on
    whether an input is one, and a loop under inference mode may be handed latents made
    outside it at step 0 and its own tensors afterwards: one kind keeps one graph."""
    if t is not None and torch.is_inference_mode_enabled() and not t.is_inference():
        return t.clone()
    return t


def check_attention_chain(plans: Sequence[StepPlan], depth: int) -> None:
    """Before any graph is built: in step order, every stored residual / output a block's
    policy reads was stored by an earlier step that ran the block (a block inside an applied
    range does not run), and no adaptive range holds a DiTFastAttn policy (it gathers rows,
    which per-layer state cannot follow: the eager runner refuses it too)."""
    stored: list[set[str]] = [set() for _ in range(depth)]
    for step, plan in enumerate(plans):
        for start, stop, action in plan.segments(depth):
            if action == "apply":
                continue
            for i in range(start, stop):
                policy = plan.block(i).attention
                if action == "adaptive" and stateful(policy):
                    raise ConfigError("the adaptive cache gathers the rows that run, which DiTFastAttn's per-layer "
                                      "attention cache cannot follow yet: use adaptive without fastattn")
                missing = [f for f in reads(policy) if f not in stored[i]]
                if missing:
                    raise ConfigError(f"block {i} reuses its stored {missing[0]} at step {step}, but no earlier step "
                                      "stored one: the plan must compute this layer before reusing it")
                stored[i].update(writes(policy))


class CompiledRun(Run):
    def __init__(self, executor: "CompiledExecutor", transformer: Denoiser, plans: dict[StepPlan, StepPlan]):
        self.executor, self.transformer, self.plans = executor, transformer, plans
        self.depth = len(transformer.blocks)
        self.hits: dict[str, int] = {}
        self.built = 0
        self.expected = 0
        self.compile_seconds = 0.0

    def call(self, key: tuple, *args):
        unit = self.executor.units.get(key)
        if unit is None:
            raise RecompileError(f"a step needs a graph that was not built before the loop ({key[0]} {key[2:4]}): "
                                 "its plan or shapes differ from the ones the executor was started with")
        label, fn = unit
        self.hits[label] = self.hits.get(label, 0) + 1
        return fn(*args)

    def step(self, x, t, cond, plan, state):
        plan = self.plans[plan]
        if self.executor.cudagraphs:
            # Replays of CUDA graphs reuse their output memory: mark the step so the graphs
            # of this step may overwrite the last step's, and copy whatever outlives it.
            torch.compiler.cudagraph_mark_step_begin()
        with torch.compiler.set_stance("fail_on_recompile"):
            out = self._step(x, t, cond, plan, state.deltas, state.ranges, state.attention)
        return out.clone() if self.executor.overwrites_outputs else out

    def _step(self, x, t, cond, plan, cache: DeltaStore, ranges: RangeState, attention: AttentionCache):
        ex, streams = self.executor, self.transformer.streams
        x, t, conds = settled(x), settled(t), tuple(settled(v) for v in cond_tensors(cond))
        image, c, text, mask, grid = self.call(ex.prepare_key(self.transformer, x, t, cond), x, t, *conds)
        prepared = image
        for start, stop, action in plan.segments(self.depth):
            op = plan.range_at(start) if action != "compute" else None
            if action == "adaptive":
                image, text = self._adaptive(plan, op, ranges, image, c, text, mask, grid, prepared)
                continue
            deltas = ()
            if action == "apply":
                delta = applied_delta(op, cache, ranges, image.shape[0])
                deltas = tuple(delta[s] for s in streams)
            outs = self._segment(plan, start, stop, action, image, c, text, mask, grid, *deltas, attention=attention)
            new = dict(zip(streams, outs[:len(streams)]))
            if action == "record":
                keep_delta(op, cache, ranges, dict(zip(streams, outs[len(streams):])), copy=True)
            image, text = new["image"], new.get("text", text)
        return self.call(ex.finalize_key(self.transformer, image, c, grid), image, c)

    def _segment(self, plan, start, stop, action, image, c, text, mask, grid, *deltas,
                 attention: AttentionCache | None = None):
        """The piece's streams (and recorded deltas). With the call's `attention` cache, what
        the blocks' policies read goes in as tensors and what they store is copied back."""
        key = self.executor.segment_key(self.transformer, plan, start, stop, action, image, c, text, mask, grid)
        state = {} if attention is None or action == "apply" else \
            attention_inputs(attention, plan, start, stop, image.shape[0])
        *outs, stored = self.call(key, image, c, text, mask, state, *deltas)
        for layer, new in stored.items():
            attention.save(layer, new, copy=True)
        return tuple(outs)

    def _adaptive(self, plan, op, ranges: RangeState, image, c, text, mask, grid, prepared):
        """The adaptive range: the decision in eager Python between graphs (one host sync),
        the rows that run through the record graph of their batch size (built before the
        loop for every possible count), the others through the apply graph with their
        forecast deltas as explicit inputs."""
        streams = self.transformer.streams

        def run(idx):
            pick = (lambda v: v) if idx is None else (lambda v: None if v is None else v.index_select(0, idx).contiguous())
            outs = self._segment(plan, op.start, op.stop, "record", pick(image), pick(c), pick(text), pick(mask), grid)
            return dict(zip(streams, outs[:len(streams)])), dict(zip(streams, outs[len(streams):]))

        def add(delta):
            outs = self._segment(plan, op.start, op.stop, "apply", image, c, text, mask, grid,
                                 *(delta[s] for s in streams))
            return dict(zip(streams, outs))

        new = adaptive_range(ranges, op, adaptive_signal(op, image, prepared), {"image": image, "text": text},
                             run, add)
        return new["image"], new.get("text", text)

    def stats(self) -> dict[str, Any]:
        ex = self.executor
        return {"name": ex.name, "backend": ex.backend_name, "mode": ex.mode, "attention": ex.attention,
                "graphs": sum(1 for k in ex.units if k[1] == id(self.transformer)),
                "graphs_built": self.built, "expected_graphs": self.expected,
                "compile_seconds": round(self.compile_seconds, 3), "hits": dict(self.hits)}


def attention_inputs(cache: AttentionCache, plan: StepPlan, start: int, stop: int,
                     rows: int) -> dict[int, AttentionState]:
    """{block: the stored state its policy reads} for the blocks of [start, stop) that read
    any, in block order (a graph's input layout is its key order)."""
    return {i: AttentionState(*(None if v is None else map_tensors(settled, v)
                                for v in cache.load(i, plan.block(i).attention, rows)))
            for i in attention_reads(plan, start, stop)}


class CompiledExecutor(Executor):
    """torch.compile per piece. backend: "inductor" (default), "aot_eager" (tests: Dynamo's
    real tracing without code generation) or a backend callable; mode: None or
    "reduce-overhead" (CUDA graphs)."""

    name = "compiled"

    def __init__(self, attention: str = "sdpa", backend: str | Callable = "inductor", mode: str | None = None,
                 options: dict | None = None):
        super().__init__(attention)
        if mode not in (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):
            raise ConfigError(f"unknown torch.compile mode {mode!r}")
        self.backend, self.mode, self.options = backend, mode, options
        self.backend_name = backend if isinstance(backend, str) else getattr(backend, "__name__", type(backend).__name__)
        # Graph replays (CUDA graphs, aclgraph) reuse their output memory: the step's output
        # is cloned, recorded deltas are copied in any case.
        self.overwrites_outputs = mode == "reduce-overhead"
        self.units: dict[tuple, tuple[str, Callable]] = {}
        self._lock = threading.Lock()

    @property
    def cudagraphs(self) -> bool:
        return self.mode == "reduce-overhead"

    def compile(self, fn: Callable) -> Callable:
        # isolate_recompiles: every piece has its own cache and budget (pieces made from one
        # closure share a code object, which would otherwise pool their recompiles);
        # recompile_limit=1 with fullgraph makes a second graph for a piece an error.
        return torch.compile(fn, fullgraph=True, dynamic=False, backend=self.backend, mode=self.mode,
                             options=self.options, isolate_recompiles=True, recompile_limit=1)

    # ---- keys: what a graph is specialised on
    @staticmethod
    def prepare_key(transformer, x, t, cond) -> tuple:
        return ("prepare", id(transformer), cond.cfg_row_order, signature(x, t, *cond_tensors(cond)))

    @staticmethod
    def segment_key(transformer, plan, start, stop, action, image, c, text, mask, grid) -> tuple:
        blocks = () if action == "apply" else tuple(plan.block(i) for i in range(start, stop))
        return ("segment", id(transformer), start, stop, action, blocks, grid, signature(image, c, text, mask))

    @staticmethod
    def finalize_key(transformer, image, c, grid) -> tuple:
        return ("finalize", id(transformer), grid, signature(image, c))

    # ---- building
    def begin(self, transformer: Denoiser, plans: Sequence[StepPlan],
              examples: Callable[[], Sequence[StepExample]]) -> CompiledRun:
        depth = len(transformer.blocks)
        check_attention_chain(plans, depth)
        table = {}
        for plan in plans:
            if plan not in table:
                table[plan] = with_attention_backend(plan, self.attention, depth)
        run = CompiledRun(self, transformer, table)
        with self._lock:
            self._warm(run, transformer, list(table.values()), examples())
        return run

    def _warm(self, run: CompiledRun, transformer: Denoiser, plans: list[StepPlan],
              examples: Sequence[StepExample]) -> None:
        """Build and run once every piece the plans need for each batch layout, and check
        that exactly the planned number of graphs came out."""
        before = _unique_graphs()
        new_keys: list[tuple] = []

        def ensure(key, make, label, *args):
            if key not in self.units:
                self.units[key] = (f"{label} x{args[0].shape[0]}", self.compile(make()))
                new_keys.append(key)
                start = time.perf_counter()
                result = self.units[key][1](*args)
                run.compile_seconds += time.perf_counter() - start
                return result
            return self.units[key][1](*args)

        # DiTFastAttn's stored state while warming: what the pieces warmed so far stored, in the
        # plans' first-step order (check_attention_chain made every read follow its store);
        # the cond-only batch starts from the guided batch's, cut to its conditional rows
        # as the sampling loop does at the gate.
        guided_state: tuple[StepExample, AttentionCache] | None = None
        for ex in examples:
            layout_plans = [p for p in plans if ex.runs(p)]
            if not layout_plans:
                continue
            warm_state = AttentionCache()
            if ex.cond_only and guided_state is not None:
                guided, seen_state = guided_state
                warm_state.restore(seen_state.snapshot())
                warm_state.select_rows(guided.cond.cond_rows(guided.x.shape[0]))
            # One eager prepare first: models fill their per-grid tables (position tables of
            # other sizes) there, so the compiled frame sees them already filled.
            transformer.prepare(ex.x, ex.t, ex.cond)
            x, t, conds = settled(ex.x), settled(ex.t), tuple(settled(v) for v in cond_tensors(ex.cond))
            key = self.prepare_key(transformer, x, t, ex.cond)
            image, c, text, mask, grid = ensure(key, lambda: prepare_unit(transformer, ex.cond.cfg_row_order),
                                                "prepare", x, t, *conds)
            rows_per_sample = 2 if ex.cond.guided else 1
            for plan in layout_plans:
                for start, stop, action in plan.segments(len(transformer.blocks)):
                    # An adaptive range runs as a record piece for each possible number of
                    # samples that decide to run it, and as an apply piece when none does.
                    variants = [(action, image.shape[0])]
                    if action == "adaptive":
                        variants = [("apply", image.shape[0])] + [
                            ("record", k) for k in range(rows_per_sample, image.shape[0] + 1, rows_per_sample)]
                    for kind, rows in variants:
                        part = [None if v is None else v[:rows].contiguous() for v in (image, c, text, mask)]
                        key = self.segment_key(transformer, plan, start, stop, kind, *part, grid)
                        part_streams = {"image": part[0], "text": part[2]}
                        deltas = [torch.zeros_like(part_streams[s]) for s in transformer.streams] \
                            if kind == "apply" else []
                        state = {}
                        if kind != "apply":
                            for i in attention_reads(plan, start, stop):
                                if not warm_state.holds(i, plan.block(i).attention, rows):
                                    raise ConfigError(f"block {i}: no planned step stores the attention state its "
                                                      f"policy {plan.block(i).attention.label!r} reuses")
                            state = attention_inputs(warm_state, plan, start, stop, rows)
                        *_, stored = ensure(key, lambda: segment_unit(transformer, plan, start, stop, kind, grid),
                                            f"blocks {start}:{stop} {kind}", *part, state, *deltas)
                        for layer, new in stored.items():
                            warm_state.save(layer, new, copy=True)
            ensure(self.finalize_key(transformer, image, c, grid), lambda: finalize_unit(transformer, grid),
                   "finalize", image, c)
            if not ex.cond_only:
                guided_state = (ex, warm_state)
        run.built = run.expected = len(new_keys)
        made = _unique_graphs() - before
        if made != len(new_keys):
            raise RecompileError(f"building {len(new_keys)} planned graphs made {made}: a piece was traced more "
                                 "than once (a Python value that changes between calls reached a compiled frame)")
        # Labels must tell pieces apart in the hit counts: number the ones that share one.
        seen: dict[str, int] = {}
        for key in new_keys:
            label, fn = self.units[key]
            seen[label] = seen.get(label, 0) + 1
            if seen[label] > 1:
                self.units[key] = (f"{label} #{seen[label]}", fn)
