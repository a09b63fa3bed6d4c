"""`load(source)`: any supported model source -> a ready pipeline, family auto-detected.

Sources: a diffusers pipeline folder (model_index.json), a single checkpoint file in an
original release layout, or a hub repo id. The family comes from model_index.json's class
name for folders and from tensor names for files (the `models` package owns detection).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from dite.engine.errors import CheckpointError, ConfigError, InputError
from dite.engine.hub import resolve_source
from dite.engine.pipeline import Pipeline
from dite.engine.weights import open_weights
from dite.schedulers import by_name
from dite.schedulers.base import Scheduler

# Trained demo models shipped as package data of dite.models.demo (see models/demo/README.md).
DEMO_MODELS = {"demo-sd3": "sd3", "demo-dit": "dit"}

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise InputError(f"dtype {dtype} is not supported; use float32, float16 or bfloat16")
        return dtype
    try:
        return DTYPES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise InputError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}") from None


def parse_device(device: torch.device | str) -> torch.device:
    if str(device) == "auto":
        from dite.engine.npu_env import auto_device

        device = auto_device()
    if str(device).startswith("npu"):
        # torch knows "npu" only once torch_npu is imported; imported here, on request only.
        from dite.engine.npu_env import require_npu

        require_npu()
    try:
        device = torch.device(device)
    except RuntimeError:
        raise InputError(f"unknown device {device!r}; use 'cpu', 'cuda', 'cuda:1', 'npu', 'auto', ...") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' was asked for but no CUDA GPU is available to torch; use device='cpu'")
    return device


def demo_folder(source) -> "Path | None":
    """The folder of a demo model shipped inside dite ("demo-sd3", "demo-dit"), or None."""
    if not isinstance(source, str) or source not in DEMO_MODELS:
        return None
    from importlib.resources import files

    folder = Path(str(files("dite.models.demo") / DEMO_MODELS[source]))
    if not (folder / "model_index.json").is_file():
        raise CheckpointError(f"the demo model {source!r} is not in this installation ({folder} is missing); "
                              "reinstall dite, or train and export it with tools/train_all_demo.sh")
    return folder


def _families():
    # Imported here so that `import dite.engine` stays light.
    from dite.engine import load_dit, load_pixart, load_sd3

    return [load_dit, load_sd3, load_pixart]


def supported_pipelines() -> list[str]:
    return [name for family in _families() for name in family.PIPELINE_CLASSES]


def load(
    source: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str = torch.float32,
    *,
    vae: Any = None,
    scheduler: Scheduler | str | None = None,
    variant: str | None = None,
    revision: str | None = None,
    model_config: dict | None = None,
    tokenizers: str | os.PathLike | None = None,
    executor: str = "eager",
    attention: str = "sdpa",
    executor_options: dict | None = None,
    **components: Any,
) -> Pipeline:
    """Load a pipeline from `source` (folder, file or hub repo id) onto `device` in `dtype`.

    vae: a VAE folder/file/repo for checkpoints that do not bundle one (the original DiT
    `.pt`), or to replace the bundled one. scheduler: a Scheduler, or a name ("ddim",
    "ddpm") to replace the folder's. variant: a precision variant of the files ("fp16").
    model_config: config fields that cannot be inferred from tensors (e.g. DiT num_heads for
    a non-standard width; for SD3 single files of non-release sizes also the config.json
    dicts of "text_encoder", "text_encoder_2", "text_encoder_3" and "vae"). tokenizers: a
    folder (or hub repo id) holding tokenizer/, tokenizer_2/ and tokenizer_3/, for SD3
    single files, which carry none (default: looked up beside the file). Other keywords
    replace pipeline components by their diffusers name; `text_encoder_3=None` runs SD3
    without T5 (its tokens become zeros). device "auto": an Ascend NPU if torch_npu imports
    and one is present, else CUDA, else CPU. executor: "eager", "compiled" or "npu-graph"
    (engine/executors; `executor_options` go to it, e.g. {"backend": "inductor", "mode":
    "reduce-overhead"}); attention: the denoiser's attention kernel, "sdpa", "math" or "npu".
    """
    device, dtype = parse_device(device), parse_dtype(dtype)
    demo = demo_folder(source)
    path = demo if demo is not None else resolve_source(source, revision=revision, variant=variant)
    options = dict(device=device, dtype=dtype, vae=vae, variant=variant, model_config=model_config or {},
                   components=components, tokenizers=tokenizers)
    if path.is_dir():
        index = path / "model_index.json"
        if not index.exists():
            raise CheckpointError(
                f"{path} has no model_index.json: give a diffusers pipeline folder (with "
                "model_index.json and transformer/, vae/, scheduler/) or a single checkpoint file"
            )
        try:
            model_index = json.loads(index.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{index} is not valid JSON ({exc})") from None
        class_name = model_index.get("_class_name")
        family = next((f for f in _families() if class_name in f.PIPELINE_CLASSES), None)
        if family is None:
            raise ConfigError(
                f"{index} describes a {class_name!r}, which dite does not run; supported: "
                f"{', '.join(supported_pipelines())}"
            )
        pipe = family.load_folder(path, model_index, **options)
        defaults = model_index.get("_dite") or {}
        pipe.defaults = {k: v for k, v in defaults.items()
                         if k in ("num_inference_steps", "guidance_scale", "max_sequence_length")}
    else:
        reader = open_weights(path)
        keys = reader.keys()
        family = next((f for f in _families() if f.detect_file(keys)), None)
        if family is None:
            sample = ", ".join(sorted(keys)[:4])
            raise CheckpointError(
                f"{path}: cannot tell which model this checkpoint is (tensors such as {sample}); "
                "dite reads DiT, SD3 and PixArt checkpoints in their original or diffusers layouts"
            )
        pipe = family.load_file(path, reader, **options)
    pipe.source = str(source)
    if device.type == "npu":
        from dite.engine.npu_env import npu_weights

        npu_weights(pipe.transformer)
    from dite.engine.executors import make_executor

    pipe.executor = make_executor(executor, attention=attention, **(executor_options or {}))
    if scheduler is not None:
        pipe.scheduler = by_name(scheduler) if isinstance(scheduler, str) else scheduler
    return pipe
