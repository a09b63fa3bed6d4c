"""Builders shared by the runtime tests (acceleration, executors, attention kernels, adaptive
caching): randomised tiny denoisers, their conditioning, plans from a spec, one sampling run
(and one under inference mode through a given executor), the graphs a set of plans needs, and
a hook that counts the rows each block ran."""

from __future__ import annotations

import torch

from dite.accel import PlanContext, as_methods, build_plans, resolve
from dite.engine.runtime.sampling import GenerationState, denoise
from dite.models.denoiser import Conditioning
from dite.schedulers import by_name


def randomized(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        for name, b in module.named_buffers():
            if name == "pos_embed" and b.numel():
                b.copy_(torch.randn(b.shape, generator=g) * 0.2)
    return module.eval()


def sd3_cond(batch=1, guided=True):
    g = torch.Generator().manual_seed(3)
    rows = 2 * batch if guided else batch
    return Conditioning(context=torch.randn(rows, 5, 8, generator=g), pooled=torch.randn(rows, 6, generator=g),
                        cfg_row_order="uncond_first" if guided else "none")


def dit_cond(labels=(3,)):
    return Conditioning(class_labels=torch.tensor(list(labels) + [10] * len(labels)), cfg_row_order="cond_first")


def sample(model, cond, plans, steps, scheduler="flow_euler", latent=(4, 6, 4), batch=1, seed=0):
    sched = by_name(scheduler)
    state = GenerationState(scheduler=sched.start(steps))
    x = torch.randn(batch, *latent, generator=torch.Generator().manual_seed(seed))
    out = denoise(model, sched, x, cond, state, guidance_scale=5.0, prediction_channels=4, plans=plans, progress=False)
    return out, state


def generate(model, cond, plans, steps, executor=None, hook=None, latent=(4, 6, 4), scheduler="flow_euler"):
    sched = by_name(scheduler)
    state = GenerationState(scheduler=sched.start(steps))
    x = torch.randn(1, *latent, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        out = denoise(model, sched, x, cond, state, guidance_scale=5.0, prediction_channels=4, plans=plans,
                      progress=False, executor=executor, plan_hook=hook)
    return out, state


def plans_for(spec, model, steps, guided=True):
    ctx = PlanContext(model.family, len(model.blocks), steps, guided)
    return build_plans(resolve(as_methods(spec), ctx), ctx)


def planned_graphs(model, plans, guided=True):
    """The graphs the plans need, counted here independently: per batch layout one prepare,
    one finalize and one graph per distinct (segment, its blocks' plans)."""
    total = 0
    for gated in ([False, True] if guided and any(p.cfg_mode == "cond_only" for p in plans) else [False]):
        layout = [p for p in plans if (p.cfg_mode == "cond_only") == gated]
        segments = {(s, tuple(p.block(i) for i in range(s[0], s[1])) if s[2] != "apply" else ())
                    for p in layout for s in p.segments(len(model.blocks))}
        total += 2 + len(segments)
    return total


class RowCounter:
    """Forward pre-hooks on every block: how many rows each block ran, in total."""

    def __init__(self, model):
        self.rows = 0
        self.handles = [b.register_forward_pre_hook(self.hook) for b in model.blocks]

    def hook(self, module, args):
        self.rows += args[0].image.shape[0]

    def close(self):
        for h in self.handles:
            h.remove()
