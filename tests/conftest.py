import sys
from pathlib import Path

import pytest

# tests/tiny*.py hold the reference-model factories shared by the test files.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def sd3(tmp_path_factory):
    """The tiny SD3 pipeline of tests/tiny_sd3.py, saved in diffusers' layout: (reference, folder).
    Shared by the SD3 test files (building it trains two tokenizers)."""
    from tiny_sd3 import tiny_sd3_pipeline

    return tiny_sd3_pipeline(tmp_path_factory.mktemp("sd3"))


@pytest.fixture(scope="module")
def dit():
    """A randomised tiny DiT (4 blocks, 10 classes, 8x8 latents) with its computed buffers, for
    the runtime tests (executors, attention kernels, Ascend); test files that need another DiT
    define their own `dit`."""
    import torch

    from dite.models.dit import DiT, DiTConfig
    from tiny_runtime import randomized

    model = randomized(DiT(DiTConfig(hidden_size=16, depth=4, num_heads=2, num_classes=10, input_size=8)), seed=1)
    model.init_computed_buffers(torch.device("cpu"))
    return model


@pytest.fixture(scope="session", autouse=True)
def dite_cache(tmp_path_factory):
    """dite's per-machine cache (engine/runtime/user_cache.py: the dtype probe, model hashes,
    counted FLOPs) in a temporary folder, not the user's ~/.cache, and the CPU dtype of "auto"
    set to fp32 (DITE_CPU_DTYPE): `generate`'s default dtype then gives the same fp32 results
    on every machine (with bf16 matrix units the probe may choose bf16). The probe itself is
    tested in test_practical_dtype.py with the variable removed."""
    import os

    folder = tmp_path_factory.mktemp("dite-cache")
    saved = {name: os.environ.get(name) for name in ("DITE_CACHE_DIR", "DITE_CPU_DTYPE")}
    os.environ.update({"DITE_CACHE_DIR": str(folder), "DITE_CPU_DTYPE": "fp32"})
    yield folder
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
