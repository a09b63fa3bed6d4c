"""Multi-process generation on torch.distributed: CFG, Ulysses and data parallelism.

`enable(pipe, {"cfg": 2, "ulysses": 2})` (what `load(src, parallel=...)` calls) makes a
loaded pipeline generate across the ranks of the current process group; every rank loads
the same model and makes the same call, and every rank returns the same output. `spawn(fn,
N)` starts N local workers; under torchrun the existing group is used. docs/parallel.md
says what runs where and what it costs.
"""

from __future__ import annotations

from dite.engine.parallel.faults import ParallelError
from dite.engine.parallel.plan import ParallelPlan, parse_plan


def enable(pipe, parallel, *, timeout_s: float | None = None):
    """Make `pipe` generate in parallel under `parallel` (a plan, dict or "cfg=2,..." string)."""
    from dite.engine.parallel.decode import ParallelDecode
    from dite.engine.parallel.executor import ParallelExecutor
    from dite.engine.parallel.faults import DEFAULT_TIMEOUT_S, check_agree
    from dite.engine.parallel.group import ParallelContext, ensure_process_group
    from dite.engine.parallel.plan import check_model

    plan = parse_plan(parallel)
    ensure_process_group(DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s)
    disable(pipe)
    executor = ParallelExecutor(pipe.executor, None)  # refuses other executors before any group is made
    ctx = ParallelContext.create(plan)
    check_model(plan, pipe.transformer.config.num_heads)
    check_agree(ctx.comm, ctx.world, "the model and parallel plan", model_fingerprint(pipe, plan))
    executor.ctx = ctx
    pipe.executor = executor
    pipe.decode = ParallelDecode(pipe.decode, ctx)
    pipe.parallel = ctx
    return pipe


def disable(pipe):
    """Make `pipe` generate on this process alone again (its groups stay until the process
    group is destroyed)."""
    from dite.engine.parallel.executor import ParallelExecutor

    if isinstance(pipe.executor, ParallelExecutor):
        pipe.executor = pipe.executor.inner
        del pipe.decode  # the instance attribute: the class's decode again
        pipe.parallel = None
    return pipe


def model_fingerprint(pipe, plan: ParallelPlan) -> dict:
    """Cheap to compute, and different for another model, dtype, size or plan: the plan,
    family, config, and a checksum of the first values of every transformer tensor."""
    import torch

    with torch.no_grad():
        sample = sum(float(p.detach().flatten()[:64].double().sum()) for p in pipe.transformer.parameters())
    return {"plan": plan.label, "family": pipe.family, "dtype": str(pipe.dtype),
            "config": repr(sorted(pipe.transformer.config.to_dict().items())), "weights": round(sample, 6),
            "scheduler": type(pipe.scheduler).__name__}


def spawn(fn, nproc: int, *args, **kwargs):
    from dite.engine.parallel.group import spawn as _spawn

    return _spawn(fn, nproc, *args, **kwargs)


__all__ = ["ParallelError", "ParallelPlan", "disable", "enable", "parse_plan", "spawn"]
