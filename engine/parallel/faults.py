"""Failures of a parallel generation: one clear error, never a hang.

- Every collective has the process group's timeout (`timeout_s`, default 120 s), so a rank
  that stops answering makes its peers fail instead of waiting for ever.
- A backend error inside a collective (a peer process died, the timeout passed) becomes a
  ParallelError naming this rank, the collective, the group and the backend's first line.
- The local launcher (engine/parallel/group.spawn) watches its workers: the first rank that
  raised, or died without reporting (a signal, an exit code), is the cause; the others'
  collective failures follow from it. It stops the remaining workers and raises one
  ParallelError naming that rank and cause.
- Mismatched configurations (another plan, model or call on some rank) are found by an
  exchange of fingerprints at `enable` and at the start of every call (`check_agree`).
"""

from __future__ import annotations

import signal

from dite.engine.errors import DiteError

DEFAULT_TIMEOUT_S = 120.0


class ParallelError(DiteError, RuntimeError):
    """A parallel generation failed on some rank (died, raised, timed out, or disagreed)."""

    def __init__(self, message: str, *, rank: int | None = None, secondary: bool = False):
        super().__init__(message)
        self.rank = rank
        self.secondary = secondary  # a consequence of another rank's failure


def collective_failed(op: str, group, rank: int, exc: BaseException) -> ParallelError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    return ParallelError(f"rank {rank}: {op} over the {group.name} group (ranks {list(group.ranks)}) failed: {first} "
                         "(a peer rank died, raised, or passed the timeout)", rank=rank, secondary=True)


def describe_exit(rank: int, exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"rank {rank} died: killed by {name}"
    return f"rank {rank} died: exit code {exitcode} without reporting a result"


def check_agree(comm, group, what: str, fingerprint) -> None:
    """Raise on every rank if the ranks of `group` do not share `fingerprint` (anything
    picklable that compares by value)."""
    values = comm.all_gather_object(fingerprint, group)
    if all(v == values[0] for v in values):
        return
    odd = [group.ranks[i] for i, v in enumerate(values) if v != values[0]]
    differing = []
    if isinstance(values[0], dict):
        differing = sorted({k for v in values if isinstance(v, dict) for k in v if v.get(k) != values[0].get(k)})
    detail = f" (differing: {', '.join(differing)})" if differing else ""
    raise ParallelError(f"rank {comm.rank}: the ranks disagree on {what}{detail}: ranks {odd} differ from rank "
                        f"{group.ranks[0]}; every rank must load the same model and make the same call",
                        rank=comm.rank)
