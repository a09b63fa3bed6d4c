"""Images served by URL (response_format="url") for a limited time, kept in memory."""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict


class ImageFiles:
    """PNG bytes under unguessable names; each expires `ttl_s` after it was stored, and the
    oldest go first when more than `max_files` are held."""

    def __init__(self, ttl_s: float = 600.0, max_files: int = 256):
        self.ttl_s, self.max_files = ttl_s, max_files
        self._files: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, png: bytes) -> str:
        name = f"{secrets.token_urlsafe(16)}.png"
        with self._lock:
            self._expire()
            self._files[name] = (png, time.monotonic() + self.ttl_s)
            while len(self._files) > self.max_files:
                self._files.popitem(last=False)
        return name

    def get(self, name: str) -> bytes | None:
        with self._lock:
            self._expire()
            entry = self._files.get(name)
        return entry[0] if entry else None

    def _expire(self) -> None:
        now = time.monotonic()
        for name in [n for n, (_, until) in self._files.items() if until <= now]:
            del self._files[name]
