"""Which batch rows each rank runs: data parallelism over images, CFG parallelism over
the two branches (engine/parallel/plan.py lays the ranks out).

The sampling loop's batch is the global one on every rank: B images, or 2B rows in the
family's CFG layout when guided. Rank (d, c, u) runs the rows of its images
[d*B/D, (d+1)*B/D); with cfg=2 only of its branch (the first or second half of the
batch, by position); with cfg=1 of both halves, which keeps the local batch a CFG batch
in the same layout. After PromptGate's gate the batch is the B conditional rows: the
rank holding the conditional branch keeps running them, the other one is freed.
"""

from __future__ import annotations

from dite.engine.parallel.plan import ParallelPlan


def image_share(plan: ParallelPlan, images: int, data_index: int) -> range:
    per = images // plan.data
    return range(data_index * per, (data_index + 1) * per)


def cond_branch(layout: str) -> int:
    """The batch half (0 first, 1 second) that holds the conditional rows."""
    return 0 if layout == "cond_first" else 1


def local_rows(plan: ParallelPlan, coords: tuple[int, int, int], images: int, *, guided: bool, gated: bool,
               layout: str, joined: bool = False) -> list[int]:
    """Global batch rows rank `coords` runs at a step (empty: a rank freed by PromptGate
    that does not join the conditional rank's sequence parallelism, handoff.py)."""
    d, c, _ = coords
    mine = list(image_share(plan, images, d))
    if not guided or gated:
        if plan.cfg == 2 and c != cond_branch(layout) and not joined:
            return []
        return mine
    if plan.cfg == 2:
        return [c * images + i for i in mine]
    return mine + [images + i for i in mine]


def local_slice(rows: list[int], kept: slice, total: int) -> slice:
    """The positions of this rank's rows that fall in the global `kept` rows (a contiguous
    run in every layout above), as a slice of the local batch."""
    keep = set(range(total)[kept])
    positions = [p for p, r in enumerate(rows) if r in keep]
    if not positions:
        return slice(0, 0)
    return slice(positions[0], positions[-1] + 1)
