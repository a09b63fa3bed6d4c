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
    """`ranks` in the group's own order (a Ulysses group: band order), which `index` and the
    chunk lists of the collectives below follow; torch numbers a group's ranks in
    increasing global rank, so the collectives translate."""

    name: str
    handle: Any  # the torch ProcessGroup
    size: int
    index: int  # this rank's position in `ranks`
    ranks: tuple[int, ...]

    @property
    def torch_order(self) -> list[int]:
        """For each torch group rank, the position in `ranks` of that member."""
        return [self.ranks.index(r) for r in sorted(self.ranks)]


class Comm:
    def __init__(self, rank: int):
        self.rank = rank
        self.traffic: Traffic | None = None  # set for the duration of a call

    def count(self, op: str, nbytes: float) -> None:
        if self.traffic is not None:
            self.traffic.add(op, nbytes)

    def all_to_all(self, chunks: list[torch.Tensor], group: Group) -> list[torch.Tensor]:
        """Send chunks[j] to rank j of `group`; returns what each rank sent to this one."""
        order = group.torch_order
        send = [chunks[k].contiguous() for k in order]
        got = [torch.empty_like(c) for c in send]
        try:
            dist.all_to_all(got, send, group=group.handle)
        except Exception as exc:  # noqa: BLE001 - the backend's errors have no common type
            raise collective_failed("all_to_all", group, self.rank, exc) from None
        self.count("all_to_all", sum(tensor_bytes(c) for j, c in enumerate(chunks) if j != group.index))
        out = [None] * group.size
        for position, k in enumerate(order):
            out[k] = got[position]
        return out

    def _gathered(self, t: torch.Tensor, group: Group, name: str) -> list[torch.Tensor]:
        """Every rank's `t` in torch's order of the group, counted as collective `name`."""
        t = t.contiguous()
        got = [torch.empty_like(t) for _ in range(group.size)]
        try:
            dist.all_gather(got, t, group=group.handle)
        except Exception as exc:  # noqa: BLE001
            raise collective_failed(name, group, self.rank, exc) from None
        self.count(name, tensor_bytes(t) * (group.size - 1))
        return got

    def all_gather(self, t: torch.Tensor, group: Group) -> list[torch.Tensor]:
        got = self._gathered(t, group, "all_gather")
        out = [None] * group.size
        for position, k in enumerate(group.torch_order):
            out[k] = got[position]
        return out

    def broadcast(self, t: torch.Tensor, src_index: int, group: Group) -> torch.Tensor:
        t = t.contiguous()
        try:
            dist.broadcast(t, group.ranks[src_index], group=group.handle)
        except Exception as exc:  # noqa: BLE001
            raise collective_failed("broadcast", group, self.rank, exc) from None
        self.count("broadcast", tensor_bytes(t) * (group.size - 1) if group.index == src_index else 0)
        return t

    def all_reduce(self, t: torch.Tensor, group: Group) -> torch.Tensor:
        """The sum over `group` of every rank's `t`, bitwise the same on every rank: the
        contributions are all-gathered and added in the group's order on each rank, so no
        backend's reduction order can make two ranks' sums differ in the last bit (the
        adaptive cache compares them to a threshold). For small tensors (per-sample sums)."""
        got = self._gathered(t, group, "all_reduce")
        total = got[0].clone()  # torch order: the same on every rank of the group
        for part in got[1:]:
            total += part
        return total

    def all_gather_object(self, obj, group: Group) -> list:
        out = [None] * group.size
        try:
            dist.all_gather_object(out, obj, group=group.handle)
        except Exception as exc:  # noqa: BLE001
            raise collective_failed("all_gather_object", group, self.rank, exc) from None
        return [out[group.torch_order.index(k)] for k in range(group.size)]
