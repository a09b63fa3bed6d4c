"""The engine's layers import downward only: checkpoints never reach pipelines or runtime,
models reach nothing of dite.engine but its errors, and `import dite.engine` stays light."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def modules_after(code: str) -> set[str]:
    """The dite modules loaded by running `code` in a fresh interpreter."""
    probe = code + "\nimport sys, json\nprint(json.dumps(sorted(m for m in sys.modules if m.startswith(('dite', 'torch._dynamo')))))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


CHECKPOINT_MODULES = ["parts", "layouts", "pipeline_files", "convert", "inspect", "inspect_parts", "destination", "recorded",
                      "safetensors_writer", "tensor_stream"]


@pytest.mark.parametrize("module", CHECKPOINT_MODULES)
def test_checkpoints_import_no_pipeline_or_runtime(module):
    loaded = modules_after(f"import dite.engine.checkpoints.{module}")
    assert f"dite.engine.checkpoints.{module}" in loaded
    bad = sorted(m for m in loaded if m.startswith(("dite.engine.pipelines", "dite.engine.runtime", "dite.accel")))
    assert not bad, f"dite.engine.checkpoints.{module} pulls in {bad}"


@pytest.mark.parametrize("module", ["dit", "mmdit", "pixart", "clip", "t5", "vae", "tokenizers", "layers",
                                    "attention", "attention_kernels", "window_attention", "plan", "denoiser"])
def test_models_import_only_engine_errors(module):
    loaded = modules_after(f"import dite.models.{module}")
    engine = sorted(m for m in loaded if m.startswith("dite.engine") and m not in ("dite.engine", "dite.engine.errors"))
    assert not engine, f"dite.models.{module} pulls in {engine}"
    assert not any(m.startswith("dite.accel") for m in loaded)


def test_import_engine_is_light():
    loaded = modules_after("import dite.engine, dite.models")
    heavy = sorted(m for m in loaded if m.startswith(("torch._dynamo", "dite.engine.runtime", "dite.engine.pipelines",
                                                      "dite.engine.loading", "dite.engine.checkpoints")))
    assert not heavy, f"import dite.engine loads {heavy}"
