"""dtype "auto": the precision a device computes best in.

- CUDA: bf16 where the GPU supports it (Ampere and later), else fp16.
- Ascend NPU: bf16.
- CPU: fp32 or bf16, whichever runs one transformer block of the model's width faster on
  this machine. Without bf16 matrix units (AMX, AVX512-BF16) bf16 is emulated and slower than
  fp32 (1.6-2.4x on the CPU this was written on); with them it is faster for wide layers but
  not for narrow ones: on an AMX machine a 1024-wide block ran 1.5x faster in bf16 while the
  demo models (widths 64-384) ran 2x slower end to end. CPU flags suggest but do not settle
  it, so a probe measures it once per width: one pre-norm block (256 tokens, the model's
  width rounded to a multiple of 32 within [32, 4096], 64-wide heads (32 where 64 does not divide it): layer norm, QKV,
  attention, output projection, GELU MLP) in fp32 and in bf16, interleaved, median of 5 each
  (well under a second at 1024 on 2 cores). The width comes from the model's config before
  its weights are read (1024 when it is not known then: single files, hub ids). bf16 is
  chosen only when it is at least 10% faster (its precision is lower, so a tie goes to fp32).
  The result is cached in `<cache>/dtype-probe.json` (runtime/user_cache.py), keyed by CPU
  model, torch version, thread count and width. DITE_CPU_DTYPE=fp32|bf16 skips the probe.
  Models narrower than 512 get fp32 without a probe: their blocks are too small for bf16's
  matrix units to pay for the conversions and the elementwise work around them, which the
  probe's 256-token block does not show. Measured on an AMX machine, 1 thread, 8 steps, one
  image, interleaved (medians of 4): demo-sd3 (width 128) denoised in 1.22 s in fp32 and
  1.67 s in bf16, demo-dit (96) in 1.29 s and 1.28 s, while the probe's block at width 128
  ran 1.7x faster in bf16.

The VAE decodes in fp32 under "auto" (see `AUTO_VAE_DTYPE`).
"""

from __future__ import annotations

import os
import platform
import statistics
import time

import torch

CACHE_FILE = "dtype-probe.json"
TOKENS, WIDTH, HEAD_DIM, REPEATS, MARGIN = 256, 1024, 64, 5, 0.9
MIN_PROBED_WIDTH = 512  # narrower models: fp32 without a probe (see above)
OVERRIDE = "DITE_CPU_DTYPE"
# The VAE under "auto": fp32. In fp16 the SD / SD3 VAE's activations overflow (diffusers keeps
# `force_upcast` for this); in bf16 its 8-bit pixels move by up to a few levels (measured in
# tests/test_practical_dtype.py). It is a small share of the time of a generation.
AUTO_VAE_DTYPE = torch.float32


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def probe_width(width: int | None) -> int:
    """The probed width: the model's, rounded to a multiple of 32 in [32, 4096]."""
    if not width:
        return WIDTH
    return min(4096, max(32, round(width / 32) * 32))


def probe_key(width: int | None = None) -> str:
    return (f"{cpu_model()} | torch {torch.__version__} | {torch.get_num_threads()} threads"
            f" | width {probe_width(width)}")


def _block(x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    """A pre-norm transformer block's work at x's width."""
    F = torch.nn.functional
    qkv, out, up, down = weights
    width = x.shape[-1]
    head = HEAD_DIM if width % HEAD_DIM == 0 else 32
    h = F.layer_norm(x, (width,))
    q, k, v = F.linear(h, qkv).view(1, TOKENS, 3, width // head, head).permute(2, 0, 3, 1, 4)
    x = x + F.linear(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(1, TOKENS, width), out)
    return x + F.linear(F.gelu(F.linear(F.layer_norm(x, (width,)), up), approximate="tanh"), down)


@torch.inference_mode()
def measure_cpu(width: int = WIDTH) -> dict[str, float]:
    """Median seconds of one block of `width` in fp32 and in bf16 on this CPU (after a
    warm-up each)."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(3 * width, width), (width, width), (4 * width, width), (width, 4 * width)]
    weights = [torch.randn(shape, generator=generator) / width ** 0.5 for shape in shapes]
    x = torch.randn(1, TOKENS, width, generator=generator)
    inputs = {"fp32": (x, weights), "bf16": (x.bfloat16(), [w.bfloat16() for w in weights])}
    times: dict[str, list[float]] = {name: [] for name in inputs}
    for name, (h, ws) in inputs.items():
        _block(h, ws)
    for _ in range(REPEATS):
        for name, (h, ws) in inputs.items():
            start = time.perf_counter()
            _block(h, ws)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def cpu_dtype(refresh: bool = False, width: int | None = None) -> torch.dtype:
    """fp32 or bf16 for a model of `width` on this CPU: DITE_CPU_DTYPE, else the cache, else a
    probe (then cached)."""
    from dite.engine.errors import ConfigError
    from dite.engine.runtime.user_cache import read_json, update_json

    forced = os.environ.get(OVERRIDE)
    if forced:
        if forced not in ("fp32", "bf16"):
            raise ConfigError(f"{OVERRIDE}={forced!r}: set it to fp32 or bf16, or unset it to let dite measure")
        return torch.bfloat16 if forced == "bf16" else torch.float32
    if width is not None and width < MIN_PROBED_WIDTH:
        return torch.float32
    key = probe_key(width)
    entry = None if refresh else read_json(CACHE_FILE).get(key)
    if not (isinstance(entry, dict) and entry.get("dtype") in ("fp32", "bf16")):
        seconds = measure_cpu(probe_width(width))
        entry = {"dtype": "bf16" if seconds["bf16"] < MARGIN * seconds["fp32"] else "fp32",
                 "seconds": seconds, "probed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        update_json(CACHE_FILE, key, entry)
    return torch.bfloat16 if entry["dtype"] == "bf16" else torch.float32


def auto_dtype(device: torch.device, width: int | None = None) -> torch.dtype:
    """The denoiser's and text encoders' dtype under "auto" on `device` (`width`: the
    denoiser's hidden size, where known, for the CPU probe)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "npu":
        return torch.bfloat16
    if device.type == "cpu":
        return cpu_dtype(width=width)
    return torch.float32
