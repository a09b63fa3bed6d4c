"""Forecast a skipped block range's delta from the deltas it added at earlier steps.

A row's last m <= order+1 records (x_0 newest, ..., x_{m-1}; values f_0, ...) define one
polynomial of degree m-1 through them; in Newton form it is
    p(x) = f[x_0] + f[x_0,x_1](x - x_0) + ... + f[x_0..x_{m-1}](x - x_0)...(x - x_{m-2}),
with divided differences f[x_i..x_j] = (f[x_{i+1}..x_j] - f[x_i..x_{j-1}]) / (x_j - x_i).
It is exact for any trajectory that is a polynomial of degree <= m-1, on any distinct
(uneven) coordinates, because the interpolating polynomial is unique; no Vandermonde system
is solved. While a row has fewer than order+1 records the missing terms are dropped, so its
order is m-1 (order 0 = re-add the last delta). TaylorSeer (cache-dit) instead divides
successive differences by the latest step gap alone and sums a Taylor series at x_0: exact
for degree 1, not for degree 2 (the backward difference is the slope half a gap back, and
on uneven spacing the gaps differ too).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dite.engine.errors import ConfigError


def _as_stored(coord: float, dtype: torch.dtype) -> float:
    """A host coordinate rounded as the history's coordinate tensor stores it."""
    return float(np.float32(coord)) if dtype == torch.float32 else float(coord)


def _describe(key) -> str:
    if isinstance(key, tuple) and len(key) == 2 and all(isinstance(k, int) for k in key):
        return f"blocks [{key[0]}, {key[1]})"
    return f"range {key!r}"


@dataclass
class _Range:
    """One key's ring buffers: slot `head[r]` holds row r's newest record, older ones precede it
    (mod order+1); slots past `count[r]` records back were never written and stay zero."""

    values: dict[str, torch.Tensor]  # stream -> [K, B, ...] in the deltas' dtype
    coords: torch.Tensor  # [K, B] in the compute dtype
    head: torch.Tensor  # [B] long
    count: torch.Tensor  # [B] long, <= K
    complete: bool = False  # host-side: every row is known to hold a record (skips forecast's check)
    # Host-side mirror while every record so far covered all rows at one Python-number
    # coordinate (a static schedule, or an adaptive step where the whole batch ran): every
    # row then has the same slots and coordinates, so forecast and record need no index
    # kernels and the Newton coefficients' denominators are host scalars. `shared` lists
    # (slot, coordinate) newest first, at most K; None once rows diverge (for good).
    shared: list[tuple[int, float]] | None = None


class DeltaHistory:
    """Per-call, per-range record of the deltas a cached block range added, per batch row and
    per stream, with the coordinate (step index, or the scheduler's sigma/time) of each record.

    Rows are independent (each sample decides whether its blocks run), so each row keeps its
    own last order+1 records and coordinates. Tensors returned by forecast() are read-only and
    may alias the history until the next record() (order 0 with all rows returns a view).
    """

    def __init__(self, order: int):
        if not isinstance(order, int) or order < 0:
            raise ConfigError(f"the forecast order must be an integer >= 0, got {order!r}")
        self.order = order
        self.size = order + 1
        self.batch: int | None = None
        self._ranges: dict = {}

    # -- recording ---------------------------------------------------------------------------

    def record(self, key, coord: float | torch.Tensor, deltas: dict[str, torch.Tensor],
               rows: torch.Tensor | None = None) -> None:
        """Store `deltas` (one row per entry of `rows`, or all rows) as the newest record at
        `coord`. Only those rows are written, so rows that did not run keep their older history;
        recording again at a row's newest coordinate replaces that record. `rows` must be unique."""
        if not deltas:
            raise ConfigError(f"no streams given to record for {_describe(key)}")
        n = next(iter(deltas.values())).shape[0]
        for s, d in deltas.items():
            if d.shape[0] != n:
                raise ConfigError(f"the deltas of {_describe(key)} have {d.shape[0]} rows in stream {s!r}, "
                                  f"{n} in another")
        if rows is not None and rows.numel() != n:
            raise ConfigError(f"{rows.numel()} rows named for {_describe(key)}, but its deltas have {n}")
        entry = self._ranges.get(key)
        if entry is None:
            entry = self._allocate(key, deltas, n if rows is None else None)
        self._check_streams(key, entry, deltas)
        batch = entry.head.shape[0]
        if rows is None and n != batch:
            raise ConfigError(f"the deltas of {_describe(key)} have {n} rows, the history {batch}: "
                              "record a subset with `rows`, or select_rows when the batch shrinks")
        if rows is None and entry.shared is not None and not isinstance(coord, torch.Tensor):
            self._record_shared(entry, float(coord), deltas)
            return
        entry.shared = None
        device = entry.head.device
        idx = torch.arange(batch, device=device) if rows is None else rows.to(device)
        c = self._coords_for(coord, entry, idx.shape[0])

        cnt, head = entry.count[idx], entry.head[idx]
        same = (cnt > 0) & (entry.coords[head, idx] == c)
        slot = torch.where(same, head, (head + 1) % self.size)
        entry.head[idx] = slot
        entry.count[idx] = torch.where(same, cnt, (cnt + 1).clamp(max=self.size))
        entry.coords[slot, idx] = c
        for s, d in deltas.items():
            buf = entry.values[s]
            if rows is None and self.size == 1:
                buf[0].copy_(d)  # the whole buffer: a plain copy, no index kernel
            else:
                buf[slot, idx] = d.to(buf.dtype)
        if rows is None:
            entry.complete = True

    def _record_shared(self, entry: _Range, coord: float, deltas: dict[str, torch.Tensor]) -> None:
        """record() for all rows at a host coordinate while the rows share their slots: the
        slot is known on the host, so each stream is one copy and the bookkeeping fills."""
        coord = _as_stored(coord, entry.coords.dtype)
        shared = entry.shared
        if shared and shared[0][1] == coord:  # same coordinate as the newest: replace it
            slot = shared[0][0]
        else:
            slot = (shared[0][0] + 1) % self.size if shared else 0
            shared.insert(0, (slot, coord))
            del shared[self.size:]
        entry.head.fill_(slot)
        entry.count.fill_(len(shared))
        entry.coords[slot].fill_(coord)
        for s, d in deltas.items():
            entry.values[s][slot].copy_(d)
        entry.complete = True

    def _allocate(self, key, deltas: dict[str, torch.Tensor], batch: int | None) -> _Range:
        batch = batch if batch is not None else self.batch
        if batch is None:
            raise ConfigError(f"the first record of {_describe(key)} names a subset of rows, but the batch "
                              "size is not known yet: record all rows first")
        first = next(iter(deltas.values()))
        cdtype = torch.float64 if any(d.dtype == torch.float64 for d in deltas.values()) else torch.float32
        values = {s: d.new_zeros((self.size, batch, *d.shape[1:])) for s, d in deltas.items()}
        coords = torch.zeros((self.size, batch), dtype=cdtype, device=first.device)
        head = torch.full((batch,), self.size - 1, dtype=torch.long, device=first.device)
        count = torch.zeros(batch, dtype=torch.long, device=first.device)
        entry = _Range(values, coords, head, count, shared=[] if batch == first.shape[0] else None)
        self._ranges[key] = entry
        self.batch = batch
        return entry

    def _check_streams(self, key, entry: _Range, deltas: dict[str, torch.Tensor]) -> None:
        if set(deltas) != set(entry.values):
            raise ConfigError(f"{_describe(key)} recorded streams {sorted(entry.values)} before, now {sorted(deltas)}")
        for s, d in deltas.items():
            if d.shape[1:] != entry.values[s].shape[2:]:
                raise ConfigError(f"the {s!r} delta of {_describe(key)} has shape {tuple(d.shape[1:])} per row, "
                                  f"earlier records {tuple(entry.values[s].shape[2:])}")

    @staticmethod
    def _coords_for(coord, entry: _Range, n: int) -> torch.Tensor | float:
        """A tensor coordinate as [n] on the history's device; a Python number stays a scalar
        (filled by kernels, so it costs no host-to-device copy)."""
        if isinstance(coord, torch.Tensor):
            c = coord.to(device=entry.coords.device, dtype=entry.coords.dtype)
            return c.expand(n) if c.dim() == 0 else c.reshape(n)
        return torch.full((n,), float(coord), dtype=entry.coords.dtype, device=entry.coords.device)

    # -- forecasting -------------------------------------------------------------------------

    def forecast(self, key, coord: float | torch.Tensor, rows: torch.Tensor | None = None,
                 degree: int | None = None) -> dict[str, torch.Tensor]:
        """The extrapolated delta of each stream for `rows` (all rows if None) at `coord`, from
        as many records as each row has, up to order+1 (`degree`: up to degree+1, the newest);
        in the deltas' dtype.

        Host syncs: none once every row has a record of `key` (known on the host after any
        record with rows=None, i.e. from the first step on); before that one, to check that the
        requested rows have a record. Pass `coord` as a Python number or a tensor on the
        history's device, else its copy there may sync too."""
        entry = self._ranges.get(key)
        if entry is None:
            raise ConfigError(f"{_describe(key)} is to be replaced by a forecast delta, but no earlier step "
                              "recorded it: a plan must record a range before it applies it")
        batch = entry.head.shape[0]
        device = entry.head.device
        idx = None if rows is None else rows.to(device)
        if not entry.complete:
            self._check_recorded(key, entry, idx)

        terms = self.size if degree is None else min(self.size, degree + 1)
        if terms == 1:  # order 0: the last delta itself, bitwise
            if idx is None and self.size == 1:
                return {s: buf[0] for s, buf in entry.values.items()}
            if self.size == 1:
                return {s: buf[0].index_select(0, idx) for s, buf in entry.values.items()}
            idx = torch.arange(batch, device=device) if idx is None else idx
            newest = entry.head[idx]
            return {s: buf[newest, idx] for s, buf in entry.values.items()}

        if entry.shared and not isinstance(coord, torch.Tensor):
            return self._forecast_shared(entry, float(coord), idx, terms)
        if idx is None:
            idx = torch.arange(batch, device=device)
        r = idx.shape[0]
        ages = torch.arange(self.size, device=device)
        slots = (entry.head[idx].unsqueeze(0) - ages.unsqueeze(1)) % self.size  # [K, R], newest first
        n = entry.count[idx].clamp(max=terms)  # [R], >= 1: the records this forecast uses
        valid = ages.unsqueeze(1) < n.unsqueeze(0)  # [K, R]
        xs = entry.coords[slots, idx.unsqueeze(0)]  # [K, R]
        x = self._coords_for(coord, entry, r)
        # Newton coefficient scales (small [R] tensors): a divided difference over a span that
        # reaches an unrecorded slot divides by 1 instead (its term is dropped below anyway).
        out = {}
        for s, buf in entry.values.items():
            cdtype = entry.coords.dtype
            c = buf[slots, idx.unsqueeze(0)]  # [K, R, ...] gathered copy, ours to overwrite
            c = c.to(cdtype) if c.dtype != cdtype else c
            shape = (r,) + (1,) * (c.dim() - 2)
            for j in range(1, self.size):  # c[i] <- f[x_{i-j} .. x_i], in place, high i first
                for i in range(self.size - 1, j - 1, -1):
                    den = torch.where(valid[i], xs[i] - xs[i - j], torch.ones_like(xs[i]))
                    c[i].sub_(c[i - 1]).div_(den.view(shape))
            # Horner from the top: acc = c_j + (x - x_j) * acc, the factor zeroed past a row's
            # newest-but-(n-1) record so that row's polynomial has degree n-1.
            acc = c[self.size - 1]
            for j in range(self.size - 2, -1, -1):
                w = torch.where(valid[j + 1], x - xs[j], torch.zeros_like(xs[j]))
                acc = c[j].addcmul_(acc, w.view(shape))
            out[s] = acc.to(buf.dtype)
        return out

    def _forecast_shared(self, entry: _Range, x: float, idx: torch.Tensor | None,
                         terms: int) -> dict[str, torch.Tensor]:
        """forecast() while every row shares its slots and coordinates: the same Newton form
        with host-scalar denominators and factors, so a stream costs about (m+1)m/2 + m
        elementwise kernels for m records and no index bookkeeping."""
        x = _as_stored(x, entry.coords.dtype)
        slots = [slot for slot, _ in entry.shared[:terms]]
        xs = [coord for _, coord in entry.shared[:terms]]
        m, cdtype = len(slots), entry.coords.dtype
        out = {}
        for s, buf in entry.values.items():
            rows = buf if idx is None else buf.index_select(1, idx)
            if m == 1:
                out[s] = rows[slots[0]]  # the last delta itself, bitwise (a view, read-only)
                continue
            if m == 2:  # the line through both records: one kernel
                f0, f1 = rows[slots[0]].to(cdtype), rows[slots[1]].to(cdtype)
                out[s] = torch.lerp(f0, f1, (x - xs[0]) / (xs[1] - xs[0])).to(buf.dtype)
                continue
            # c[i] <- f[x_{i-j} .. x_i] in place, high i first; c[0] stays f_0 (a view: not written)
            c = [rows[slots[0]].to(cdtype)] + [rows[slot].to(cdtype, copy=True) for slot in slots[1:]]
            for j in range(1, m):
                for i in range(m - 1, j - 1, -1):
                    c[i].sub_(c[i - 1]).div_(xs[i] - xs[i - j])
            acc = c[m - 1]
            for j in range(m - 2, -1, -1):
                acc = torch.add(c[j], acc, alpha=x - xs[j])
            out[s] = acc.to(buf.dtype)
        return out

    def _check_recorded(self, key, entry: _Range, idx: torch.Tensor | None) -> None:
        """One host sync: fails for requested rows without a record, and marks the range
        complete once every row has one (so later forecasts skip this)."""
        missing = entry.count == 0
        asked = missing if idx is None else missing[idx]
        any_asked, any_all = torch.stack([asked.any(), missing.any()]).tolist()
        if any_asked:
            bad = (idx if idx is not None else torch.arange(missing.shape[0], device=missing.device))[asked]
            raise ConfigError(f"{_describe(key)} is to be replaced by a forecast delta for batch rows "
                              f"{bad.tolist()}, but those rows never recorded it: a row must run a range "
                              "before its delta can be reused")
        if not any_all:
            entry.complete = True

    # -- batch changes and queries -----------------------------------------------------------

    def select_rows(self, rows: slice | torch.Tensor) -> None:
        """Keep only these batch rows, renumbered 0.. (the conditional rows when the
        unconditional CFG branch leaves the batch). Copies, so the dropped rows' memory is freed."""
        for entry in self._ranges.values():
            sel = rows if isinstance(rows, slice) else rows.to(entry.head.device)
            entry.values = {s: buf[:, sel].clone() for s, buf in entry.values.items()}
            entry.coords = entry.coords[:, sel].clone()
            entry.head = entry.head[sel].clone()
            entry.count = entry.count[sel].clone()
        if self.batch is not None:
            if isinstance(rows, slice):
                self.batch = len(range(self.batch)[rows])
            elif rows.dtype == torch.bool:
                self.batch = int(rows.sum())
            else:
                self.batch = rows.numel()

    def recorded(self, key, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Which of `rows` (all if None) hold at least one record of `key`, as a bool tensor."""
        entry = self._ranges.get(key)
        if entry is None:
            n = rows.numel() if rows is not None else (self.batch or 0)
            return torch.zeros(n, dtype=torch.bool, device=rows.device if rows is not None else None)
        counts = entry.count if rows is None else entry.count[rows.to(entry.count.device)]
        return counts > 0

    def last_coord(self, key) -> torch.Tensor:
        """Each row's newest recorded coordinate (nan where it has none), e.g. to pick the
        rows whose history is recent enough."""
        entry = self._ranges.get(key)
        if entry is None:
            return torch.full((self.batch or 0,), float("nan"))
        batch = entry.head.shape[0]
        newest = entry.coords[entry.head, torch.arange(batch, device=entry.head.device)]
        return torch.where(entry.count > 0, newest, torch.full_like(newest, float("nan")))

    def __contains__(self, key) -> bool:
        return key in self._ranges

    def __len__(self) -> int:
        return len(self._ranges)
