"""LoRA: read a LoRA file (diffusers/peft or kohya/ComfyUI keys), merge it into a pipeline's
denoiser weights, and unmerge it exactly (docs/lora.md)."""

from dite.engine.lora.formats import LoraError, LoraFile, read_lora
from dite.engine.lora.merge import load_lora, lora_record, unload_lora, calls_running

__all__ = ["LoraError", "LoraFile", "read_lora", "load_lora", "unload_lora", "lora_record", "calls_running"]
