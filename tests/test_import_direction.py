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


CHECKPOINT_MODULES = ["parts", "recognise", "layouts", "pipeline_files", "convert", "inspect", "inspect_parts", "destination", "recorded",
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


def test_loader_and_cli_import_no_executor_or_dynamo():
    """The executors load when a pipeline is built or a loop runs, not with dite."""
    loaded = modules_after("import dite.engine.cli, dite.engine.loading.loader, dite.engine.runtime.sampling")
    heavy = sorted(m for m in loaded if m.startswith("torch._dynamo") or "executors" in m)
    assert not heavy, f"importing the loader loads {heavy}"


def test_cli_help_imports_no_torch():
    code = ("import runpy, sys\nsys.argv = ['dite', '--help']\n"
            "try:\n    runpy.run_module('dite.engine.cli', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'dite --help imported torch'")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_key_maps_import_no_dynamo():
    """Key maps build each model on the meta device; an embedding's normal_ init there would
    import torch._dynamo (seconds) for values nobody reads."""
    loaded = modules_after("from dite.models.clip import CLIPTextConfig, clip_keymap\n"
                           "from dite.models.t5 import T5Config, t5_keymap\n"
                           "from dite.models import dit\n"
                           "clip_keymap(CLIPTextConfig.clip_l(), 'transformers', [])\n"
                           "t5_keymap(T5Config.t5_xxl(), [])\n"
                           "dit.keymap(dit.DiTConfig(), 'diffusers')")
    assert not [m for m in loaded if m.startswith("torch._dynamo")]
