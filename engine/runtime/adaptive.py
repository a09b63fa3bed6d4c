"""Per-call state and execution of forecasting and adaptive block ranges.

A forecasting range ("record" / "apply" with order > 0) keeps the deltas it recorded in a
DeltaHistory and, where it is skipped, adds the delta extrapolated to this step instead of
the last one. An adaptive range decides at run time, per sample: the samples whose signal
(what the front blocks produced) changed by more than the threshold since they last ran the
range run it now, as one smaller batch; the others get their forecast delta. Because every
row's decision and arithmetic depend only on that row's own history, a prompt gets the same
decisions and (to float rounding of batched matmuls) the same image in a batch as alone.

Host syncs: one per adaptive step (the per-sample decision is read to gather the rows that
run); none for forecasting ranges with a fixed schedule.

Every executor records and applies block ranges through the three functions here, so the
eager runner (runtime/step.py) and the graph executors (runtime/executors/) differ only in
how blocks run and how a delta is added: `applied_delta` (what a skipped range adds: the
stored delta, or the forecast one), `keep_delta` (where a recorded delta goes) and
`adaptive_range` (decide per sample, run the rows that run, forecast the others, merge).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from dite.engine.errors import ConfigError
from dite.engine.runtime.delta_store import DeltaStore
from dite.engine.runtime.forecast import DeltaHistory
from dite.models.attention import stateful
from dite.models.denoiser import Hidden
from dite.models.plan import RangeOp

# Hidden fields with one row per batch row (grid is shared; attn_cache is refused).
_ROW_FIELDS = ("image", "c", "text", "text_mask")


@dataclass
class RangeState:
    """What forecasting and adaptive ranges remember between the steps of one call.

    `references[key]`: each row's signal at the last step it ran the range; `streaks[key]`:
    how many steps in a row it has reused since. `decisions` lists, per adaptive step, the
    range and which samples ran it (for `out.stats` and tests). `rows_per_sample` is 2 while
    both CFG branches are in the batch, else 1; the sampling loop sets it and the step's
    coordinates before each step."""

    history: DeltaHistory | None = None
    # The signal at the steps each row ran the range, for the "forecast" judge: the same
    # extrapolation the skipped delta gets, applied to what the front blocks produced.
    signals: DeltaHistory | None = None
    references: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    streaks: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    # (reference, each sample's L1 size of it), kept between the steps it does not run (the
    # "last" judge divides by it on every step); used only while `references[key]` is still
    # that very tensor, so a reference replaced anywhere (settle, PromptGate's row drop, a
    # parallel hand-over's token split) is measured again.
    reference_sizes: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    decisions: list[dict] = field(default_factory=list)
    step: int = 0
    time: float = 0.0
    rows_per_sample: int = 1
    block_rows: int = 0  # rows x blocks run inside adaptive ranges during the current step
    # Parallel generation only (engine/parallel/executor.py): sums a [2, samples] tensor of
    # per-sample partial sums over the ranks holding the other CFG rows and token bands of
    # the same samples, identically on each, so all of them take the same decision. None
    # (one process, or every sample whole on one rank): the local sums are the whole sums.
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None

    def coordinate(self, op: RangeOp) -> float:
        return float(self.step) if op.coord == "step" else self.time

    def history_for(self, op: RangeOp) -> DeltaHistory:
        if self.history is None:
            self.history = DeltaHistory(op.order)
        elif self.history.order != op.order:
            raise ConfigError(f"blocks [{op.start}, {op.stop}) forecast with order {op.order}, but this call's "
                              f"history keeps order {self.history.order}: one call uses one forecast order")
        return self.history

    def select_rows(self, rows: slice) -> None:
        """Keep only `rows` (the conditional rows, when PromptGate drops the others)."""
        for history in (self.history, self.signals):
            if history is not None:
                history.select_rows(rows)
        self.references = {k: v[rows].clone() for k, v in self.references.items()}
        self.reference_sizes = {}
        self.streaks = {k: v[rows].clone() for k, v in self.streaks.items()}


Delta = dict[str, torch.Tensor]  # per stream ("image", and MMDiT's "text")


def applied_delta(op: RangeOp, deltas: DeltaStore, rs: RangeState | None, rows: int) -> Delta:
    """What a skipped range adds to its input: with a forecast order, the delta extrapolated
    to this step from the range's history; else the last delta recorded (checked for `rows`)."""
    if op.order:
        return rs.history_for(op).forecast(op.key, rs.coordinate(op), degree=op.degree)
    return deltas.get(op.key, rows)


def keep_delta(op: RangeOp, deltas: DeltaStore, rs: RangeState | None, delta: Delta, *, copy: bool = False) -> None:
    """Where a recorded range's delta goes: its forecast history (order > 0) or the call's
    DeltaStore (`copy`: into the buffer it holds, for graph executors)."""
    if op.order:
        rs.history_for(op).record(op.key, rs.coordinate(op), delta)
    else:
        deltas.store(op.key, delta, copy=copy)


def decide(rs: RangeState, op: RangeOp, signal: torch.Tensor) -> list[bool]:
    """Per sample: whether it runs the range this step (one host sync)."""
    key, rows = op.key, signal.shape[0]
    rps = rs.rows_per_sample
    samples = rows // rps
    reference, streak = rs.references.get(key), rs.streaks.get(key)
    if op.force or reference is None or reference.shape[0] != rows:
        return [True] * samples
    size = None
    if op.judge == "forecast":
        # What the signal would be if it followed the polynomial through the steps this row
        # ran: a small miss predicts a small miss of the forecast delta.
        reference = rs.signals.forecast(key, rs.coordinate(op))["signal"]
    else:  # the reference changes only on steps a sample runs: its size is kept until then
        kept = rs.reference_sizes.get(key)
        size = kept[1] if kept is not None and kept[0] is reference else None
    # Relative L1 difference of each sample's signal over all its rows (both CFG branches),
    # in float32 whatever the model's dtype, from its reference.
    change = (_as_float(signal) - _as_float(reference)).abs_().flatten(1).sum(1).view(rps, samples).sum(0)
    if size is None:
        size = _as_float(reference).abs().flatten(1).sum(1).view(rps, samples).sum(0)
        if op.judge != "forecast":
            rs.reference_sizes[key] = (reference, size)
    if rs.reduce is not None:
        change, size = rs.reduce(torch.stack([change, size])).unbind(0)
    over = change > op.threshold * size.clamp_min(torch.finfo(torch.float32).tiny)
    if op.max_cached <= rs.step:  # a streak is at most the steps since step 0 (which runs): else it cannot bind
        over |= streak.view(rps, samples)[0] >= op.max_cached
    return over.tolist()


def _as_float(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()


def choose_rows(rs: RangeState, op: RangeOp, signal: torch.Tensor) -> list[int]:
    """The batch rows that run the range this step (every row of a sample that decided to)."""
    per_sample = decide(rs, op, signal)
    rs.decisions.append({"step": rs.step, "range": list(op.key), "ran": per_sample})
    return [r for r in range(signal.shape[0]) if per_sample[r % len(per_sample)]]


def settle(rs: RangeState, op: RangeOp, signal: torch.Tensor, run_rows: list[int]) -> None:
    """After the step: rows that ran keep this step's signal as their reference and restart
    their streak; the others' streak grows."""
    rows, key = signal.shape[0], op.key
    streak = rs.streaks.get(key)
    if streak is None or streak.shape[0] != rows:
        streak = torch.zeros(rows, dtype=torch.long, device=signal.device)
    if op.judge == "forecast":
        if rs.signals is None:
            rs.signals = DeltaHistory(op.order)
        everyone = len(run_rows) == rows or key not in rs.references
        if everyone or run_rows:
            idx = None if everyone else torch.tensor(run_rows, dtype=torch.long, device=signal.device)
            rs.signals.record(key, rs.coordinate(op), {"signal": signal if idx is None else signal.index_select(0, idx)},
                              rows=idx)
    if len(run_rows) == rows or key not in rs.references:
        rs.references[key] = signal.detach().clone()
        rs.reference_sizes.pop(key, None)
        rs.streaks[key] = torch.zeros_like(streak)
    elif run_rows:
        idx = torch.tensor(run_rows, dtype=torch.long, device=signal.device)
        reference = rs.references[key].clone()
        reference.index_copy_(0, idx, signal.index_select(0, idx))
        rs.references[key] = reference
        rs.reference_sizes.pop(key, None)
        ran = torch.zeros(rows, dtype=torch.bool, device=signal.device)
        ran[idx] = True
        rs.streaks[key] = torch.where(ran, torch.zeros_like(streak), streak + 1)
    else:
        rs.streaks[key] = streak + 1
    rs.block_rows += len(run_rows) * (op.stop - op.start)


def split_rows(run_rows: list[int], rows: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    ran = set(run_rows)
    return (torch.tensor(run_rows, dtype=torch.long, device=device),
            torch.tensor([r for r in range(rows) if r not in ran], dtype=torch.long, device=device))


def merge_rows(full: torch.Tensor, idx: torch.Tensor, computed: torch.Tensor, skip: torch.Tensor,
               delta: torch.Tensor) -> torch.Tensor:
    """Rows `idx` from the blocks' output, rows `skip` as their input plus the forecast delta."""
    merged = torch.empty_like(full)
    merged.index_copy_(0, idx, computed)
    merged.index_copy_(0, skip, full.index_select(0, skip) + delta)
    return merged


def adaptive_signal(op: RangeOp, image: torch.Tensor, prepared: torch.Tensor) -> torch.Tensor:
    """What an adaptive range judges: the image stream entering it, or what the blocks in
    front of it added to the prepared tokens."""
    return image if op.signal == "hidden" else image - prepared


def adaptive_range(rs: RangeState, op: RangeOp, signal: torch.Tensor, streams: Delta,
                   run: Callable[[torch.Tensor | None], tuple[Delta, Delta]],
                   add: Callable[[Delta], Delta]) -> Delta:
    """Blocks [op.start, op.stop) for the samples that decide to run them, forecast deltas
    for the others; returns the new streams. `streams`: the range's input per stream;
    `run(idx)` runs the blocks on rows `idx` (None: every row) and returns (their new
    streams, out - in); `add(delta)` returns every row's streams plus `delta` (no block runs)."""
    rows = signal.shape[0]
    run_rows = choose_rows(rs, op, signal)
    history, coord = rs.history_for(op), rs.coordinate(op)
    if len(run_rows) == rows:
        new, delta = run(None)
        history.record(op.key, coord, delta)
    elif not run_rows:
        new = add(history.forecast(op.key, coord, degree=op.degree))
    else:
        idx, skip = split_rows(run_rows, rows, signal.device)
        computed, delta = run(idx)
        history.record(op.key, coord, delta, rows=idx)
        forecast = history.forecast(op.key, coord, rows=skip, degree=op.degree)
        new = {s: merge_rows(streams[s], idx, computed[s], skip, forecast[s]) for s in computed}
    settle(rs, op, signal, run_rows)
    return new


def run_adaptive(transformer, plan, op: RangeOp, hidden: Hidden, prepared: Hidden, rs: RangeState) -> Hidden:
    """The eager adaptive range (adaptive_range with the blocks run in Python)."""
    if any(stateful(plan.block(i).attention) for i in range(op.start, op.stop)):
        raise ConfigError("the adaptive cache gathers the rows that run, which DiTFastAttn's per-layer attention "
                          "cache cannot follow yet: use adaptive without fastattn")
    names = transformer.streams

    def run(idx):
        sub = hidden if idx is None else _rows(hidden, idx)
        out = transformer.run_blocks(sub, plan, op.start, op.stop)
        return ({s: getattr(out, s) for s in names}, {s: getattr(out, s) - getattr(sub, s) for s in names})

    streams = {s: getattr(hidden, s) for s in names}
    new = adaptive_range(rs, op, adaptive_signal(op, hidden.image, prepared.image), streams, run,
                         lambda delta: {s: streams[s] + delta[s] for s in names})
    return replace(hidden, **new)


def _rows(hidden: Hidden, idx: torch.Tensor) -> Hidden:
    return replace(hidden, **{f: None if getattr(hidden, f) is None else getattr(hidden, f).index_select(0, idx)
                              for f in _ROW_FIELDS})
