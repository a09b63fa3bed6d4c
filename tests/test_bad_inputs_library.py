"""Bad input to the library gets one DiteError line that names the problem, raised before any
prompt is encoded; NaN and infinity are caught where they arise (weights, given latents, a
sampling step, the VAE) and named, never returned as a black image."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from dite.engine import load
from dite.engine.errors import ConfigError, DiteError, InputError, NonFiniteError
from dite.engine.loading.hub import demo_folder
from dite.schedulers import DDIMConfig, DDIMScheduler, DDPMConfig, DDPMScheduler, FlowMatchEulerScheduler


@pytest.fixture(scope="module")
def dit():
    return load("demo-dit")


@pytest.fixture(scope="module")
def sd3():
    return load("demo-sd3")


@pytest.fixture(scope="module")
def pixart(tmp_path_factory):
    from tiny_pixart import tiny_pixart_pipeline

    _, folder = tiny_pixart_pipeline(tmp_path_factory.mktemp("pixart"))
    return load(folder)


def refuses(error, message, call):
    """`call()` raises `error` with a one-line message matching `message`."""
    with pytest.raises(error, match=message) as info:
        call()
    assert isinstance(info.value, DiteError) and "\n" not in str(info.value)
    return str(info.value)


def no_encoding(pipe, monkeypatch):
    """Fail the test if the pipeline gets as far as encoding (checks must come first)."""
    def encoded(*args, **kwargs):
        raise AssertionError("the call reached encoding before refusing its arguments")

    if pipe.family == "dit":
        monkeypatch.setattr("dite.engine.pipelines.dit.Conditioning", encoded)
    else:
        monkeypatch.setattr(pipe, "encode_prompts", encoded)


NAN, INF = float("nan"), float("inf")

DIT_BAD = [
    # class labels
    (dict(class_labels=None), "class_labels is required"),
    (dict(class_labels=[]), "class_labels is empty"),
    (dict(class_labels=[[0, 1]]), r"class_labels\[0\] is \[0, 1\] \(list\)"),
    (dict(class_labels=[1.0]), r"class_labels\[0\] is 1\.0 \(float\)"),
    (dict(class_labels=[0, True]), r"class_labels\[1\] is True \(bool\)"),
    (dict(class_labels=[1000]), r"class label 1000 is out of range.*0\.\.999"),
    (dict(class_labels=[-1]), r"class label -1 is out of range"),
    (dict(class_labels=["unicorn"]), "unknown class name 'unicorn'"),
    (dict(class_labels=torch.zeros(2, 2, dtype=torch.long)), "class_labels must be one label or a list"),
    (dict(class_labels=torch.tensor([0.5])), r"class_labels\[0\] is 0\.5 \(float\)"),
    (dict(class_labels={"a": 1}), r"class_labels\[0\] is \{'a': 1\} \(dict\)"),
    # steps
    (dict(num_inference_steps=0), "num_inference_steps must be a positive integer, got 0"),
    (dict(num_inference_steps=-1), "num_inference_steps must be a positive integer, got -1"),
    (dict(num_inference_steps=1.5), r"num_inference_steps must be a positive integer, got 1\.5 \(float\)"),
    (dict(num_inference_steps="10"), r"num_inference_steps must be a positive integer, got '10' \(str\)"),
    (dict(num_inference_steps=True), r"num_inference_steps must be a positive integer, got True \(bool\)"),
    (dict(num_inference_steps=10**6), "num_inference_steps must be at most 10000"),
    (dict(num_inference_steps=2000), "num_inference_steps 2000 is more than the 1000 timesteps"),
    # guidance
    (dict(guidance_scale="7"), r"guidance_scale must be a real number, got '7' \(str\)"),
    (dict(guidance_scale=NAN), "guidance_scale must be a finite number, got nan"),
    (dict(guidance_scale=INF), "guidance_scale must be a finite number, got inf"),
    (dict(guidance_scale=-2.0), r"guidance_scale must be >= 1 \(1 turns classifier-free guidance off\), got -2\.0"),
    (dict(guidance_scale=0.5), r"guidance_scale must be >= 1.*got 0\.5"),
    (dict(guidance_scale=0), r"guidance_scale must be >= 1.*got 0"),
    (dict(guidance_scale=True), r"guidance_scale must be a real number, got True \(bool\)"),
    (dict(guidance_scale=[4.0]), r"guidance_scale must be a real number, got \[4\.0\] \(list\)"),
    # seeds: image k uses seed + k, which must fit a 64-bit generator seed
    (dict(seed=-1), r"seed must be a non-negative integer or None.*got -1"),
    (dict(seed=1.5), r"seed must be a non-negative integer.*got 1\.5 \(float\)"),
    (dict(seed="0"), r"seed must be a non-negative integer.*got '0' \(str\)"),
    (dict(seed=2**64), "seed 18446744073709551616 is too large for 1 image"),
    (dict(class_labels=[0, 1, 2], seed=2**64 - 2), r"seed 18446744073709551614 is too large for 3 image\(s\).*at most 18446744073709551613"),
    # sizes: the demo DiT's factor is VAE 4 x patch 2
    (dict(height=64.0), r"height must be a positive integer, got 64\.0 \(float\)"),
    (dict(width=True), r"width must be a positive integer, got True \(bool\)"),
    (dict(height=60), "height 60 must be a positive multiple of 8"),
    (dict(height=0), "height must be a positive integer, got 0"),
    (dict(width=-8), "width must be a positive integer, got -8"),
    # output, accel, flags
    (dict(output_type="jpg"), r"output_type must be one of pil, np, pt, latent, got 'jpg'"),
    (dict(output_type=None), r"output_type must be one of .*got None"),
    (dict(accel=5), r"accel must be None, a spec string.*got 5 \(int\)"),
    (dict(accel=[5]), r"accel\[0\] is 5 \(int\)"),
    (dict(accel="warp-speed"), "unknown accel method 'warp-speed'"),
    (dict(progress="yes"), r"progress must be True or False, got 'yes'"),
    (dict(plan_hook=5), r"plan_hook must be a function or None, got 5"),
    # latents (the demo DiT: 4 channels, 16 x 16 latent pixels)
    (dict(latents=torch.zeros(1, 4, 8, 8)), r"latents have shape \(1, 4, 8, 8\), expected \(1, 4, 16, 16\)"),
    (dict(latents=torch.zeros(1, 4, 16, 16, dtype=torch.long)), "latents must be a floating-point tensor, got dtype torch.int64"),
    (dict(latents=torch.zeros(1, 4, 16, 16, device="meta")), "latents are on the meta device"),
    (dict(latents=np.zeros((1, 4, 16, 16), np.float32)), r"latents must be a torch.Tensor, got array\(.*\(ndarray\)"),
]


@pytest.mark.parametrize("kwargs, message", DIT_BAD)
def test_dit_call_refuses(dit, monkeypatch, kwargs, message):
    no_encoding(dit, monkeypatch)
    args = dict(class_labels=[3], num_inference_steps=2, output_type="latent", progress=False)
    args.update(kwargs)
    refuses(InputError if "warp" not in message else ConfigError, message, lambda: dit(**args))


SD3_BAD = [
    (dict(prompt=None), "prompt is required"),
    (dict(prompt=[1, 2]), r"prompt\[0\] is 1 \(int\)"),
    (dict(prompt=[]), "prompt must be a string or a non-empty list of strings, got an empty list"),
    (dict(prompt=[["a cat"]]), r"prompt\[0\] is \['a cat'\] \(list\)"),
    (dict(prompt=("a cat", None)), r"prompt\[1\] is None"),
    (dict(prompt=b"a cat"), r"prompt must be a string or a non-empty list of strings, got b'a cat' \(bytes\)"),
    (dict(negative_prompt=3), r"negative_prompt must be a string or a non-empty list of strings, got 3 \(int\)"),
    (dict(negative_prompt=["a", "b"]), "2 negative prompts for 1 prompts"),
    (dict(negative_prompt=["a", "b"], guidance_scale=1.0), "2 negative prompts for 1 prompts"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt must be a positive integer, got 0"),
    (dict(num_images_per_prompt=2.0), r"num_images_per_prompt must be a positive integer, got 2\.0"),
    (dict(num_images_per_prompt=10**9), "num_images_per_prompt must be at most 4096"),
    (dict(prompt=["a"] * 3000, num_images_per_prompt=2), r"6000 images in one call; at most 4096"),
    (dict(max_sequence_length=0), "max_sequence_length must be a positive integer, got 0"),
    (dict(max_sequence_length=600), "max_sequence_length must be at most 512"),
    (dict(max_sequence_length="16"), r"max_sequence_length must be a positive integer, got '16'"),
    # the demo SD3's position table is 8 x 8 patches of 16 pixels
    (dict(height=256), r"height 256 is beyond the model's position table .*at most 128 pixels"),
    (dict(width=72), "width 72 must be a positive multiple of 16"),
    (dict(latents=torch.full((1, 16, 8, 8), NAN)), None),
    (dict(latents=torch.full((1, 16, 8, 8), INF)), None),
]


@pytest.mark.parametrize("kwargs, message", SD3_BAD)
def test_sd3_call_refuses(sd3, monkeypatch, kwargs, message):
    no_encoding(sd3, monkeypatch)
    args = dict(prompt="a cat", num_inference_steps=2, output_type="latent", progress=False)
    args.update(kwargs)
    if message is None:  # non-finite latents
        channels = sd3.transformer.config.in_channels
        args["latents"] = args["latents"][:, :channels]
        refuses(NonFiniteError, r"latents contains \d+ NaN and \d+ infinite of \d+ values", lambda: sd3(**args))
    else:
        refuses(InputError, message, lambda: sd3(**args))


PIXART_BAD = [
    (dict(prompt=None), "prompt is required"),
    (dict(use_resolution_binning="yes"), r"use_resolution_binning must be True or False, got 'yes'"),
    (dict(width=0), "width must be a positive integer, got 0"),
    (dict(height=18, use_resolution_binning=False), "height 18 must be a positive multiple of 4"),
    (dict(max_sequence_length=1000), "max_sequence_length must be at most 512"),
    (dict(guidance_scale=NAN), "guidance_scale must be a finite number"),
    (dict(seed=-5), "seed must be a non-negative integer"),
]


@pytest.mark.parametrize("kwargs, message", PIXART_BAD)
def test_pixart_call_refuses(pixart, monkeypatch, kwargs, message):
    no_encoding(pixart, monkeypatch)
    args = dict(prompt="a cat", num_inference_steps=2, output_type="latent", progress=False)
    args.update(kwargs)
    refuses(InputError, message, lambda: pixart(**args))


def test_numpy_and_tensor_integers_are_integers(dit):
    out = dit(class_labels=np.array([3]), num_inference_steps=np.int64(1), seed=np.uint64(4), height=np.int32(32),
              width=torch.tensor(32), output_type="latent", progress=False)
    assert out.latents.shape == (1, 4, 8, 8) and out.parameters[0]["seed"] == 4


# --- schedulers that do not fit the model's training objective --------------------------------

def test_load_refuses_a_scheduler_of_another_objective():
    assert "use one of: flow_euler" in refuses(
        ConfigError, "scheduler 'ddim' samples models trained on diffusion noise.*this sd3 model predicts a flow",
        lambda: load("demo-sd3", scheduler="ddim"))
    assert "use one of: ddim, ddpm, dpm" in refuses(
        ConfigError, "scheduler 'flow_euler' samples models trained on a flow-matching velocity",
        lambda: load("demo-dit", scheduler="euler"))
    refuses(ConfigError, r"scheduler must be a dite scheduler object \(a name goes through .*got 5 \(int\)",
            lambda: load("demo-dit", scheduler=5))


def test_load_by_name_keeps_the_model_noise_schedule():
    # demo-dit trains on squaredcos betas: a scheduler named at load takes them over
    pipe = load("demo-dit", scheduler="ddpm")
    assert pipe.scheduler.name == "ddpm" and pipe.scheduler.config.beta_schedule == "squaredcos_cap_v2"


@pytest.mark.parametrize("family, scheduler, message", [
    ("sd3", DDIMScheduler(), r"scheduler 'ddim' samples .*use one of: flow_euler"),
    ("dit", FlowMatchEulerScheduler(), r"scheduler 'flow_euler' samples .*use one of: ddim, ddpm, dpm"),
    ("dit", DDIMScheduler(DDIMConfig(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")),
     r"scheduler 'ddim' has prediction_type='v_prediction' but this model predicts 'epsilon'"),
    ("dit", DDIMScheduler(), r"scheduler 'ddim' has another noise schedule \(beta_schedule='linear'.*'squaredcos_cap_v2'"),
    ("pixart", DDPMScheduler(DDPMConfig(beta_schedule="linear", variance_type="learned_range")),
     r"scheduler 'ddpm' \(variance_type='learned_range'\) needs the model's learned variance"),
    ("dit", "ddim", r"scheduler must be a dite scheduler object .*got 'ddim' \(str\); for this model: ddim, ddpm, dpm"),
])
def test_call_refuses_an_assigned_scheduler_that_does_not_fit(request, monkeypatch, family, scheduler, message):
    pipe = request.getfixturevalue(family)
    monkeypatch.setattr(pipe, "scheduler", scheduler)
    no_encoding(pipe, monkeypatch)
    first = dict(class_labels=[3]) if family == "dit" else dict(prompt="a cat")
    refuses(ConfigError, message, lambda: pipe(**first, num_inference_steps=2, output_type="latent", progress=False))


# --- NaN and infinity ---------------------------------------------------------------------------

def poisoned_demo(tmp_path, component: str, key: str, value: float) -> tuple:
    folder = tmp_path / "demo-dit"
    shutil.copytree(demo_folder("demo-dit"), folder)
    file = folder / component / "diffusion_pytorch_model.safetensors"
    state = load_file(file)
    state[key] = state[key].float()  # the demo stores float16; float32 holds the 1e6 of the overflow test
    state[key].view(-1)[3] = value
    save_file(state, file)
    return folder, file


@pytest.mark.parametrize("component, key, value", [
    ("transformer", "transformer_blocks.2.attn1.to_q.weight", NAN),
    ("vae", "decoder.conv_in.weight", -INF),
])
def test_non_finite_weight_names_tensor_and_file(tmp_path, component, key, value):
    folder, file = poisoned_demo(tmp_path, component, key, value)
    message = refuses(NonFiniteError, f"tensor '{key}' in .*{component}.*holds {int(math.isnan(value))} NaN and "
                      f"{int(math.isinf(value))} infinite of", lambda: load(folder))
    assert str(file) in message and "download or convert it again" in message


def test_weight_that_overflows_float16_says_which_dtype_to_use(tmp_path):
    folder, _ = poisoned_demo(tmp_path, "transformer", "proj_out_2.weight", 1e6)
    load(folder)  # finite in float32
    refuses(NonFiniteError, r"tensor 'proj_out_2.weight' in .* has values up to 1e\+06, beyond what torch.float16 "
            r"holds.*dtype='bf16' or 'fp32'", lambda: load(folder, dtype="fp16"))


def test_nan_from_the_transformer_names_the_step(dit, monkeypatch):
    finalize, calls = dit.transformer.finalize, []

    def nan_at_step_2(hidden):
        out = finalize(hidden)
        calls.append(1)
        return out * NAN if len(calls) == 3 else out

    monkeypatch.setattr(dit.transformer, "finalize", nan_at_step_2)
    refuses(NonFiniteError, r"the transformer's prediction \(after guidance\) at step 2 \(steps 0\.\.3\)",
            lambda: dit(class_labels=[3], num_inference_steps=4, output_type="pil", progress=False))


def test_inf_from_the_scheduler_step_names_the_step(sd3, monkeypatch):
    step = sd3.scheduler.step

    def inf_at_step_1(out, i, x, state):
        x = step(out, i, x, state)
        return x + INF if i == 1 else x

    monkeypatch.setattr(sd3.scheduler, "step", inf_at_step_1)
    refuses(NonFiniteError, r"the scheduler step at step 1 \(steps 0\.\.2\), from a finite prediction",
            lambda: sd3(prompt="a cat", num_inference_steps=3, output_type="latent", progress=False))


def test_nan_from_the_vae_is_not_a_black_image(dit, monkeypatch):
    monkeypatch.setattr(dit.vae, "decode", lambda z: torch.full((z.shape[0], 3, 64, 64), NAN))
    refuses(NonFiniteError, r"the VAE's decoded images contains 12288 NaN and 0 infinite of 12288 values",
            lambda: dit(class_labels=[3], num_inference_steps=1, output_type="np", progress=False))


def test_float16_sampling_failure_suggests_another_dtype():
    from dite.engine.runtime.finite import StepWatch

    watch = StepWatch(2, "cpu")
    ok = torch.zeros(1, 4, dtype=torch.float16)
    watch.step(0, ok, ok)
    watch.step(1, ok + INF, ok)
    with pytest.raises(NonFiniteError, match=r"step 1 .*float16 overflow .*--dtype bf16 / --dtype fp32"):
        watch.check()


@pytest.mark.parametrize("threshold", [NAN, INF, "0.1"])
def test_calibrate_refuses_a_non_finite_threshold(dit, tmp_path, threshold):
    from dite.engine.runtime.calibrate import calibrate

    refuses(ConfigError, "threshold must be a", lambda: calibrate(dit, tmp_path / "plan.json", steps=2,
                                                                 threshold=threshold, window=2, progress=False))
    assert not (tmp_path / "plan.json").exists()
