"""The parallel plan: how many ranks split the CFG branches, the image tokens (Ulysses) and
the images of a batch, and the checks that refuse a plan before any work starts.

Ranks are laid out with Ulysses innermost (the chattiest group sits on neighbouring ranks,
which share a node's fastest links), then CFG, then data:
    rank = (data_index * cfg + cfg_index) * ulysses + ulysses_index
"""

from __future__ import annotations

from dataclasses import dataclass

from dite.engine.errors import ConfigError

AXES = ("cfg", "ulysses", "data")


@dataclass(frozen=True)
class ParallelPlan:
    cfg: int = 1
    ulysses: int = 1
    data: int = 1

    @property
    def world(self) -> int:
        return self.cfg * self.ulysses * self.data

    @property
    def label(self) -> str:
        return ",".join(f"{a}={getattr(self, a)}" for a in AXES if getattr(self, a) > 1) or "none"

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(data_index, cfg_index, ulysses_index) of `rank`."""
        return rank // (self.cfg * self.ulysses), (rank // self.ulysses) % self.cfg, rank % self.ulysses

    def rank_of(self, data: int, cfg: int, ulysses: int) -> int:
        return (data * self.cfg + cfg) * self.ulysses + ulysses


def parse_plan(spec) -> ParallelPlan:
    """A plan from {"cfg": 2, "ulysses": 2} or the CLI's "cfg=2,ulysses=2"."""
    if isinstance(spec, ParallelPlan):
        return spec
    if isinstance(spec, str):
        items = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, eq, value = part.partition("=")
            if not eq:
                raise ConfigError(f"parallel {spec!r}: {part!r} is not NAME=N; write e.g. cfg=2,ulysses=2")
            items[name.strip()] = value.strip()
        spec = items
    if not isinstance(spec, dict) or not spec:
        raise ConfigError(f"parallel must be a dict like {{'cfg': 2, 'ulysses': 2}} or 'cfg=2,ulysses=2', got {spec!r}")
    sizes = {}
    for name, value in spec.items():
        if name not in AXES:
            raise ConfigError(f"parallel: unknown axis {name!r}; the axes are {', '.join(AXES)}")
        try:
            size = int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"parallel: {name}={value!r} is not a whole number") from None
        if size < 1 or str(value).strip() != str(size):
            raise ConfigError(f"parallel: {name}={value!r} must be a positive whole number")
        sizes[name] = size
    plan = ParallelPlan(**sizes)
    if plan.cfg > 2:
        raise ConfigError(f"parallel: cfg={plan.cfg}, but classifier-free guidance has two branches: use cfg=1 or 2")
    return plan


def check_world(plan: ParallelPlan, world: int) -> None:
    """Refuse a plan whose product is not the number of processes."""
    if plan.world != world:
        raise ConfigError(f"parallel {plan.label} needs {plan.cfg} x {plan.ulysses} x {plan.data} = {plan.world} "
                          f"processes, but there are {world}: start {plan.world} (--nproc {plan.world}) or change "
                          "--parallel so its product is the process count")


def check_model(plan: ParallelPlan, heads: int) -> None:
    if heads % plan.ulysses:
        raise ConfigError(f"parallel ulysses={plan.ulysses}: the model's {heads} attention heads do not split evenly; "
                          f"use a ulysses size that divides {heads}")


def check_call(plan: ParallelPlan, *, guided: bool, images: int, grid: tuple[int, int], stateful_cfg: bool) -> None:
    """What one generation call must satisfy; every rank runs the same check on the same
    arguments, so all raise the same error together before the first step."""
    if plan.cfg == 2 and not guided:
        raise ConfigError("parallel cfg=2 splits the conditional and unconditional branches, but this call is not "
                          "guided (guidance_scale <= 1): use cfg=1 or a guidance scale > 1")
    if images % plan.data:
        raise ConfigError(f"parallel data={plan.data}: the call makes {images} images, which do not split evenly; "
                          f"make a multiple of {plan.data} images")
    if grid[0] % plan.ulysses:
        raise ConfigError(f"parallel ulysses={plan.ulysses}: the token grid has {grid[0]} rows, which do not split "
                          f"evenly; choose a height whose token rows are a multiple of {plan.ulysses}")
    if stateful_cfg and plan.cfg == 2:
        raise ConfigError("parallel cfg=2 puts the CFG branches on two ranks, but the plan shares attention across "
                          "them (DiTFastAttn's CFG sharing, ASC): use cfg=1 or leave CFG sharing out")
