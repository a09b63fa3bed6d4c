"""What an image records beyond the pipeline's own parameters: how it was run (dtype,
device, executor, attention), which weights (model hash) and classes, and the settings
`--from-image` needs to make it again."""

from __future__ import annotations

from typing import Any


def run_metadata(pipe, *, model_hash: str | None, options: dict[str, Any]) -> dict[str, Any]:
    """Settings shared by every image of a run. `options`: the generate options a re-run
    needs that the pipeline does not record (executor, attention, compile settings, ...),
    None values left out."""
    executor = getattr(pipe, "executor", None)
    meta = {"dtype": str(pipe.dtype).removeprefix("torch."), "device": str(pipe.device),
            "vae_dtype": str(next(pipe.vae.parameters()).dtype).removeprefix("torch."),
            "executor": getattr(executor, "name", None) or type(executor).__name__,
            "pipeline_class": type(pipe).__name__, "transformer_class": type(pipe.transformer).__name__,
            "model_hash": model_hash}
    meta.update({k: v for k, v in options.items() if v is not None})
    return {k: v for k, v in meta.items() if v is not None}


def image_metadata(pipe, params: dict[str, Any], run: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """One image's metadata: the pipeline's parameters, the run's, the job's (`extra`), and
    for DiT the class name of its label."""
    meta = {**params, **run, **{k: v for k, v in extra.items() if v is not None}}
    label = params.get("class_label")
    names = [name for name, index in (getattr(pipe, "labels", None) or {}).items() if index == label]
    if label is not None and names:
        meta["class_name"] = names[0]  # id2label's first name for the class (DiT folders carry ImageNet's)
    return meta
