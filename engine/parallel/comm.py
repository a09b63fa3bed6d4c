"""The collectives parallel generation uses, each counted into the call's Traffic.

Every collective runs over one of the plan's process groups (a `Group`: the torch group,
its size and this rank's index in it). Errors of the backend (a peer that died, a timeout)
become a ParallelError naming the collective and the group (engine/parallel/faults.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from dite.engine.parallel.accounting import Traffic, tensor_bytes
from dite.engine.parallel.faults import collective_failed


@dataclass
class Group:
    name: str
    handle: Any  # the torch ProcessGroup
    size: int
    index: int  # this rank's position in the group
    ranks: tuple[int, ...]


class Comm:
    def __init__(self, rank: int):
        self.rank = rank
        self.traffic: Traffic | None = None  # set for the duration of a call

    def _count(self, op: str, nbytes: float) -> None:
        if self.traffic is not None:
            self.traffic.add(op, nbytes)

    def all_to_all(self, chunks: list[torch.Tensor], group: Group) -> list[torch.Tensor]:
        """Send chunks[j] to rank j of `group`; returns what each rank sent to this one."""
        chunks = [c.contiguous() for c in chunks]
        out = [torch.empty_like(c) for c in chunks]
        try:
            dist.all_to_all(out, chunks, group=group.handle)
        except Exception as exc:  # noqa: BLE001 - the backend's errors have no common type
            raise collective_failed("all_to_all", group, self.rank, exc) from None
        self._count("all_to_all", sum(tensor_bytes(c) for j, c in enumerate(chunks) if j != group.index))
        return out

    def all_gather(self, t: torch.Tensor, group: Group) -> list[torch.Tensor]:
        t = t.contiguous()
        out = [torch.empty_like(t) for _ in range(group.size)]
        try:
            dist.all_gather(out, t, group=group.handle)
        except Exception as exc:  # noqa: BLE001
            raise collective_failed("all_gather", group, self.rank, exc) from None
        self._count("all_gather", tensor_bytes(t) * (group.size - 1))
        return out

    def broadcast(self, t: torch.Tensor, src_index: int, group: Group) -> torch.Tensor:
        t = t.contiguous()
        try:
            dist.broadcast(t, group.ranks[src_index], group=group.handle)
        except Exception as exc:  # noqa: BLE001
            raise collective_failed("broadcast", group, self.rank, exc) from None
        self._count("broadcast", tensor_bytes(t) * (group.size - 1) if group.index == src_index else 0)
        return t

    def all_gather_object(self, obj, group: Group) -> list:
        out = [None] * group.size
        try:
            dist.all_gather_object(out, obj, group=group.handle)
        except Exception as exc:  # noqa: BLE001
            raise collective_failed("all_gather_object", group, self.rank, exc) from None
        return out
