"""dtype "auto": the precision a device computes best in.

- CUDA: bf16 where the GPU supports it (Ampere and later), else fp16.
- Ascend NPU: bf16.
- CPU: fp32 or bf16, whichever runs a transformer-sized matmul faster on this machine.
  Without bf16 matrix units (AMX, AVX512-BF16) bf16 is emulated and slower than fp32 (1.6-
  2.4x on the CPU this was written on); with them it is faster. CPU flags suggest but do not
  settle it (the kernels torch picks matter too, and the elementwise work between matmuls),
  so a probe measures it once: one transformer block of a real model's width (256 tokens,
  width 1024, 16 heads: layer norm, QKV, attention, output projection, GELU MLP) in fp32 and
  in bf16, interleaved, median of 5 each (about a second on 2 cores). bf16 is chosen only
  when it is at least 10% faster (its precision is lower, so a tie goes to fp32). The result is cached in `<cache>/dite/dtype-probe.json` (see
  runtime/user_cache.py), keyed by CPU model, torch version and thread count.

The VAE decodes in fp32 under "auto" (see `AUTO_VAE_DTYPE`).
"""

from __future__ import annotations

import platform
import statistics
import time

import torch

CACHE_FILE = "dtype-probe.json"
TOKENS, WIDTH, HEADS, REPEATS, MARGIN = 256, 1024, 16, 5, 0.9
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


def probe_key() -> str:
    return f"{cpu_model()} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def _block(x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    """A pre-norm transformer block's work, the shapes of a mid-sized DiT."""
    F = torch.nn.functional
    qkv, out, up, down = weights
    h = F.layer_norm(x, (WIDTH,))
    q, k, v = F.linear(h, qkv).view(1, TOKENS, 3, HEADS, WIDTH // HEADS).permute(2, 0, 3, 1, 4)
    x = x + F.linear(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(1, TOKENS, WIDTH), out)
    return x + F.linear(F.gelu(F.linear(F.layer_norm(x, (WIDTH,)), up), approximate="tanh"), down)


@torch.inference_mode()
def measure_cpu() -> dict[str, float]:
    """Median seconds of one block in fp32 and in bf16 on this CPU (after a warm-up each)."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(3 * WIDTH, WIDTH), (WIDTH, WIDTH), (4 * WIDTH, WIDTH), (WIDTH, 4 * WIDTH)]
    weights = [torch.randn(shape, generator=generator) / WIDTH ** 0.5 for shape in shapes]
    x = torch.randn(1, TOKENS, WIDTH, generator=generator)
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


def cpu_dtype(refresh: bool = False) -> torch.dtype:
    """fp32 or bf16 for this CPU, from the cache or a probe (then cached)."""
    from dite.engine.runtime.user_cache import read_json, update_json

    key = probe_key()
    entry = None if refresh else read_json(CACHE_FILE).get(key)
    if not (isinstance(entry, dict) and entry.get("dtype") in ("fp32", "bf16")):
        seconds = measure_cpu()
        entry = {"dtype": "bf16" if seconds["bf16"] < MARGIN * seconds["fp32"] else "fp32",
                 "seconds": seconds, "probed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        update_json(CACHE_FILE, key, entry)
    return torch.bfloat16 if entry["dtype"] == "bf16" else torch.float32


def auto_dtype(device: torch.device) -> torch.dtype:
    """The denoiser's and text encoders' dtype under "auto" on `device`."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "npu":
        return torch.bfloat16
    if device.type == "cpu":
        return cpu_dtype()
    return torch.float32
