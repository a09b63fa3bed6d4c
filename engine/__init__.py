"""dite's runtime: `load()`, pipelines, the sampling loop, attention dispatch, CLI.

`from dite.engine import load` is the library entry point. Submodules are imported lazily
so that leaf modules (attention, errors) can be used by `dite.models` without pulling in
the whole engine.
"""

from __future__ import annotations

__all__ = ["load", "convert", "DiteError"]


def __getattr__(name: str):
    if name == "load":
        from dite.engine.loading.loader import load

        return load
    if name == "convert":
        from dite.engine.checkpoints.convert import convert

        return convert
    if name == "DiteError":
        from dite.engine.errors import DiteError

        return DiteError
    raise AttributeError(f"module 'dite.engine' has no attribute {name!r}")
