"""`dite tune`'s search for `schedule(run=…)`: which steps run the cached block range.

Greedy removal: start from every step running, and remove one step at a time, the one whose
removal keeps the calibration images closest to plain, until the schedule fits the budget.
Each candidate removal is one measured run on the screen inputs. Evaluated lazily: a
removal's PSNR measured in an earlier round (with more steps running) is an optimistic
estimate of what it gives now, so each round re-measures only the candidates whose old
estimate could still beat the best fresh one (a max-heap on the estimates); on the demo
models that is a few runs a round instead of one per remaining step. Then a local search moves
single steps at the same cost, and the forecast order is raised to 2 on the skipped steps
where that helps (one history, `high=`). The budget a whole
step leaves over is then spent per sample: the same schedule with the threshold (bisected)
that lets a sample whose state moves run the range on other steps too.
"""

from __future__ import annotations

import heapq

from dite.accel.schedule import format_steps


def schedule_spec(run, blocks: tuple[int, int], order: int) -> str:
    return f"schedule(run={format_steps(run)},blocks={blocks[0]}:{blocks[1]},order={order})"


def greedy_schedule(tuner, k: int, order: int, blocks: tuple[int, int]):
    """The schedule found by lazy greedy removal for one forecast order and block range, as
    the tuner's Measured on the first k inputs (None if even step 0 alone does not fit)."""
    steps = tuner.steps
    run = set(range(steps))
    if tuner.cost(schedule_spec({0}, blocks, order)) > tuner.budget + 1e-9:
        return None
    heap = [(-float("inf"), s, -1) for s in range(1, steps)]  # (-estimate, step, round measured)
    heapq.heapify(heap)
    rnd = 0
    while tuner.cost(schedule_spec(run, blocks, order)) > tuner.budget + 1e-9:
        while True:
            neg, step, seen = heapq.heappop(heap)
            if seen == rnd:  # fresh and the best estimate left: take it
                break
            m = tuner.measure("static", schedule_spec(run - {step}, blocks, order), steps, k)
            heapq.heappush(heap, (-(m.psnr if m else -float("inf")), step, rnd))
        run.discard(step)
        rnd += 1
    return tuner.measure("static", schedule_spec(run, blocks, order), steps, k)


def refine_schedule(tuner, k: int, found, order: int, blocks: tuple[int, int], passes: int = 3):
    """Local search after the greedy removal, at the same cost: move one computed step (not
    step 0) to a free neighbouring step, keeping the move that raises the PSNR on the first
    k inputs most, for up to `passes` rounds or until no move helps. Greedy removal decides
    each step once, against the schedule of that round; a move revisits a decision against
    the final one. Returns the best Measured (`found` itself if no move helped)."""
    from dite.accel.schedule import parse_steps

    best = found
    for _ in range(passes):
        run = set(parse_steps("schedule", best.spec.split("run=")[1].split(",")[0], tuner.steps))
        moves = {frozenset(run - {s} | {s + d}) for s in run - {0} for d in (-1, 1)
                 if 0 < s + d < tuner.steps and s + d not in run}
        tried = [tuner.measure("static", schedule_spec(m, blocks, order), tuner.steps, k) for m in sorted(
            moves, key=sorted)]
        better = max((m for m in tried if m is not None), key=lambda m: m.psnr, default=None)
        if better is None or better.psnr <= best.psnr:
            break
        best = better
    return best


def mix_orders(tuner, k: int, found, blocks: tuple[int, int], order: int = 2):
    """An order-1 schedule (`found`, static) with the forecast raised to `order` on the skipped
    steps where that helps, at the same cost: each skipped step is tried alone at `order`
    (the rest at order 1); then, from the best single step down, each step whose try beat
    `found` is added while the combination keeps improving (raising them all at once can
    lose: two raised steps in a row extrapolate from each other's errors). Returns the best
    Measured (`found` itself if nothing helped)."""
    from dite.accel.schedule import parse_steps

    run_text = found.spec.split("run=")[1].split(",")[0]
    skipped = sorted(set(range(tuner.steps)) - set(parse_steps("schedule", run_text, tuner.steps)))

    def measure(high):
        spec = f"schedule(run={run_text},blocks={blocks[0]}:{blocks[1]},order={order},high={format_steps(high)})"
        return tuner.measure("static", spec, tuner.steps, k)

    singles = {s: m for s in skipped if (m := measure({s})) is not None and m.psnr > found.psnr}
    best, high = found, set()
    for s in sorted(singles, key=lambda s: -singles[s].psnr):
        trial = singles[s] if not high else measure(high | {s})
        if trial is not None and trial.psnr > best.psnr:
            best, high = trial, high | {s}
    return best


def fill_budget(tuner, k: int, base: str, evals: int = 7):
    """`base` (a schedule spec within budget) with the threshold that lets samples run the
    range on more steps while the compute stays within the budget (the tuner's threshold
    search, from 0.3), or None."""
    from dite.engine.runtime.tune import search_threshold  # tune imports this module

    return search_threshold(lambda t: tuner.measure("static", base[:-1] + f",threshold={t:g})", tuner.steps, k),
                            lambda m: m.cost(tuner.metric), tuner.budget, 0.3, evals)


def search_schedules(tuner, k: int) -> list:
    """Greedy schedules over the blocks after the first, for forecast orders 1 and 2, each
    refined by same-cost moves; the order-1 one also with order 2 on the skipped steps where
    that helps; each also with the threshold that spends the budget it leaves over."""
    found = []
    for order in (1, 2):
        m = greedy_schedule(tuner, k, order, (1, tuner.depth))
        if m:
            tuner.log(f"  schedule, order {order}: {m.spec}  PSNR {m.psnr:.2f} dB at {m.compute:.3f}")
            found.append(m)
            moved = refine_schedule(tuner, k, m, order, (1, tuner.depth))
            if moved is not m:
                tuner.log(f"  schedule, order {order}, moved: {moved.spec}  PSNR {moved.psnr:.2f} dB at "
                          f"{moved.compute:.3f}")
                found.append(moved)
                m = moved
            if order == 1:
                mixed = mix_orders(tuner, k, m, (1, tuner.depth))
                if mixed is not m:
                    tuner.log(f"  schedule, order 1 and 2 mixed: {mixed.spec}  PSNR {mixed.psnr:.2f} dB at "
                              f"{mixed.compute:.3f}")
                    found.append(mixed)
                    filled = fill_budget(tuner, k, mixed.spec)
                    if filled:
                        found.append(filled)
            filled = fill_budget(tuner, k, m.spec)
            if filled:
                tuner.log(f"  schedule, order {order}, filled: {filled.spec}  PSNR {filled.psnr:.2f} dB at "
                          f"{filled.compute:.3f}")
                found.append(filled)
    return found
