"""dtype "auto": the CPU probe's decision is cached per machine and overridable; CUDA and
Ascend choices; the VAE kept in fp32 (and why: a bf16 VAE moves 8-bit pixels)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from dite.engine.cli import main
from dite.engine.errors import ConfigError
from dite.engine.loading.loader import load
from dite.engine.runtime import dtype_probe
from dite.engine.runtime.dtype_probe import CACHE_FILE, auto_dtype, cpu_dtype, probe_key


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DITE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("DITE_CPU_DTYPE", raising=False)  # conftest pins it for the other tests
    return tmp_path


def fake_probe(monkeypatch, fp32: float, bf16: float) -> list:
    calls = []

    def measure(width=dtype_probe.WIDTH):
        calls.append(width)
        return {"fp32": fp32, "bf16": bf16}

    monkeypatch.setattr(dtype_probe, "measure_cpu", measure)
    return calls


def test_probe_runs_once_and_is_cached_per_machine(cache, monkeypatch):
    calls = fake_probe(monkeypatch, fp32=1.0, bf16=0.5)
    assert cpu_dtype() == torch.bfloat16 and len(calls) == 1
    assert cpu_dtype() == torch.bfloat16 and len(calls) == 1  # from the cache
    entry = json.loads((cache / CACHE_FILE).read_text())[probe_key()]
    assert entry["dtype"] == "bf16" and entry["seconds"] == {"fp32": 1.0, "bf16": 0.5}
    assert "torch " + torch.__version__ in probe_key() and f"{torch.get_num_threads()} threads" in probe_key()
    # Another machine (another key) probes again; refresh probes again too.
    monkeypatch.setattr(dtype_probe, "probe_key", lambda width=None: "another cpu")
    fake_probe(monkeypatch, fp32=1.0, bf16=2.0)
    assert cpu_dtype() == torch.float32
    fake_probe(monkeypatch, fp32=1.0, bf16=0.95)  # 5% faster is a tie: fp32 keeps its precision
    assert cpu_dtype(refresh=True) == torch.float32


def test_probe_is_per_model_width_and_overridable(cache, monkeypatch):
    calls = fake_probe(monkeypatch, fp32=1.0, bf16=0.5)
    assert cpu_dtype(width=1150) == torch.bfloat16 and calls == [1152]  # rounded to a multiple of 32
    assert cpu_dtype(width=1152) == torch.bfloat16 and calls == [1152]  # the same key: cached
    assert cpu_dtype(width=1536) == torch.bfloat16 and calls == [1152, 1536]
    assert probe_key(1150) == probe_key(1152) != probe_key(1536) and "width 1536" in probe_key(1536)
    assert cpu_dtype(width=128) == torch.float32 and calls == [1152, 1536]  # narrow: fp32, no probe
    monkeypatch.setenv("DITE_CPU_DTYPE", "bf16")
    assert cpu_dtype(width=128) == torch.bfloat16 and calls == [1152, 1536]  # the override wins, no probe
    monkeypatch.setenv("DITE_CPU_DTYPE", "fp16")
    with pytest.raises(ConfigError, match="DITE_CPU_DTYPE='fp16': set it to fp32 or bf16"):
        cpu_dtype()


def test_load_reads_the_folder_models_width_first(cache, monkeypatch):
    from dite.engine.loading.loader import demo_folder, denoiser_width

    assert denoiser_width(demo_folder("demo-dit")) == 96  # 2 heads of 48: fp32 without a probe
    calls = fake_probe(monkeypatch, fp32=1.0, bf16=0.5)
    pipe = load("demo-dit", dtype="auto")
    assert calls == [] and next(pipe.transformer.parameters()).dtype == torch.float32
    seen = []
    monkeypatch.setattr(dtype_probe, "cpu_dtype", lambda refresh=False, width=None: seen.append(width) or torch.float32)
    load("demo-sd3", dtype="auto")
    assert seen == [128]


def test_real_probe_measures_both(cache):
    seconds = dtype_probe.measure_cpu()
    assert set(seconds) == {"fp32", "bf16"} and all(0 < s < 60 for s in seconds.values())


def test_accelerator_choices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert auto_dtype(torch.device("cuda")) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert auto_dtype(torch.device("cuda")) == torch.float16
    # torch knows "npu" only with torch_npu imported; auto_dtype reads the device's type.
    assert auto_dtype(SimpleNamespace(type="npu")) == torch.bfloat16


def test_load_auto_keeps_the_vae_in_fp32_and_dtype_overrides(cache, monkeypatch):
    monkeypatch.setenv("DITE_CPU_DTYPE", "bf16")  # as the probe decides for wide models on AMX machines
    pipe = load("demo-dit", dtype="auto")
    assert pipe.dtype == torch.bfloat16 and next(pipe.vae.parameters()).dtype == torch.float32
    pipe = load("demo-dit", dtype="fp32")
    assert pipe.dtype == torch.float32


def test_cli_dtype_flag_overrides_auto(cache, monkeypatch, tmp_path, capsys):
    calls = fake_probe(monkeypatch, fp32=1.0, bf16=0.5)
    monkeypatch.setattr(dtype_probe, "MIN_PROBED_WIDTH", 64)  # probe the 96-wide demo DiT too
    argv = ["generate", "--quiet", "--class-label", "1", "--steps", "1"]
    assert main(argv + ["-o", str(tmp_path / "auto.png")]) == 0
    assert main(argv + ["--dtype", "fp16", "-o", str(tmp_path / "fp16.png")]) == 0
    from dite.engine.outputs.writers import read_parameters

    auto, fp16 = read_parameters(tmp_path / "auto.png"), read_parameters(tmp_path / "fp16.png")
    assert (auto["dtype"], auto["vae_dtype"], auto["dtype_option"]) == ("bfloat16", "float32", "auto")
    assert (fp16["dtype"], fp16["vae_dtype"]) == ("float16", "float16") and len(calls) == 1


@torch.inference_mode()
def test_a_bf16_vae_moves_8bit_pixels():
    """Why "auto" decodes in fp32: the demo SD3 VAE in bf16 moves pixels by up to 2 of 255
    levels (the demo DiT's by 3; fp16: 1 and 2) against fp32."""
    pipe = load("demo-sd3")
    z = torch.randn(2, pipe.vae.config.latent_channels, 16, 16, generator=torch.Generator().manual_seed(0))
    levels = lambda x: ((x.float() / 2 + 0.5).clamp(0, 1) * 255).round()  # noqa: E731
    reference = levels(pipe.decode(z))
    pipe.vae.to(torch.bfloat16)
    assert (levels(pipe.decode(z)) - reference).abs().max() >= 1
