"""Ascend without an NPU: torch_npu is never imported unless asked for; asking for it
without it gives one clear error; the npu-graph executor builds torchair's config as
specified (a stand-in torchair records the calls)."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest
import torch

from dite.engine.runtime.executors import make_executor
from dite.engine.loading.loader import parse_device
from dite.engine.runtime.npu_env import BackendUnavailableError, npu_available
from dite.engine.errors import ConfigError

HINTS = ("set_env.sh", "TORCH_DEVICE_BACKEND_AUTOLOAD=0", "needs torch X.Y.Z exactly", torch.__version__)


def test_importing_dite_never_imports_torch_npu():
    code = ("import sys, dite.engine, dite.engine.cli, dite.engine.runtime.executors, dite.models.attention, dite.accel; "
            "from dite.engine.runtime.executors import make_executor; make_executor('eager'); "
            "assert 'torch_npu' not in sys.modules and 'torchair' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.skipif(__import__("importlib").util.find_spec("torch_npu") is not None, reason="torch_npu installed")
def test_npu_without_torch_npu_is_one_clear_error():
    with pytest.raises(BackendUnavailableError, match="torch_npu is not installed") as err:
        parse_device("npu")
    assert all(h in str(err.value) for h in HINTS)
    with pytest.raises(BackendUnavailableError, match="torch_npu is not installed"):
        make_executor("npu-graph")
    assert not npu_available()
    assert parse_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("failure", ["ImportError('libhccl.so: cannot open shared object file')",
                                     "RuntimeError('Failed to load the backend extension: torch_npu')"])
def test_broken_torch_npu_is_the_same_error(tmp_path, monkeypatch, failure):
    (tmp_path / "torch_npu").mkdir()
    (tmp_path / "torch_npu" / "__init__.py").write_text(f"raise {failure}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(BackendUnavailableError, match="cannot be imported") as err:
        parse_device("npu")
    assert failure.split("(")[1].strip("')") in str(err.value) and "set_env.sh" in str(err.value)
    assert "torch_npu" not in sys.modules


def fake_torchair(calls):
    class Experimental:
        frozen_parameter = False
        tiling_schedule_optimize = False

    class CompilerConfig:
        def __init__(self):
            self.mode = None
            self.experimental_config = Experimental()

    def get_npu_backend(*, compiler_config=None, custom_decompositions=None):
        calls.append(compiler_config)

        def npu_backend(gm, example_inputs):
            return gm.forward

        return npu_backend

    return types.SimpleNamespace(CompilerConfig=CompilerConfig, get_npu_backend=get_npu_backend)


def test_npu_graph_executor_builds_the_torchair_config(monkeypatch, dit):
    calls = []
    monkeypatch.setitem(sys.modules, "torch_npu", types.SimpleNamespace())
    monkeypatch.setitem(sys.modules, "torchair", fake_torchair(calls))
    ge = make_executor("npu-graph", attention="npu")
    (config,) = calls
    assert config.mode == "max-autotune"
    assert config.experimental_config.frozen_parameter and config.experimental_config.tiling_schedule_optimize
    assert ge.backend.__name__ == "npu_backend" and ge.mode is None and ge.options is None
    acl = make_executor("npu-graph", route="aclgraph")
    assert acl.backend == "npugraph_ex" and acl.options["frozen_parameter"] and acl.overwrites_outputs
    with pytest.raises(ConfigError, match="device='npu'"):
        ge.begin(dit, [], lambda: [])
    with pytest.raises(ConfigError, match="unknown npu-graph route"):
        make_executor("npu-graph", route="jit")
    with pytest.raises(ConfigError, match="executor 'npu-graph'"):
        make_executor("npu-graph", backend="inductor")
    with pytest.raises(BackendUnavailableError, match="is_available"):
        parse_device("npu")  # torch_npu "imports" but no NPU is visible
