"""Process groups of a parallel plan, and starting local workers.

`ParallelContext.create(plan)` builds the plan's groups over the default process group
(every rank must call it, in the same order). `spawn(fn, nproc)` starts `nproc` local
worker processes (torch.multiprocessing, "spawn"), joins them into a gloo group on a free
127.0.0.1 port and returns rank 0's result; under `torchrun` the existing group is used
instead (`ensure_process_group`).
"""

from __future__ import annotations

import datetime
import os
import socket
import time
import traceback
from dataclasses import dataclass

import torch.distributed as dist

from dite.engine.errors import ConfigError, DiteError
from dite.engine.parallel.comm import Comm, Group
from dite.engine.parallel.faults import DEFAULT_TIMEOUT_S, ParallelError, describe_exit
from dite.engine.parallel.plan import ParallelPlan, check_world


@dataclass
class ParallelContext:
    plan: ParallelPlan
    rank: int
    comm: Comm
    world: Group
    ulysses: Group  # same data and cfg index: the ranks that split the tokens
    cfg: Group  # same data and ulysses index: the two CFG branches
    rows: Group  # same ulysses index: the ranks that split the batch rows (cfg x data)
    data: Group  # same cfg and ulysses index: the ranks that split the images
    samples: Group = None  # same data index: every rank holding rows or tokens of its images
    # cfg=2: after PromptGate's gate, both branches' ranks of a data share as one Ulysses
    # group, keyed by the branch that holds the conditional rows (handoff.py); else empty.
    joined: dict = None

    @property
    def coords(self) -> tuple[int, int, int]:
        return self.plan.coords(self.rank)

    @classmethod
    def create(cls, plan: ParallelPlan) -> "ParallelContext":
        ensure_process_group()
        world, rank = dist.get_world_size(), dist.get_rank()
        check_world(plan, world)
        d, c, u = plan.coords(rank)
        everyone = tuple(range(world))

        def make(name: str, members_of) -> Group:
            # new_group is collective: every rank creates every group, in the same order.
            mine = None
            for members in members_of:
                members = tuple(members)
                handle = dist.new_group(list(members)) if len(members) < world else dist.group.WORLD
                if rank in members:
                    mine = Group(name, handle, len(members), members.index(rank), members)
            return mine

        p = plan
        groups = dict(
            world=make("world", [everyone]),
            ulysses=make("ulysses", [[p.rank_of(dd, cc, uu) for uu in range(p.ulysses)]
                                     for dd in range(p.data) for cc in range(p.cfg)]),
            cfg=make("cfg", [[p.rank_of(dd, cc, uu) for cc in range(p.cfg)]
                             for dd in range(p.data) for uu in range(p.ulysses)]),
            rows=make("rows", [[p.rank_of(dd, cc, uu) for dd in range(p.data) for cc in range(p.cfg)]
                               for uu in range(p.ulysses)]),
            data=make("data", [[p.rank_of(dd, cc, uu) for dd in range(p.data)]
                               for cc in range(p.cfg) for uu in range(p.ulysses)]),
            samples=make("samples", [[p.rank_of(dd, cc, uu) for cc in range(p.cfg) for uu in range(p.ulysses)]
                                     for dd in range(p.data)]),
        )
        joined = {}
        if p.cfg == 2:
            for cond in (0, 1):
                joined[cond] = make(f"joined ulysses (conditional branch {cond})",
                                    [[p.rank_of(dd, c, uu) for uu in range(p.ulysses) for c in (cond, 1 - cond)]
                                     for dd in range(p.data)])
        return cls(plan=plan, rank=rank, comm=Comm(rank), joined=joined, **groups)


def ensure_process_group(timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Use the process group that exists (torchrun, spawn) or start one from torchrun's
    environment (gloo on CPU, nccl on CUDA); else say how to start one."""
    if dist.is_available() and dist.is_initialized():
        return
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        raise ConfigError("parallel generation needs a process group: run under torchrun --nproc-per-node N, "
                          "use `dite generate --nproc N`, or dite.engine.parallel.spawn(fn, N)")
    import torch

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, timeout_s: float, fn, args, report) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        value = fn(rank, *args)
        report.send(("ok", value if rank == 0 else None, OWN))
    except BaseException as exc:  # noqa: BLE001 - reported to the launcher, whatever it is
        secondary = isinstance(exc, ParallelError) and exc.secondary
        message = f"{type(exc).__name__}: {exc}" if isinstance(exc, DiteError) else "".join(
            traceback.format_exception_only(type(exc), exc)).strip()
        report.send(("error", message, FOLLOWS if secondary else OWN))
    finally:
        report.close()
        if dist.is_initialized():
            dist.destroy_process_group()


# How sure a report is to be the cause: a rank's own error or death, then a rank that
# stopped answering, then collective failures that follow from another rank's.
OWN, SILENT, FOLLOWS = 0, 1, 2


def spawn(fn, nproc: int, *args, timeout_s: float = DEFAULT_TIMEOUT_S, grace_s: float = 3.0):
    """Run `fn(rank, *args)` in `nproc` local processes joined in a gloo group; return rank
    0's result. `fn` must be picklable (a module-level function). The first failure (a rank
    that raised, died, or stopped answering) stops every worker within `timeout_s` +
    `grace_s` and raises one ParallelError naming the rank and cause."""
    import torch.multiprocessing as mp
    from multiprocessing.connection import wait

    ctx = mp.get_context("spawn")
    port = free_port()
    pipes = [ctx.Pipe(duplex=False) for _ in range(nproc)]  # (launcher's end, worker's end); no semaphores
    procs = [ctx.Process(target=_worker, args=(r, nproc, port, timeout_s, fn, args, pipes[r][1]), daemon=True)
             for r in range(nproc)]
    for p in procs:
        p.start()
    for _, sender in pipes:
        sender.close()  # the worker holds it: end of file on ours means the worker is gone
    reports: dict[int, tuple] = {}
    failure_at = None
    try:
        while len(reports) < nproc:
            waiting = {pipes[r][0]: r for r in range(nproc) if r not in reports}
            for conn in wait(list(waiting), timeout=0.1):
                r = waiting[conn]
                try:
                    reports[r] = conn.recv()
                except EOFError:
                    procs[r].join(1)
                    reports[r] = ("died", describe_exit(r, procs[r].exitcode), OWN)
            if failure_at is None and any(status != "ok" for status, _, _ in reports.values()):
                failure_at = time.monotonic()
            if failure_at is not None and time.monotonic() - failure_at > grace_s:
                break  # the cause is known; the others are stopped below
        for r, p in enumerate(procs):  # still running while the others failed
            if r not in reports and p.is_alive():
                reports[r] = ("hung", f"rank {r} stopped answering (no result while the others failed, "
                                      f"{timeout_s:g} s timeout); it was stopped", SILENT)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
        for receiver, _ in pipes:
            receiver.close()
    errors = sorted((weight, r, status, value) for r, (status, value, weight) in reports.items() if status != "ok")
    if errors:
        _, rank, status, value = errors[0]
        cause = value if status in ("died", "hung") else f"rank {rank} failed: {value}"
        raise ParallelError(f"parallel generation stopped: {cause}", rank=rank)
    return reports[0][1]
