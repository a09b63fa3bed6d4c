"""Per-call runtime: the sampling loop, step runner, per-call caches and executors."""
