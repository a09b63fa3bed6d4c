"""A `generate` run as a list of pipeline calls ("jobs"), planned before the model loads.

Without --prompt-file: one call per --batch-count round, making every command-line prompt
(or class label) --images-per-prompt times. With it: one call per line per round. Seeds run
on through the whole run: image k of the run uses seed + k, unless a line gives its own.
--seed -1 (or "seed": -1 on a line) draws a random seed, printed and recorded in the image.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

from dite.engine.errors import InputError
from dite.engine.outputs.prompt_file import Entry

RANDOM_SEED = -1
RANDOM_SEED_BOUND = 2**32  # drawn seeds are below this, as in other UIs, so they are easy to type


@dataclass
class Job:
    """One pipeline call: its prompts (text-to-image) or class labels (DiT) and settings;
    None settings take the model's defaults."""

    prompts: list[str] | None = None
    labels: list[Any] | None = None
    per_prompt: int = 1
    negative: str | None = None
    seed: int = 0
    size: tuple[int, int] | None = None
    steps: int | None = None
    guidance: float | None = None
    accel: str | None = None
    line: int = 0
    batch: int = 0
    random_seed: bool = False  # its seed comes from a random draw (recorded in its images)
    drawn: bool = False  # the draw was made for this call (printed before it runs)
    paths: list = field(default_factory=list)

    @property
    def images(self) -> int:
        return len(self.labels) if self.labels is not None else len(self.prompts) * self.per_prompt

    def image_fields(self, first_index: int) -> list[dict[str, Any]]:
        """The naming fields of each image of this call (see naming.FIELDS)."""
        fields = []
        for k in range(self.images):
            prompt = self.prompts[k // self.per_prompt] if self.prompts is not None else str(self.labels[k])
            fields.append({"index": first_index + k, "seed": self.seed + k, "line": self.line, "batch": self.batch,
                           "prompt": prompt})
        return fields


def draw_seed() -> int:
    return secrets.randbelow(RANDOM_SEED_BOUND)


def plan_jobs(args, entries: list[Entry] | None, dit: bool, max_seed: int) -> list[Job]:
    """The run's calls from the parsed command line (`args`) and the prompt file's entries."""
    base = draw_seed() if args.seed == RANDOM_SEED else args.seed
    random_base = args.seed == RANDOM_SEED
    jobs, next_seed, announced = [], base, not random_base
    for batch in range(args.batch_count):
        for entry in entries if entries is not None else [None]:
            job = _job(args, entry, dit)
            job.batch = batch
            given = (entry.settings.get("seed") if entry is not None else None)
            if given is None:
                job.seed, job.random_seed, job.drawn = next_seed, random_base, not announced
                announced = True
            elif given == RANDOM_SEED:
                job.seed, job.random_seed, job.drawn = draw_seed(), True, True
            else:
                job.seed = given
            if job.seed + job.images - 1 > max_seed:
                where = f"--prompt-file line {job.line}: " if job.line else ""
                raise InputError(f"{where}--seed {job.seed}: image k uses seed + k, and {job.images} images go past "
                                 f"the largest seed ({max_seed})")
            next_seed = job.seed + job.images if given is None else next_seed
            jobs.append(job)
    return jobs


def _job(args, entry: Entry | None, dit: bool) -> Job:
    job = Job(per_prompt=args.images_per_prompt, negative=args.negative_prompt, size=args.size, steps=args.steps,
              guidance=args.guidance, accel=args.accel)
    if entry is None:
        if dit:
            job.labels = list(args.labels)
        else:
            job.prompts = list(args.prompt)
        return job
    job.line = entry.line
    settings = dict(entry.settings)
    if "text" in settings:  # a plain-text line
        settings["class_label" if dit else "prompt"] = settings.pop("text")
    if dit:
        if "class_label" not in settings:
            raise InputError(f"--prompt-file line {entry.line}: this is a class-conditional DiT: give \"class_label\", "
                             "not \"prompt\"")
        label = settings["class_label"]
        text = str(label).strip()
        job.labels = [int(text) if text.lstrip("-").isdigit() else label] * args.images_per_prompt
    else:
        if "prompt" not in settings:
            raise InputError(f"--prompt-file line {entry.line}: this is a text-to-image model: give \"prompt\", not "
                             "\"class_label\"")
        job.prompts = [settings["prompt"]]
    for key, name in (("negative", "negative"), ("size", "size"), ("steps", "steps"), ("guidance", "guidance"),
                      ("accel", "accel")):
        if key in settings:
            setattr(job, name, settings[key])
    return job
