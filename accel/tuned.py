"""tuned(file=FILE): the acceleration `dite tune` chose, read from the file it wrote.

A tuned file (engine/runtime/tune.py) holds one accel spec, fully resolved ("none" when
plain sampling with fewer steps won), the step count a call then runs, and what the search
was made for (`valid_for`): the model's fingerprint, family and depth, the scheduler's class
and config, the step count asked for, guidance and size. It is valid for nothing else, and
a mismatch is refused in one line naming the field, with the fix (run `dite tune` again).

How it expands:

- At the call (`Pipeline.check_call` -> `call_steps`, before the schedule is built): the
  file is checked against the pipeline (fingerprint, scheduler) and the call (size, step
  count asked for), and the call runs the file's step count: fewer than asked when fewer
  steps won. out.parameters[k]["steps"] and out.stats["steps"] then say the steps run.
- At plan building (`accel.build.resolve` -> `expand_tuned`, before any other check):
  tuned(file=F) is replaced by the methods its spec parses to, so "tuned(file=F)+todo" meets
  exactly the conflict and setting checks of the spelled-out spec, and out.stats["accel"]
  names the methods that ran. The PlanContext is checked here too (model, steps, depth,
  guidance), so plans built without a pipeline are refused the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from dite.accel.methods import Method, PlanContext, StepDraft
from dite.engine.errors import ConfigError

TUNED_FORMAT = "dite-tuned/1"
AGAIN = "run `dite tune` again"
_REQUIRED = ("spec", "steps", "valid_for.model_id", "valid_for.family", "valid_for.depth", "valid_for.steps",
             "valid_for.guidance", "valid_for.latent_size", "valid_for.size", "valid_for.scheduler.class",
             "valid_for.scheduler.config")


def read_tuned(path: str | Path) -> dict:
    """The file's data, checked for kind and completeness (not yet against a call)."""
    from dite.accel.fastattn import PLAN_FORMAT

    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"tuned file {path} does not exist; make one with `dite tune ... -o {path}`") from None
    except IsADirectoryError:
        raise ConfigError(f"tuned file {path} is a folder; give the JSON file `dite tune -o` wrote") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"tuned file {path} is not JSON ({exc}): {AGAIN}") from None
    kind = data.get("format") if isinstance(data, dict) else None
    if kind == PLAN_FORMAT:
        raise ConfigError(f"{path} is a DiTFastAttn plan (format {PLAN_FORMAT}), not a tuned file: use it as "
                          f"fastattn(plan={path}), or tune with `dite tune --fastattn-plan {path}`")
    if kind != TUNED_FORMAT:
        raise ConfigError(f"{path} is not a dite tuned file (format {kind!r}, expected {TUNED_FORMAT!r}): {AGAIN}")
    for key in _REQUIRED:
        node = data
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            raise ConfigError(f"tuned file {path} has no {key!r} (damaged or edited): {AGAIN}")
    if not isinstance(data["steps"], int) or not isinstance(data["valid_for"]["steps"], int) or data["steps"] < 1:
        raise ConfigError(f"tuned file {path}: steps {data['steps']!r} is not a step count: {AGAIN}")
    return data


def _scheduler_difference(stored: dict, scheduler) -> str | None:
    """What differs between the stored scheduler and this one, in words; None if nothing."""
    name = type(scheduler).__name__
    if stored["class"] != name:
        return f"scheduler {stored['class']}, this call's is {name}"
    config = json.loads(json.dumps(scheduler.to_diffusers_config(), default=str))
    keys = sorted(k for k in set(config) | set(stored["config"]) if config.get(k) != stored["config"].get(k))
    if keys:
        shown = ", ".join(f"{k}={stored['config'].get(k)!r} (now {config.get(k)!r})" for k in keys[:3])
        return f"scheduler config {shown}"
    return None


def _mismatch(path: str, what: str, fix: str = "") -> ConfigError:
    return ConfigError(f"tuned file {path} was tuned for {what}: {AGAIN}{fix}")


@dataclass(frozen=True)
class Tuned(Method):
    """The methods and settings a `dite tune` search chose (its file), for the model, step
    count, scheduler and size it searched with; a file where fewer steps won runs fewer steps."""

    name: ClassVar[str] = "tuned"
    summary: ClassVar[str] = "the methods and settings `dite tune` chose for a budget (its file; fewer steps too)"
    edits: ClassVar[str] = "tuned"
    file: str | None = None

    def data(self) -> dict:
        if not self.file:
            raise ConfigError("tuned needs its file: tuned(file=FILE), written by `dite tune --budget B -o FILE`")
        return read_tuned(self.file)

    def expand(self, ctx: PlanContext) -> list[Method]:
        """The stored methods (unresolved: resolve() checks them with the rest), after the
        file is checked against the plan context."""
        from dite.accel.spec import parse_spec

        data = self.data()
        valid = data["valid_for"]
        if ctx.model_id and valid["model_id"] != ctx.model_id:
            raise _mismatch(self.file, f"another model ({valid.get('model', '?')}, fingerprint {valid['model_id']}; "
                                       f"this one is {ctx.model_id})", " on this model")
        if valid["family"] != ctx.family or valid["depth"] != ctx.depth:
            raise _mismatch(self.file, f"a {valid['depth']}-block {valid['family']} model, this one is a "
                                       f"{ctx.depth}-block {ctx.family}", " on this model")
        if data["steps"] != ctx.steps:
            runs = "" if data["steps"] == valid["steps"] else f" (it runs {data['steps']})"
            raise _mismatch(self.file, f"{valid['steps']} steps{runs}, these plans are for {ctx.steps}",
                            f" with --steps {ctx.steps}, or ask for {valid['steps']} steps")
        guided = valid["guidance"] > 1.0
        if guided != ctx.guided:
            now = "guided" if ctx.guided else "unguided (guidance <= 1)"
            raise _mismatch(self.file, f"guidance {valid['guidance']}, this call is {now}",
                            " with this call's --guidance")
        spec = data["spec"]
        methods = [] if spec.strip().lower() in ("", "none") else parse_spec(spec)
        if any(isinstance(m, Tuned) for m in methods):
            raise ConfigError(f"tuned file {self.file} names another tuned file; {AGAIN}")
        return methods

    def resolved(self, ctx: PlanContext) -> "Tuned":
        # resolve() replaces the method by its stored ones before resolving anything; only a
        # direct call (the `dite accel` listing) gets here.
        self.data()
        raise ConfigError("tuned(file=...) stands for the methods in its file: build plans with "
                          "dite.accel.resolve, which expands it")

    def edit(self, drafts: list[StepDraft], ctx: PlanContext) -> None:  # pragma: no cover - expanded first
        raise ConfigError("tuned(file=...) must be expanded by dite.accel.resolve before plans are built")


def expand_tuned(methods: list[Method], ctx: PlanContext) -> list[Method]:
    """Each tuned(file=...) replaced by its stored methods (at most one per call)."""
    tuned = [m for m in methods if isinstance(m, Tuned)]
    if len(tuned) > 1:
        raise ConfigError("tuned given twice: one tuned file per call")
    if not tuned:
        return methods
    return [e for m in methods for e in (m.expand(ctx) if isinstance(m, Tuned) else [m])]


def call_steps(accel, steps: int, pipe, size: tuple[int, int]) -> int:
    """The steps a call runs: `steps`, or, under tuned(file=...), the file's step count once
    the file is checked against the pipeline (fingerprint, scheduler) and the call (latent
    `size`, `steps` asked for)."""
    from dite.accel.build import as_methods

    tuned = [m for m in as_methods(accel) if isinstance(m, Tuned)]
    if not tuned:
        return steps
    if len(tuned) > 1:
        raise ConfigError("tuned given twice: one tuned file per call")
    method = tuned[0]
    data = method.data()
    valid = data["valid_for"]
    if valid["model_id"] != pipe.model_id:
        raise _mismatch(method.file, f"another model ({valid.get('model', '?')}, fingerprint {valid['model_id']}; "
                                     f"this one is {pipe.model_id})", " on this model")
    difference = _scheduler_difference(valid["scheduler"], pipe.scheduler)
    if difference:
        raise _mismatch(method.file, difference, " with this scheduler")
    if list(size) != list(valid["latent_size"]):
        factor = pipe.vae_scale_factor
        raise _mismatch(method.file, f"size {valid['size']}, this call is {size[1] * factor}x{size[0] * factor}",
                        f" with --size {size[1] * factor}x{size[0] * factor}")
    if steps != valid["steps"]:
        raise _mismatch(method.file, f"{valid['steps']} steps, this call asks for {steps}",
                        f" with --steps {steps}, or ask for {valid['steps']} steps")
    return data["steps"]
