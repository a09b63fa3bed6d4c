"""What each rank sends: bytes and collective calls per denoising step, for `out.stats`.

Bytes are the logical payload this rank hands to other ranks, independent of the
algorithm the backend picks:
- all_to_all over P ranks of a tensor of S bytes: S * (P - 1) / P (the chunks for the others);
- all_gather of an S-byte contribution: S * (P - 1) (every other rank gets a copy; what a
  ring all-gather sends per rank, too);
- broadcast of S bytes: S * (P - 1) from the source, 0 from the others.
"""

from __future__ import annotations

from collections import Counter


class Traffic:
    """Counters of one generation call on one rank, closed step by step."""

    def __init__(self):
        self.steps: list[dict] = []
        self._bytes = 0
        self._calls: Counter = Counter()

    def add(self, op: str, nbytes: int) -> None:
        self._bytes += int(nbytes)
        self._calls[op] += 1

    def current(self) -> tuple[int, int]:
        """(bytes, collective calls) counted since the last closed step."""
        return self._bytes, sum(self._calls.values())

    def close_step(self, step: int) -> None:
        self.steps.append({"step": step, "bytes_sent": self._bytes, "calls": dict(self._calls)})
        self._bytes, self._calls = 0, Counter()

    def summary(self) -> dict:
        calls: Counter = Counter()
        for s in self.steps:
            calls.update(s["calls"])
        return {"bytes_sent": sum(s["bytes_sent"] for s in self.steps), "calls": dict(calls), "per_step": self.steps}


def tensor_bytes(t) -> int:
    return t.numel() * t.element_size()
