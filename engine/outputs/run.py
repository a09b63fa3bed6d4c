"""Running a planned `generate` (outputs/jobs.py): loading with the memory options, one call
per job, each image written as soon as its call finishes, one summary line at the end."""

from __future__ import annotations

import sys
import time
from typing import Any, Callable

from dite.engine.errors import InputError
from dite.engine.outputs.jobs import Job
from dite.engine.outputs.metadata import image_metadata
from dite.engine.outputs.writers import save_image


def job_call(pipe, job: Job, args) -> dict[str, Any]:
    """The pipeline keywords of one job."""
    width, height = job.size if job.size else (None, None)
    call = dict(seed=job.seed, height=height, width=width, progress=not args.quiet, accel=job.accel)
    if job.steps is not None:
        call["num_inference_steps"] = job.steps
    if job.guidance is not None:
        call["guidance_scale"] = job.guidance
    if args.init_image is not None:  # image-to-image / inpainting (engine/pipelines/init_image.py)
        call.update(image=args.init_image, strength=args.strength, mask_image=args.mask)
    if getattr(args, "skip_layers", None) is not None:  # skip-layer guidance (engine/runtime/slg.py), SD3 only
        if pipe.family != "sd3":
            raise InputError(f"--skip-layers (skip-layer guidance) is for SD3 / SD3.5 models; this is {pipe.family}")
        call["skip_guidance_layers"] = args.skip_layers
        call.update({name: value for name, value in (("skip_layer_guidance_scale", args.slg_scale),
                                                     ("skip_layer_guidance_start", args.slg_start),
                                                     ("skip_layer_guidance_stop", args.slg_stop))
                     if value is not None})
    if pipe.family == "dit":
        call["class_labels"] = job.labels
    else:
        call.update(prompt=job.prompts, negative_prompt=job.negative, num_images_per_prompt=job.per_prompt,
                    max_sequence_length=args.max_sequence_length)
    return call


def run_jobs(pipe, jobs: list[Job], args, run_meta: dict[str, Any], load_seconds: float,
             started: float, log: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
             write: bool = True) -> int:
    """Make every job's images, writing each as its call finishes; returns the image count.
    write=False (the ranks of a parallel run other than 0) runs the calls and writes nothing."""
    from dite.engine.runtime.accounting import summary_line

    written, stats, timings = 0, None, {}
    for number, job in enumerate(jobs, start=1):
        if job.drawn:
            log(f"seed {job.seed} (random)" + ("; image k of the run uses seed + k" if len(jobs) > 1 or job.images > 1
                                               else ""))
        out = pipe(**job_call(pipe, job, args))
        if not write:
            continue
        extra = {"accel_spec": job.accel, "prompt_file_line": job.line or None,
                 "random_seed": True if job.random_seed else None}
        for image, params, path in zip(out.images, out.parameters, job.paths):
            save_image(image, path, image_metadata(pipe, params, run_meta, extra), overwrite=args.overwrite)
            print(path, flush=True)
            written += 1
        stats = out.stats
        for stage, seconds in out.timings.items():
            timings[stage] = timings.get(stage, 0.0) + seconds
        if len(jobs) > 1 and not args.quiet:  # one line per call: a long run shows how far it is
            log(f"[{number}/{len(jobs)}] {job.images} image(s) in {sum(out.timings.values()):.2f} s")
    if not write:
        return 0
    steps = out.parameters[0]["steps"]
    calls = f" in {len(jobs)} calls" if len(jobs) > 1 else ""
    log(f"{written} image(s){calls}, {steps} steps | {summary_line(stats, timings)} | load {load_seconds:.2f}s | "
        f"total {time.perf_counter() - started:.2f}s")
    return written


def load_for_generate(args, options: dict, components: dict):
    """load() with generate's options; --weights-dtype keeps fp8 weights (engine/memory/fp8.py)."""
    from contextlib import nullcontext

    from dite.engine.loading.loader import load
    from dite.engine.loading.streaming import keeping_fp8

    device, dtype = args.device, args.dtype
    if args.offload:  # loaded into CPU memory, in the dtype "auto" picks for where it will run
        from dite.engine.loading.loader import parse_device
        from dite.engine.runtime.dtype_probe import auto_dtype

        device = "cpu"
        dtype = auto_dtype(parse_device(args.device)) if args.dtype == "auto" else args.dtype
    with keeping_fp8() if args.weights_dtype else nullcontext():
        pipe = load(args.model, device=device, dtype=dtype, vae=args.vae, scheduler=args.scheduler,
                    tokenizers=args.tokenizers, executor=args.executor, attention=args.attention,
                    executor_options=options, model_config=args.model_config,
                    parallel=getattr(args, "parallel", None), loras=getattr(args, "lora", None), **components)
    if args.weights_dtype:
        from dite.engine.memory.fp8 import fp8_dtype, store_fp8

        store_fp8(pipe, fp8_dtype(args.weights_dtype))
    if args.offload:
        from dite.engine.memory.offload import enable_offload

        if args.dtype == "auto":
            from dite.engine.runtime.dtype_probe import AUTO_VAE_DTYPE

            pipe.vae.to(AUTO_VAE_DTYPE)
        enable_offload(pipe, args.offload, execution=args.device)
    return pipe


def memory_options(pipe, args, calls: int) -> None:
    """--low-memory and --vae-tiling (engine/memory/)."""
    if args.low_memory:
        from dite.engine.memory.encoders import release_encoders

        release_encoders(pipe, release_after=calls)
    if args.vae_tiling:
        from dite.engine.memory.vae_tiling import enable_vae_tiling

        enable_vae_tiling(pipe.vae)


def run_metadata_of(pipe, args) -> dict:
    """What every image of the run records beyond the pipeline's parameters (outputs/metadata.py)."""
    from dite.engine.loading.loader import recorded_name
    from dite.engine.outputs.metadata import run_metadata
    from dite.engine.outputs.model_hash import model_hash

    digest = model_hash(getattr(pipe, "source_path", None))
    recorded = getattr(args, "recorded_model_hash", None)
    if recorded and digest and recorded != digest:
        print(f"dite: note: {args.from_image} was made by a model with hash {recorded}; this one's is {digest}: "
              "the image may differ", file=sys.stderr)
    options = {"executor": args.executor, "attention": args.attention, "compile_backend": args.compile_backend,
               "compile_mode": args.compile_mode, "npu_route": args.npu_route, "scheduler_option": args.scheduler,
               "dtype_option": args.dtype, "vae_tiling": True if args.vae_tiling else None,
               "weights_dtype": args.weights_dtype, "offload": args.offload,
               "vae_option": recorded_name(args.vae) if args.vae else None,
               "tokenizers_option": recorded_name(args.tokenizers) if args.tokenizers else None}
    return run_metadata(pipe, model_hash=digest, options=options)
