"""What the LoRA parity tests share: the prompts and the one call both engines make on a
tiny SD3 (16x16, 3 steps, no guidance), with diffusers loading the LoRA file itself."""

from __future__ import annotations

from tiny_sd3 import reference_images

PROMPTS = ["a red circle", "a blue square"]


def diffusers_lora_images(reference, path):
    """diffusers' images with the LoRA file at `path` loaded by its own load_lora_weights."""
    reference.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="test")
    try:
        return reference_images(reference, PROMPTS, None, 3, 1.0, (16, 16), seed=5, max_sequence_length=16)
    finally:
        reference.unload_lora_weights()


def dite_lora_call(pipe, latents):
    """dite's output for the same call, from diffusers' latents."""
    return pipe(prompt=PROMPTS, height=16, width=16, num_inference_steps=3, guidance_scale=1.0,
                latents=latents.clone(), max_sequence_length=16, output_type="np", progress=False)
