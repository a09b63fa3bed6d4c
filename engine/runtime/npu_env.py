"""Ascend NPU availability: torch_npu and torchair imported only when asked for.

torch_npu installed without the CANN toolkit breaks `import torch` itself (torch auto-loads
it as a device backend), and importing it with a mismatched torch or CANN fails deep in
native code. So `import dite` never imports it; the first request for an NPU (device "npu"
or "auto", the npu-graph executor, the "npu" attention kernel) does, and any failure
becomes one BackendUnavailableError saying what is missing and how to fix it.
"""

from __future__ import annotations

import importlib.util
import sys

import torch

from dite.engine.errors import DiteError

SET_ENV = "/usr/local/Ascend/ascend-toolkit/set_env.sh"


class BackendUnavailableError(DiteError, RuntimeError):
    """An accelerator backend (torch_npu, CANN, torchair) is missing or broken."""


def _fix(what: str, exc: BaseException | None) -> str:
    cause = f" ({type(exc).__name__}: {exc})" if exc is not None else ""
    return (f"{what}{cause}. To run on an Ascend NPU: install the CANN toolkit and run "
            f"`source {SET_ENV}` (or your CANN install's set_env.sh) in this shell; install torch_npu of the same "
            f"version as torch, next to the CPU build of torch (torch_npu X.Y.Z[.postN] needs torch X.Y.Z exactly; "
            f"torch here is {torch.__version__}), with the CANN version Ascend's compatibility table gives for that "
            "torch_npu (e.g. torch_npu 2.9.0.post6 needs CANN 9.1.0); if plain `import torch` fails with "
            "\"Failed to load the backend extension: torch_npu\", set TORCH_DEVICE_BACKEND_AUTOLOAD=0 or uninstall "
            "torch_npu. On other machines use device='cuda' or 'cpu' and executor='compiled' or 'eager'")


def import_torch_npu():
    """torch_npu, imported now, or a BackendUnavailableError."""
    if sys.modules.get("torch_npu") is not None:
        return sys.modules["torch_npu"]
    if importlib.util.find_spec("torch_npu") is None:
        raise BackendUnavailableError(_fix("torch_npu is not installed", None))
    try:
        import torch_npu
    except (ImportError, RuntimeError, OSError) as exc:  # no CANN: libhccl.so etc.; version mismatch
        raise BackendUnavailableError(_fix("torch_npu is installed but cannot be imported", exc)) from None
    return torch_npu


def import_torchair():
    """torchair (shipped inside torch_npu; importable once torch_npu is)."""
    import_torch_npu()
    try:
        import torchair
    except ImportError:
        try:
            from torch_npu.dynamo import torchair
        except ImportError as exc:
            raise BackendUnavailableError(_fix("torchair (part of torch_npu) cannot be imported", exc)) from None
    return torchair


def npu_available() -> bool:
    """torch_npu importable and at least one NPU present (never raises)."""
    if importlib.util.find_spec("torch_npu") is None and sys.modules.get("torch_npu") is None:
        return False
    try:
        import_torch_npu()
        return bool(torch.npu.is_available())
    except (BackendUnavailableError, AttributeError, RuntimeError):
        return False


def require_npu() -> None:
    """An NPU for device 'npu', or a BackendUnavailableError."""
    import_torch_npu()
    if not getattr(torch, "npu", None) or not torch.npu.is_available():
        raise BackendUnavailableError(_fix("torch_npu imported but torch.npu.is_available() is False (no NPU "
                                           "visible: check npu-smi and ASCEND_RT_VISIBLE_DEVICES)", None))


def auto_device() -> str:
    """'npu' if torch_npu imports and an NPU is present, else 'cuda' if a GPU is, else 'cpu'."""
    if npu_available():
        return "npu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def npu_weights(module: torch.nn.Module) -> None:
    """Every parameter re-created on the NPU and contiguous, as a Parameter made there.

    torchair's frozen_parameter treats Parameters as fixed-address inputs; `.to()` on a
    Parameter can lose the Parameter type, and non-contiguous weights gave wrong results in
    a documented torchair case, so each is rebuilt rather than moved."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None:
                sub._parameters[name] = torch.nn.Parameter(p.detach().to("npu").contiguous(), requires_grad=False)
