"""`load(source)`: any supported model source -> a ready pipeline, family auto-detected.

Sources: a diffusers pipeline folder (model_index.json), a single checkpoint file in an
original release layout, or a hub repo id. What the source is (which family, folder or file)
is told by engine/checkpoints/recognise.py, as for conversion and inspection.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from dite.engine.dtypes import precisions
from dite.engine.errors import CheckpointError, ConfigError, InputError
from dite.engine.checkpoints.recognise import file_family, local_path, pipeline_family
from dite.engine.families import BY_NAME
from dite.engine.loading.config_files import DITE_DEFAULTS, read_model_index
from dite.engine.loading.hub import looks_like_repo_id
from dite.engine.pipelines.base import Pipeline
from dite.engine.loading.weights import open_weights
from dite.schedulers import by_name
from dite.schedulers.base import Scheduler

from dite.engine.loading.hub import DEMO_MODELS, demo_folder  # noqa: F401  (here for load's callers)

def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    names = precisions(long_names=True)
    if isinstance(dtype, torch.dtype):
        if dtype not in names.values():
            raise InputError(f"dtype {dtype} is not supported; use float32, float16 or bfloat16")
        return dtype
    try:
        return names[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise InputError(f"unknown dtype {dtype!r}; use one of {sorted(names)}") from None


def parse_device(device: torch.device | str) -> torch.device:
    if str(device) == "auto":
        from dite.engine.runtime.npu_env import auto_device

        device = auto_device()
    if str(device).startswith("npu"):
        # torch knows "npu" only once torch_npu is imported; imported here, on request only.
        from dite.engine.runtime.npu_env import require_npu

        require_npu()
    try:
        device = torch.device(device)
    except RuntimeError:
        raise InputError(f"unknown device {device!r}; use 'cpu', 'cuda', 'cuda:1', 'npu', 'auto', ...") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' was asked for but no CUDA GPU is available to torch; use device='cpu'")
    return device


def recorded_name(source) -> str:
    """How generated images name the model: a demo name or hub repo id as given, a local
    path by its file or folder name only (metadata never carries the user's directories)."""
    text = str(source)
    if text in DEMO_MODELS:
        return text
    path = Path(os.path.expanduser(text))
    if not path.exists() and looks_like_repo_id(text):
        return text
    return path.resolve().name or text


def check_model_config(model_config) -> dict:
    """`model_config=`: a dict of config fields (its keys are checked by each family's loader)."""
    if model_config is None:
        return {}
    if not isinstance(model_config, dict):
        raise ConfigError(f"model_config must be a dict (a JSON object) of config fields, not "
                          f"{type(model_config).__name__}")
    return model_config


def _config_parsers(family: str, model_index: dict) -> dict:
    """diffusers / transformers class name -> the dite parser of its config.json."""
    from dite.models import clip, dit, mmdit, pixart, t5, vae

    transformer = {"dit": dit.DiTConfig.from_diffusers, "sd3": mmdit.MMDiTConfig.from_diffusers,
                   "pixart": lambda c: pixart.PixArtConfig.from_diffusers(
                       c, "sigma" if model_index.get("_class_name") == "PixArtSigmaPipeline" else "alpha")}[family]
    return {"AutoencoderKL": vae.VAEConfig.from_diffusers, "CLIPTextModel": clip.CLIPTextConfig.from_transformers,
            "CLIPTextModelWithProjection": clip.CLIPTextConfig.from_transformers,
            "T5EncoderModel": t5.T5Config.from_transformers,
            **{name: transformer for name in BY_NAME[family].transformer_classes}}


def check_folder_configs(path: Path, model_index: dict, family: str, skip=()) -> None:
    """Parse every component config of a pipeline folder (transformer, VAE, text encoders,
    scheduler) before any weights are read, so a malformed one fails at once, naming its
    file and field. Components replaced by the caller (`skip`) are not read."""
    from dite.engine.loading.config_files import parse_config
    from dite.schedulers import load_scheduler

    parsers = _config_parsers(family, model_index)
    for name, spec in model_index.items():
        if name.startswith("_") or name in skip or not isinstance(spec, list) or spec[-1] is None:
            continue
        folder = path / name
        if name == "scheduler" and folder.is_dir():
            load_scheduler(folder)
        elif spec[-1] in parsers and (folder / "config.json").is_file():
            parse_config(folder / "config.json", parsers[spec[-1]], f"{name} config")


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
    release_encoders: bool = False,
    vae_tiling: bool = False,
    parallel: dict | str | None = None,
    loras: list | None = None,
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
    (engine/runtime/executors; `executor_options` go to it, e.g. {"backend": "inductor", "mode":
    "reduce-overhead"}); attention: the denoiser's attention kernel, "sdpa", "math" or "npu".
    release_encoders: drop the text encoders after the first call's encoding (engine/memory/
    encoders.py); vae_tiling: decode large images in tiles (engine/memory/vae_tiling.py).
    parallel: generate across the ranks of the current process group (torchrun, or
    dite.engine.parallel.spawn), e.g. {"cfg": 2, "ulysses": 2}; docs/parallel.md.
    loras: [(path, scale), ...] merged into the denoiser (and SD3's text encoders) after loading (docs/lora.md).
    """
    if loras is not None:  # files readable and scales finite before any model weights are read
        from dite.engine.lora.merge import check_lora_list

        loras = check_lora_list(loras)
    if parallel is not None:  # a bad plan, or no process group, is refused before anything is read
        from dite.engine.parallel import parse_plan
        from dite.engine.parallel.group import ensure_process_group

        parallel = parse_plan(parallel)
        ensure_process_group()
    device = parse_device(device)
    auto = isinstance(dtype, str) and dtype.lower() == "auto"  # the device's best (runtime/dtype_probe.py)
    if not auto:
        dtype = parse_dtype(dtype)
    model_config = check_model_config(model_config)
    path = local_path(source, revision=revision, variant=variant)
    if auto:
        from dite.engine.runtime.dtype_probe import auto_dtype

        dtype = parse_dtype(auto_dtype(device, width=denoiser_width(path)))
    options = dict(device=device, dtype=dtype, vae=vae, variant=variant, model_config=model_config or {},
                   components=components, tokenizers=tokenizers)
    if path.is_dir():
        index = path / "model_index.json"
        if not index.exists():
            raise CheckpointError(
                f"{path} has no model_index.json: give a diffusers pipeline folder (with "
                "model_index.json and transformer/, vae/, scheduler/) or a single checkpoint file"
            )
        model_index = read_model_index(index)
        family = pipeline_family(index, model_index)
        check_folder_configs(path, model_index, family.name, skip={*components, *(["vae"] if vae is not None else [])})
        pipe = family.loader().load_folder(path, model_index, **options)
        defaults = model_index.get("_dite") or {}
        pipe.defaults = {k: v for k, v in defaults.items() if k in DITE_DEFAULTS}
    else:
        reader = open_weights(path)
        found = file_family(reader.keys())
        if found is None:
            sample = ", ".join(sorted(reader.keys())[:4])
            raise CheckpointError(
                f"{path}: cannot tell which model this checkpoint is (tensors such as {sample}); "
                "dite reads DiT, SD3 and PixArt checkpoints in their original or diffusers layouts"
            )
        pipe = found[0].loader().load_file(path, reader, **options)
    pipe.source = str(source)
    pipe.source_path = path  # the local file or folder read (the model hash reads it)
    pipe.model_name = recorded_name(source)
    if auto:
        from dite.engine.runtime.dtype_probe import AUTO_VAE_DTYPE

        pipe.vae.to(AUTO_VAE_DTYPE)
    if device.type == "npu":
        from dite.engine.runtime.npu_env import npu_weights

        npu_weights(pipe.transformer)
    from dite.engine.runtime.executors import make_executor

    pipe.executor = make_executor(executor, attention=attention, **(executor_options or {}))
    for lora_path, lora_scale in loras or ():  # before release_encoders: text-encoder LoRAs merge into them
        pipe.load_lora(lora_path, lora_scale)
    if release_encoders:  # engine/memory/encoders.py: text encoders dropped after the first encoding
        from dite.engine.memory.encoders import release_encoders as release

        release(pipe)
    if vae_tiling:  # engine/memory/vae_tiling.py: decode in overlapping 512-pixel tiles
        from dite.engine.memory.vae_tiling import enable_vae_tiling

        enable_vae_tiling(pipe.vae)
    if scheduler is not None:
        # A name takes the model's own config (its noise schedule, prediction type), as README says.
        pipe.scheduler = by_name(scheduler, pipe.scheduler.to_diffusers_config()) if isinstance(scheduler, str) else scheduler
        pipe.check_scheduler()  # one that fits the model's training objective, or the list of those that do
    if parallel is not None:
        from dite.engine.parallel import enable

        enable(pipe, parallel)
    return pipe


def denoiser_width(path) -> int | None:
    """The denoiser's hidden size from a diffusers folder's transformer/config.json (heads x
    head size), read before any weights; None where it is not written down there."""
    import json

    try:
        config = json.loads((Path(path) / "transformer" / "config.json").read_text())
        return int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
