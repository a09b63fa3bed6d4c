"""The server's counters, gauges and histograms, rendered as Prometheus text (format 0.0.4).

Small and dependency-free on purpose: the server needs a handful of series, not a client
library. Every update happens on the server's event loop or under `lock`, so the values a
scrape reads are consistent.
"""

from __future__ import annotations

import math
import threading

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def _labels(pairs: tuple[tuple[str, str], ...]) -> str:
    if not pairs:
        return ""
    inner = ",".join(f'{k}="{str(v)}"'.replace("\n", " ") for k, v in pairs)
    return "{" + inner + "}"


def _number(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class Series:
    """One metric name: a value per label set."""

    def __init__(self, name: str, kind: str, help_text: str):
        self.name, self.kind, self.help = name, kind, help_text
        self.values: dict[tuple, float] = {}

    def inc(self, amount: float = 1.0, **labels) -> None:
        key = tuple(sorted(labels.items()))
        self.values[key] = self.values.get(key, 0.0) + amount

    def set(self, value: float, **labels) -> None:
        self.values[tuple(sorted(labels.items()))] = value

    def get(self, **labels) -> float:
        return self.values.get(tuple(sorted(labels.items())), 0.0)

    def lines(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]
        for key, value in sorted(self.values.items()):
            out.append(f"{self.name}{_labels(key)} {_number(value)}")
        if not self.values and self.kind == "gauge":
            out.append(f"{self.name} 0")
        return out


class Histogram:
    """Cumulative buckets, sum and count, as Prometheus histograms are."""

    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]):
        self.name, self.help = name, help_text
        self.bounds = tuple(buckets) + (math.inf,)
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for k, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[k] += 1
        self.sum += value
        self.count += 1

    def lines(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for bound, count in zip(self.bounds, self.counts):
            out.append(f'{self.name}_bucket{{le="{_number(bound)}"}} {count}')
        out += [f"{self.name}_sum {_number(self.sum)}", f"{self.name}_count {self.count}"]
        return out


class Metrics:
    """What /metrics reports. `requests` by final HTTP status; `errors` by kind; `cancelled`
    by reason (timeout, disconnect, cancelled: the request's own task was cancelled, as when the
    server stops or a proxy drops it); `batch_images` is images per pipeline call."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = Series("dite_requests_total", "counter", "image generation requests by HTTP status")
        self.images = Series("dite_images_total", "counter", "images generated and returned")
        self.errors = Series("dite_errors_total", "counter", "failed requests by kind")
        self.cancelled = Series("dite_cancelled_total", "counter", "requests whose work was dropped, by reason")
        self.batches = Series("dite_batches_total", "counter", "pipeline calls run (one per batch)")
        self.aborted = Series("dite_batches_aborted_total", "counter",
                              "pipeline calls stopped between steps because every request in them was cancelled")
        self.queue_depth = Series("dite_queue_depth", "gauge", "requests waiting for a batch")
        self.batch_images = Histogram("dite_batch_images", "images per pipeline call", BATCH_BUCKETS)
        self.latency = Histogram("dite_request_seconds", "request latency, arrival to response", LATENCY_BUCKETS)
        self.queue_wait = Histogram("dite_queue_seconds", "time from arrival to the start of its batch",
                                    LATENCY_BUCKETS)
        self.denoise = Histogram("dite_denoise_seconds", "denoising seconds per pipeline call", LATENCY_BUCKETS)

    def render(self) -> str:
        with self.lock:
            parts = [self.requests, self.images, self.errors, self.cancelled, self.batches, self.aborted,
                     self.queue_depth, self.batch_images, self.latency, self.queue_wait, self.denoise]
            return "\n".join(line for part in parts for line in part.lines()) + "\n"
