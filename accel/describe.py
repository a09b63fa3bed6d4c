"""`dite accel`: every method, its parameters, and what they resolve to on each family's
reference configuration."""

from __future__ import annotations

import dataclasses

from dite.accel.methods import PlanContext
from dite.accel.registry import METHODS
from dite.engine.errors import ConfigError

# (family, depth, steps) of the reference models: SD3-medium 28 steps, PixArt-α/Σ XL-2
# with DPM-Solver 20 steps, DiT-XL/2 with diffusers' 50 steps.
REFERENCE_CONTEXTS = (
    ("sd3", PlanContext("sd3", 24, 28, True), "SD3-medium, 24 blocks, 28 steps"),
    ("pixart", PlanContext("pixart", 28, 20, True), "PixArt XL-2, 28 blocks, 20 steps"),
    ("dit", PlanContext("dit", 28, 50, True), "DiT-XL/2, 28 blocks, 50 steps"),
)


def describe_methods() -> list[dict]:
    out = []
    for name, cls in METHODS.items():
        defaults = {}
        for family, ctx, _ in REFERENCE_CONTEXTS:
            try:
                defaults[family] = cls().resolved(ctx).spec()
            except ConfigError as exc:  # a method that needs an argument (fastattn's plan file)
                defaults[family] = f"no default: {exc}"
        params = {f.name: {"type": str(f.type), "default": f.default} for f in dataclasses.fields(cls)}
        doc = " ".join((cls.__doc__ or "").split())
        out.append({"name": name, "summary": cls.summary, "parameters": params, "defaults": defaults, "doc": doc})
    return out


def format_methods() -> str:
    lines = ["Acceleration methods (combine with +, e.g. --accel \"ditcache+promptgate+todo(factor=2)\"):", ""]
    for m in describe_methods():
        lines.append(f"{m['name']}: {m['summary']}")
        params = ", ".join(f"{k}: {v['type']} = {'auto' if v['default'] is None else v['default']}"
                           for k, v in m["parameters"].items())
        lines.append(f"  parameters: {params}   (auto = derived from depth and steps)")
        for family, _, label in REFERENCE_CONTEXTS:
            lines.append(f"  {family:<7}{m['defaults'][family]:<50} [{label}]")
        lines.append("")
    return "\n".join(lines)
