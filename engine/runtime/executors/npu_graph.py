"""The npu-graph executor: the compiled executor's pieces through torchair on Ascend.

route "ge" (default): TorchAir's GE graph mode (CompilerConfig.mode "max-autotune", which in
TorchAir means Ascend IR graphs, not Inductor autotuning) with frozen_parameter (weights as
fixed-address inputs) and tiling_schedule_optimize (value-dependent tiling, e.g. fused
attention, kept inside the static graph). route "aclgraph": torch_npu's npugraph_ex backend
(capture/replay, the NPU analogue of CUDA graphs), whose outputs the next replay overwrites:
recorded deltas are copied into the call's buffers and the step's output is cloned.

Not run on real hardware here (no NPU): the configuration follows torchair's documentation.
"""

from __future__ import annotations

from typing import Callable, Sequence

from dite.engine.errors import ConfigError
from dite.engine.runtime.executors.base import StepExample
from dite.engine.runtime.executors.compiled import CompiledExecutor, CompiledRun
from dite.engine.runtime.npu_env import import_torchair
from dite.models.denoiser import Denoiser
from dite.models.plan import StepPlan

ROUTES = ("ge", "aclgraph")


def torchair_backend(route: str = "ge", *, frozen_parameter: bool = True, tiling_schedule_optimize: bool = True):
    """(backend, options) for torch.compile on the NPU."""
    torchair = import_torchair()
    if route == "ge":
        config = torchair.CompilerConfig()
        config.mode = "max-autotune"
        config.experimental_config.frozen_parameter = frozen_parameter
        config.experimental_config.tiling_schedule_optimize = tiling_schedule_optimize
        return torchair.get_npu_backend(compiler_config=config), None
    if route == "aclgraph":
        # clone_output stays off: dite copies what it keeps (see module docstring).
        return "npugraph_ex", {"frozen_parameter": frozen_parameter, "clone_output": False}
    raise ConfigError(f"unknown npu-graph route {route!r}; use one of {', '.join(ROUTES)}")


class NpuGraphExecutor(CompiledExecutor):
    name = "npu-graph"

    def __init__(self, attention: str = "sdpa", route: str = "ge", frozen_parameter: bool = True,
                 tiling_schedule_optimize: bool = True):
        backend, options = torchair_backend(route, frozen_parameter=frozen_parameter,
                                            tiling_schedule_optimize=tiling_schedule_optimize)
        # TorchAir's backend takes no torch.compile mode= / options=; npugraph_ex takes options.
        super().__init__(attention, backend=backend, mode=None, options=options)
        self.route = route
        self.backend_name = f"torchair-{route}"
        self.overwrites_outputs = route == "aclgraph"

    def begin(self, transformer: Denoiser, plans: Sequence[StepPlan],
              examples: Callable[[], Sequence[StepExample]]) -> CompiledRun:
        device = next(transformer.parameters()).device
        if device.type != "npu":
            raise ConfigError(f"the npu-graph executor runs a model on an Ascend NPU, this one is on {device}: "
                              "load(..., device='npu', executor='npu-graph')")
        return super().begin(transformer, plans, examples)
