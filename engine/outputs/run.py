"""Running a planned `generate` (outputs/jobs.py) on a loaded pipeline: one call per job,
each image written as soon as its call finishes, one summary line at the end."""

from __future__ import annotations

import sys
import time
from typing import Any, Callable

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
    if pipe.family == "dit":
        call["class_labels"] = job.labels
    else:
        call.update(prompt=job.prompts, negative_prompt=job.negative, num_images_per_prompt=job.per_prompt,
                    max_sequence_length=args.max_sequence_length)
    return call


def run_jobs(pipe, jobs: list[Job], args, run_meta: dict[str, Any], load_seconds: float,
             started: float, log: Callable[[str], None] = lambda line: print(line, file=sys.stderr)) -> int:
    """Make every job's images, writing each as its call finishes; returns the image count."""
    from dite.engine.runtime.accounting import summary_line

    written, stats, timings = 0, None, {}
    for number, job in enumerate(jobs, start=1):
        if job.drawn:
            log(f"seed {job.seed} (random)" + ("; image k of the run uses seed + k" if len(jobs) > 1 or job.images > 1
                                               else ""))
        out = pipe(**job_call(pipe, job, args))
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
    steps = out.parameters[0]["steps"]
    calls = f" in {len(jobs)} calls" if len(jobs) > 1 else ""
    log(f"{written} image(s){calls}, {steps} steps | {summary_line(stats, timings)} | load {load_seconds:.2f}s | "
        f"total {time.perf_counter() - started:.2f}s")
    return written
