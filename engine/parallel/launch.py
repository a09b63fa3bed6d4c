"""`dite generate --nproc N --parallel cfg=2,ulysses=2`: the plan is checked against N
before any process starts; N local ranks then each load the model and make the call, and
rank 0 writes the images. Under torchrun (`--parallel` without `--nproc`), this process is
one rank of the existing group."""

from __future__ import annotations

import os

from dite.engine.errors import InputError
from dite.engine.parallel.plan import check_world, parse_plan


def generate_in_ranks(args, generate) -> int:
    """Run `generate(args)` (the CLI's cmd_generate) on every rank of the plan."""
    if args.parallel is None:
        raise InputError(f"--nproc {args.nproc} needs --parallel to say how the work splits, e.g. "
                         f"--parallel cfg=2 or data={args.nproc}")
    plan = parse_plan(args.parallel)
    if args.nproc is None:
        if "WORLD_SIZE" not in os.environ:
            raise InputError(f"--parallel {args.parallel} needs --nproc {plan.world} (local processes) or torchrun")
        check_world(plan, int(os.environ["WORLD_SIZE"]))
        args.parallel_rank = int(os.environ.get("RANK", "0"))
        return generate(args)
    check_world(plan, args.nproc)
    from dite.engine.parallel.group import spawn

    spawn(_rank_main, args.nproc, args, generate)
    return 0


def _rank_main(rank: int, args, generate) -> int:
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads() // args.nproc))
    args.nproc, args.parallel_rank = None, rank
    return generate(args)
