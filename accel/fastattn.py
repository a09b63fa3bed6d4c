"""DiTFastAttn (thu-nics/DiTFastAttn): a calibrated plan of attention policies per (layer,
step), loaded from a JSON plan file written by `dite calibrate` (engine/runtime/calibrate.py).

A plan is only valid for the model, step count and sampling settings it was calibrated
with; the file records them and loading refuses a mismatch of model or step count.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from dite.accel.methods import Method, PlanContext, StepDraft, merge_policy
from dite.engine.errors import ConfigError

PLAN_FORMAT = "dite-fastattn-plan/1"
LABELS = {  # DiTFastAttn's method names -> (kind, cfg share)
    "full_attn": ("full", False),
    "full_attn+cfg_attn_share": ("full", True),
    "residual_window_attn": ("window", False),
    "residual_window_attn+cfg_attn_share": ("window", True),
    "output_share": ("share", False),
}


def model_fingerprint(transformer: torch.nn.Module) -> str:
    """A cheap identity of config and weights: the config, and the first values of every
    tensor (a fine-tune changes them; reading the whole model would cost seconds)."""
    digest = hashlib.sha256(json.dumps(transformer.config.to_dict(), sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in transformer.state_dict().items():
            if p.is_meta:
                continue
            digest.update(name.encode())
            digest.update(p.detach().flatten()[:8].to("cpu", torch.float32).numpy().tobytes())
    return digest.hexdigest()[:16]


def write_plan(path: str | Path, layers: list[list[str]], meta: dict) -> None:
    Path(path).write_text(json.dumps({"format": PLAN_FORMAT, **meta, "layers": layers}, indent=1))


def read_plan(path: str | Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"fastattn plan file {path} does not exist; make one with `dite calibrate`") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"fastattn plan file {path} is not JSON ({exc})") from None
    if data.get("format") != PLAN_FORMAT:
        raise ConfigError(f"{path} is not a dite DiTFastAttn plan (format {data.get('format')!r}, expected {PLAN_FORMAT})")
    bad = {label for layer in data["layers"] for label in layer} - set(LABELS)
    if bad:
        raise ConfigError(f"{path}: unknown attention methods {sorted(bad)}; known: {sorted(LABELS)}")
    return data


@dataclass(frozen=True)
class FastAttn(Method):
    """Attention policies per (layer, step) from a calibrated plan file: full attention,
    window attention + residual (WA-RS), output sharing (AST), CFG sharing (ASC)."""

    name: ClassVar[str] = "fastattn"
    summary: ClassVar[str] = "DiTFastAttn: calibrated window/shared attention per layer and step (plan from `dite calibrate`)"
    edits: ClassVar[str] = "kernel"
    plan: str | None = None

    def resolved(self, ctx: PlanContext) -> "FastAttn":
        if not self.plan:
            raise ConfigError("fastattn needs a plan file: fastattn(plan=FILE), made by `dite calibrate`")
        data = read_plan(self.plan)
        if data["steps"] != ctx.steps:
            raise ConfigError(f"{self.plan} was calibrated for {data['steps']} steps, this call runs {ctx.steps}: "
                              "calibrate again for this step count")
        if len(data["layers"]) != ctx.depth:
            raise ConfigError(f"{self.plan} has {len(data['layers'])} layers, this model {ctx.depth} blocks")
        if ctx.model_id and data.get("model_id") != ctx.model_id:
            raise ConfigError(f"{self.plan} was calibrated on another model ({data.get('model', '?')}, "
                              f"id {data.get('model_id')}; this one is {ctx.model_id}): calibrate again")
        return self

    def edit(self, drafts: list[StepDraft], ctx: PlanContext) -> None:
        data = read_plan(self.plan)
        window = int(data["window"])
        for block, labels in enumerate(data["layers"]):
            for step, label in enumerate(labels):
                kind, share = LABELS[label]
                if share and not ctx.guided:
                    share = False
                merge_policy(drafts[step], block, kind=kind, window=window,
                             cfg_share=ctx.cfg_row_order if share else None)
