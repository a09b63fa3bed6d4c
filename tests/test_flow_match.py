"""Flow-matching Euler parity with diffusers' FlowMatchEulerDiscreteScheduler: whole
schedules (timesteps, sigmas) and every intermediate sample, fp32, bit-identical."""

from __future__ import annotations

import json

import pytest
import torch

import diffusers
from dite.engine.errors import ConfigError, InputError
from dite.schedulers import (ALIASES, SCHEDULERS, FlowMatchEulerConfig, FlowMatchEulerScheduler, by_name,
                             load_scheduler)
from dite.schedulers.flow_match import calculate_shift
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift as ref_shift

SHAPE = (2, 4, 8, 8)


def velocity(x: torch.Tensor, t) -> torch.Tensor:
    """A fixed function of (x, t) standing in for the model."""
    return 0.9 * x.flip(1) + 0.1 * torch.cos(torch.as_tensor(t, dtype=torch.float32) / 100)


def noise(shape=SHAPE, seed=5):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def run_diffusers(sched, n, x, gens=None, **set_kwargs):
    sched.set_timesteps(n, **set_kwargs)
    xs = []
    for t in sched.timesteps:
        x = sched.step(velocity(x, t), t, x, generator=gens).prev_sample
        xs.append(x)
    return sched.timesteps, sched.sigmas, xs


def run_dite(sched, n, x, gens=None, **start_kwargs):
    state = sched.start(n, generators=gens, **start_kwargs)
    x = x * sched.init_noise_sigma(state)
    xs = []
    for i in range(state.num_steps):
        x = sched.step(velocity(sched.scale_model_input(x, i, state), state.timesteps[i]), i, x, state)
        xs.append(x)
    return state.timesteps, state.sigmas, xs


def check(config: dict, n: int, ref_kwargs=None, gens=None, **start_kwargs):
    ref = run_diffusers(diffusers.FlowMatchEulerDiscreteScheduler(**config), n, noise(),
                        gens() if gens else None, **(ref_kwargs or {}))
    ours = run_dite(FlowMatchEulerScheduler(FlowMatchEulerConfig(**config)), n, noise(),
                    gens() if gens else None, **start_kwargs)
    assert torch.equal(ref[0], ours[0]), (ref[0], ours[0])
    assert ours[0].dtype == torch.float32
    assert torch.equal(ref[1], ours[1]), (ref[1], ours[1])
    for i, (a, b) in enumerate(zip(ref[2], ours[2], strict=True)):
        assert torch.equal(a, b), f"step {i}: max abs diff {(a - b).abs().max().item()}"


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("n", [1, 4, 28, 50])
def test_static_shift(shift, n):
    check(dict(shift=shift), n)


def test_sd3_schedule_values():
    # docs/checkpoints.md §1.7: shift applied twice; last non-zero σ = shift(shift(0.001)) for s = 3.
    state = FlowMatchEulerScheduler(FlowMatchEulerConfig(shift=3.0)).start(28)
    once = 3 * 0.001 / (1 + 2 * 0.001)
    assert state.sigmas[-1] == 0 and state.sigmas[0] == 1
    assert state.sigmas[-2].item() == pytest.approx(3 * once / (1 + 2 * once), rel=1e-6)
    assert torch.equal(state.timesteps, state.sigmas[:-1] * 1000)


@pytest.mark.parametrize("kind", ["exponential", "linear"])
@pytest.mark.parametrize("mu", [0.5, 1.15, 2.3])
def test_dynamic_shift_mu(kind, mu):
    config = dict(use_dynamic_shifting=True, time_shift_type=kind)
    check(config, 20, ref_kwargs=dict(mu=mu), mu=mu)


@pytest.mark.parametrize("seq_len", [256, 1024, 4096, 9000])
def test_dynamic_shift_from_image_seq_len(seq_len):
    config = dict(use_dynamic_shifting=True, base_shift=0.6, max_shift=1.3, base_image_seq_len=128,
                  max_image_seq_len=8192, shift=3.0)
    mu = ref_shift(seq_len, 128, 8192, 0.6, 1.3)
    assert calculate_shift(seq_len, 128, 8192, 0.6, 1.3) == mu
    check(config, 12, ref_kwargs=dict(mu=mu), image_seq_len=seq_len)


@pytest.mark.parametrize("config", [
    dict(shift=3.0, shift_terminal=0.1),
    dict(use_dynamic_shifting=True, shift_terminal=0.02),
    dict(shift=3.0, invert_sigmas=True),
    dict(shift=3.0, use_karras_sigmas=True),
    dict(shift=2.0, use_exponential_sigmas=True),
    dict(shift=3.0, num_train_timesteps=500),
], ids=["terminal", "dynamic_terminal", "invert", "karras", "exponential", "T500"])
def test_options(config):
    kw = dict(mu=0.8) if config.get("use_dynamic_shifting") else {}
    check(config, 15, ref_kwargs=kw, **kw)


def test_custom_sigmas():
    sigmas = [1.0, 0.8, 0.55, 0.3, 0.1]
    check(dict(shift=3.0), None, ref_kwargs=dict(sigmas=sigmas), sigmas=sigmas)


@pytest.mark.parametrize("seeds", [(3, 4), (9,)])
def test_stochastic_sampling(seeds):
    gens = lambda: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    ref = run_diffusers(diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=True), 10,
                        noise((len(seeds),) + SHAPE[1:]), gens())
    ours = run_dite(FlowMatchEulerScheduler(FlowMatchEulerConfig(shift=3.0, stochastic_sampling=True)), 10,
                    noise((len(seeds),) + SHAPE[1:]), gens())
    for a, b in zip(ref[2], ours[2], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("stochastic", [False, True])
def test_half_precision(dtype, stochastic):
    # diffusers steps in fp32 but multiplies the half-precision output by σ rounded to its dtype.
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=stochastic)
    ref.set_timesteps(8)
    ours = FlowMatchEulerScheduler(FlowMatchEulerConfig(shift=3.0, stochastic_sampling=stochastic))
    state = ours.start(8, generators=[torch.Generator().manual_seed(s) for s in (1, 2)])
    x = noise().to(dtype)
    v = velocity(x.float(), 0).to(dtype)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    for i in (0, 5):
        ref._step_index = i
        expected = ref.step(v, ref.timesteps[i], x, generator=gens).prev_sample
        got = ours.step(v, i, x, state)
        assert got.dtype == dtype and torch.equal(expected, got)


def test_saved_config_round_trip(tmp_path):
    # SD3.5's scheduler_config.json, as newer diffusers saves it.
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, base_shift=0.5, max_shift=1.15,
                                                    base_image_seq_len=256, max_image_seq_len=4096)
    ref.save_config(tmp_path)
    ours = load_scheduler(tmp_path)
    assert type(ours) is SCHEDULERS["FlowMatchEulerDiscreteScheduler"] is FlowMatchEulerScheduler
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    exported = ours.to_diffusers_config()
    assert exported["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert public(exported) == public(saved)
    back = diffusers.FlowMatchEulerDiscreteScheduler.from_config(exported)
    assert public(back.config) == public(ref.config)
    x = noise()
    a, b = run_diffusers(ref, 28, x), run_dite(ours, 28, x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2][-1], b[2][-1])


def test_sd3_medium_verbatim_config(tmp_path):
    # The hub file of SD3-medium: only the two keys, the rest defaults.
    (tmp_path / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.29.0.dev0",
         "num_train_timesteps": 1000, "shift": 3.0}))
    assert load_scheduler(tmp_path).config == FlowMatchEulerConfig(shift=3.0)


def test_by_name():
    assert ALIASES["euler"] == "flow_euler"
    sd3 = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0, "num_train_timesteps": 1000}
    for name in ("flow_euler", "euler"):
        sched = by_name(name, sd3)
        assert isinstance(sched, FlowMatchEulerScheduler) and sched.config == FlowMatchEulerConfig(shift=3.0)
    assert by_name("euler", sd3, shift=1.0).config.shift == 1.0
    with pytest.raises(ConfigError, match="no option beta_schedule"):
        by_name("flow_euler", beta_schedule="linear")


def test_shared_scheduler_interleaved():
    sched = FlowMatchEulerScheduler(FlowMatchEulerConfig(use_dynamic_shifting=True))
    alone = [run_dite(sched, n, noise(seed=s), mu=mu)[2][-1] for n, s, mu in [(6, 1, 0.5), (9, 2, 1.1)]]
    states = [sched.start(6, mu=0.5), sched.start(9, mu=1.1)]
    xs = [noise(seed=1), noise(seed=2)]
    for i in range(9):
        for k, st in enumerate(states):
            if i < st.num_steps:
                xs[k] = sched.step(velocity(xs[k], st.timesteps[i]), i, xs[k], st)
    assert all(torch.equal(a, b) for a, b in zip(alone, xs))


@pytest.mark.parametrize("config,match", [
    (dict(use_beta_sigmas=True), "use_beta_sigmas"),
    (dict(use_karras_sigmas=True, use_exponential_sigmas=True), "only one"),
    (dict(time_shift_type="cubic"), "time_shift_type"),
    (dict(shift=0.0), "shift"),
])
def test_bad_config(config, match):
    with pytest.raises(ConfigError, match=match):
        FlowMatchEulerScheduler.from_diffusers_config({"_class_name": "FlowMatchEulerDiscreteScheduler", **config})


def test_dynamic_needs_mu():
    sched = FlowMatchEulerScheduler(FlowMatchEulerConfig(use_dynamic_shifting=True))
    assert sched.needs_image_seq_len and not FlowMatchEulerScheduler().needs_image_seq_len
    with pytest.raises(InputError, match="mu or image_seq_len"):
        sched.start(10)
    with pytest.raises(InputError, match="num_steps"):
        sched.start(0, mu=1.0)
