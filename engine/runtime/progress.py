"""Progress of the stages a user waits for (loading, encoding, denoising, decoding).

The library reports nothing by default. A caller that wants progress (the CLI without
--quiet) installs a `Reporter` with `reporting(...)`; the stages announce themselves through
`stage()` (engine/pipelines/base.timed) and `track()` (tensor by tensor while loading), which
cost nothing while no reporter is installed. Denoising keeps its own step bar
(runtime/sampling.py, `progress=`).
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterable, Iterator, TextIO, TypeVar

T = TypeVar("T")
_active: ContextVar["Reporter | None"] = ContextVar("dite_progress", default=None)


class Reporter:
    """Writes one line per stage to `stream` ("encode ... 0.31 s") and a bar while loading."""

    quiet_stages = ("denoise",)  # has its own bar

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stderr

    def start(self, name: str) -> None:
        if name not in self.quiet_stages:
            self.stream.write(f"{name} ...")
            self.stream.flush()

    def end(self, name: str, seconds: float) -> None:
        if name not in self.quiet_stages:
            self.stream.write(f" {seconds:.2f} s\n")
            self.stream.flush()

    def bar(self, items: Iterable[T], total: int, description: str) -> Iterator[T]:
        from tqdm.auto import tqdm

        return iter(tqdm(items, total=total, desc=description, leave=False, file=self.stream, unit="tensor"))


@contextmanager
def reporting(reporter: Reporter | None):
    """Report stages to `reporter` (None: nothing) within the block."""
    token = _active.set(reporter)
    try:
        yield reporter
    finally:
        _active.reset(token)


@contextmanager
def stage(name: str):
    """Announce a stage to the active reporter, if any."""
    reporter = _active.get()
    if reporter is None:
        yield
        return
    reporter.start(name)
    start = time.perf_counter()
    try:
        yield
    finally:
        reporter.end(name, time.perf_counter() - start)


def track(items: Iterable[T], total: int, description: str) -> Iterable[T]:
    """`items`, with a progress bar while a reporter is active."""
    reporter = _active.get()
    return items if reporter is None else reporter.bar(items, total, description)
