"""Executors: how the sampling loop runs each step's denoiser call.

"eager" (plain PyTorch, any device), "compiled" (torch.compile per piece, engine/runtime/executors/
compiled.py) and "npu-graph" (the same pieces through torchair on Ascend, npu_graph.py).
`make_executor(name, attention=...)` builds one; `load(..., executor=...)` and
`dite generate --executor` choose it, and `pipe.executor` may be replaced at any time.
"""

from __future__ import annotations

from dite.engine.errors import ConfigError
from dite.engine.runtime.executors.base import Executor, StepExample
from dite.engine.runtime.executors.eager import EagerExecutor

EXECUTORS = ("eager", "compiled", "npu-graph")


def make_executor(name: str | Executor = "eager", *, attention: str = "sdpa", **options) -> Executor:
    """An executor by name; options go to its constructor (compiled: backend, mode, options;
    npu-graph: route, config options)."""
    if isinstance(name, Executor):
        return name
    if name == "eager":
        if options:
            raise ConfigError(f"the eager executor takes no options, got {sorted(options)}")
        return EagerExecutor(attention)
    if name == "compiled":
        from dite.engine.runtime.executors.compiled import CompiledExecutor as cls
    elif name == "npu-graph":
        from dite.engine.runtime.executors.npu_graph import NpuGraphExecutor as cls
    else:
        cls = None
    if cls is not None:
        try:
            return cls(attention, **options)
        except TypeError as exc:  # an option of another executor
            raise ConfigError(f"executor {name!r}: {exc}") from None
    raise ConfigError(f"unknown executor {name!r}; use one of {', '.join(EXECUTORS)}")


__all__ = ["EXECUTORS", "Executor", "StepExample", "make_executor"]
