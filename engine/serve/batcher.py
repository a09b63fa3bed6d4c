"""The request queue: batching of compatible requests, the queue limit, cancellation.

Runs on the server's event loop. One worker coroutine takes the oldest queued request,
waits up to the batch window (counted from that request's arrival) for compatible ones
(equal `Spec.key`) until `max_batch` images are gathered, and runs them as one pipeline
call on a single worker thread (one call at a time: a CPU or one accelerator gains nothing
from two). Requests that do not fit wait for a later batch, oldest first.

Cancelling a queued request removes it; cancelling a running one marks it, and a running
call stops between two steps once every request in it is cancelled (runner.Cancelled).
"""

from __future__ import annotations

import asyncio
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from dite.engine.serve.runner import Cancelled


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the queue is full; retry after {retry_after} s")
        self.retry_after = retry_after


class Job:
    """One request's work and where its result goes."""

    def __init__(self, spec, loop: asyncio.AbstractEventLoop):
        self.spec = spec
        self.future: asyncio.Future = loop.create_future()
        self.arrived = time.monotonic()
        self.cancelled: str | None = None  # why: "timeout" or "disconnect"
        self.started: float | None = None


class Batcher:
    def __init__(self, execute: Callable[[list[Job]], list], metrics, *, max_batch: int, wait_s: float,
                 max_queue: int):
        self.execute, self.metrics = execute, metrics
        self.max_batch, self.wait_s, self.max_queue = max_batch, wait_s, max_queue
        self.queue: list[Job] = []
        self.wakeup = asyncio.Event()
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dite-serve-batch")
        self.seconds_per_image = 1.0  # running estimate, for Retry-After
        self.task: asyncio.Task | None = None
        self.running: list[Job] = []  # the batch on the worker thread

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop taking batches; the running one stops before its next step (it is not
        waited for to the end); queued requests get runner.Cancelled."""
        for job in self.running:
            job.cancelled = job.cancelled or "shutdown"
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        for job in self.queue:
            if not job.future.done():
                job.future.set_exception(Cancelled())
        self.thread.shutdown(wait=True, cancel_futures=True)

    def submit(self, spec) -> Job:
        if len(self.queue) >= self.max_queue:
            queued = sum(job.spec.n for job in self.queue)
            raise QueueFull(max(1, math.ceil(queued * self.seconds_per_image)))
        job = Job(spec, asyncio.get_running_loop())
        self.queue.append(job)
        self._depth()
        self.wakeup.set()
        return job

    def cancel(self, job: Job, reason: str) -> None:
        if job.cancelled or job.future.done():
            return
        job.cancelled = reason
        if job in self.queue:
            self.queue.remove(job)
            self._depth()
        with self.metrics.lock:
            self.metrics.cancelled.inc(reason=reason)

    def _depth(self) -> None:
        with self.metrics.lock:
            self.metrics.queue_depth.set(len(self.queue))

    def _compatible(self, head: Job) -> list[Job]:
        """The head and the queued requests that can join it, oldest first, within max_batch
        images (the head always runs, even when its n alone exceeds max_batch)."""
        batch, images = [head], head.spec.n
        for job in self.queue:
            if job is not head and job.spec.key == head.spec.key and images + job.spec.n <= self.max_batch:
                batch.append(job)
                images += job.spec.n
        return batch

    async def _gather(self) -> list[Job]:
        while not self.queue:
            self.wakeup.clear()
            await self.wakeup.wait()
        head = self.queue[0]
        deadline = head.arrived + self.wait_s
        while sum(j.spec.n for j in self._compatible(head)) < self.max_batch:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self.wakeup.clear()
            try:
                await asyncio.wait_for(self.wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                break
            if head not in self.queue:  # cancelled while waiting: start over
                return []
        batch = self._compatible(head)
        for job in batch:
            self.queue.remove(job)
        self._depth()
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            if not batch:
                continue
            start = time.monotonic()
            with self.metrics.lock:
                for job in batch:
                    job.started = start
                    self.metrics.queue_wait.observe(start - job.arrived)
            self.running = batch
            call = loop.run_in_executor(self.thread, self.execute, batch)
            try:
                outcomes = await asyncio.shield(call)
            except asyncio.CancelledError:  # stop(): its jobs are cancelled, so it ends at its next step
                self._account(batch, await call, time.monotonic() - start)
                raise
            finally:
                self.running = []
            self._account(batch, outcomes, time.monotonic() - start)
            for job, outcome in zip(batch, outcomes):
                if job.future.done() or job.cancelled:  # nobody waits for a cancelled job's outcome
                    continue
                if isinstance(outcome, BaseException):
                    job.future.set_exception(outcome)
                else:
                    job.future.set_result(outcome)

    def _account(self, batch: list[Job], outcomes: list, seconds: float) -> None:
        images = sum(job.spec.n for job in batch)
        self.seconds_per_image = 0.8 * self.seconds_per_image + 0.2 * seconds / images
        with self.metrics.lock:
            self.metrics.batches.inc()
            self.metrics.batch_images.observe(images)
            if any(isinstance(o, Cancelled) for o in outcomes) and not any(job.cancelled is None for job in batch):
                self.metrics.aborted.inc()
            timings = next((o.timings for o in outcomes if not isinstance(o, BaseException)), None)
            if timings and "denoise" in timings:
                self.metrics.denoise.observe(timings["denoise"])
