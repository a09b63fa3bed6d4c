"""Scheduler parity builders shared by the scheduler tests: a fixed random stand-in model,
seeded noise and generators, one whole sampling loop in diffusers and in dite, and the
step-by-step comparison of two runs."""

from __future__ import annotations

import math

import torch

TOL = 1e-5
SHAPE = (2, 4, 8, 8)


class FakeModel:
    """A fixed random function of (sample, t): a near-identity channel mix (so ε-prediction
    looks like a denoiser) plus a t-dependent bias. With out_channels = 2·C the second half
    is a variance head squashed into (0, 1), valid for both "learned" variance types."""

    def __init__(self, channels: int = 4, out_channels: int = 4, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.channels = channels
        self.w = 0.8 * torch.eye(out_channels, channels) + 0.2 * torch.randn(out_channels, channels, generator=g)
        self.b = torch.randn(out_channels, generator=g)

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        # Broadcast-and-sum, not einsum/matmul: tiny BLAS calls cost ms each on a 2-core box.
        mixed = (x.unsqueeze(1) * self.w[None, :, :, None, None]).sum(2)
        y = mixed + 0.1 * self.b[:, None, None] * math.sin(float(t) / 50)
        if y.shape[1] == 2 * self.channels:
            y = torch.cat([y[:, :self.channels], torch.sigmoid(y[:, self.channels:])], dim=1)
        return y


def start_noise(shape=SHAPE, seed=123):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def run_diffusers(sched, model, x, num_steps, gens=None, **step_kwargs):
    sched.set_timesteps(num_steps)
    x = x * sched.init_noise_sigma
    samples = []
    for t in sched.timesteps:
        out = model(sched.scale_model_input(x, t), t)
        x = sched.step(out, t, x, generator=gens, **step_kwargs).prev_sample
        samples.append(x)
    return sched.timesteps, samples


def run_dite(sched, model, x, num_steps, gens=None, **start_kwargs):
    state = sched.start(num_steps, generators=gens, **start_kwargs)
    x = x * sched.init_noise_sigma(state)
    samples = []
    for i in range(state.num_steps):
        out = model(sched.scale_model_input(x, i, state), state.timesteps[i])
        x = sched.step(out, i, x, state)
        samples.append(x)
    return state.timesteps, samples


def assert_same_run(ref, ours, tol=TOL):
    (ref_t, ref_x), (our_t, our_x) = ref, ours
    assert torch.equal(ref_t.to(torch.int64), our_t), (ref_t, our_t)
    assert len(ref_x) == len(our_x)
    for i, (a, b) in enumerate(zip(ref_x, our_x)):
        assert torch.isfinite(a).all(), f"diffusers produced non-finite values at step {i}"
        diff = (a - b).abs().max().item()
        assert diff <= tol, f"step {i} (t={int(ref_t[i])}): max abs diff {diff}"
