"""`dite tune`: the acceleration that keeps images closest to plain sampling within a budget.

Objective: the mean PSNR over calibration prompts of each prompt's image against its own
plain image (same seed, same requested step count T), with the mean compute within the
budget: out.stats `compute_fraction` (block evaluations x rows against the plain T-step
call), or `flops_ratio` with metric="flops". The winner is written to a tuned file that
accel="tuned(file=F)" (accel/tuned.py) runs.

Calibration inputs are never evaluation inputs: text models get a short built-in list of
simple generic prompts (for the demo model, training captions, none of its held-out ones)
or the user's; class-conditional models seeded labels from the model's named classes (as
`dite calibrate` draws them). Seed 1000 on: away from the seeds evaluations start at.

Search (one line printed per measured candidate):
 1. the plain T-step images of every calibration prompt (the references), and the baseline:
    plain sampling with the largest N steps with N/T <= budget, against them;
 2. static candidates, measured on the first `screen` prompts. Their compute is known from
    their plans before anything runs (block evaluations x rows; FLOPs on a meta copy of the
    model with metric="flops"), so each is measured once, at the setting that spends the most
    budget: ditcache(order, stride) at the latest start_step that fits (the best three by
    PSNR also over blocks 1..depth instead of the default range), deltacache(order) at the
    smallest interval and cached_blocks that fit; then the best three again with
    +promptgate (guided calls; metric="flops" also +todo, +fastattn plans), re-fitted;
 3. schedule(run=...), on every calibration input: which steps run blocks 1..depth, by greedy
    removal from "every step" until the budget is met (engine/runtime/tune_schedule.py),
    for forecast orders 1 and 2;
 4. adaptive, on every calibration input: a coordinate search from the method's default
    settings over max_cached, order, front, back (one axis at a time around the defaults,
    then around the best), then +promptgate; at each point the threshold is bisected on a log scale for the
    smallest one whose compute is within the budget (compute does not rise with it).
    Settings that cannot reach the budget even when caching whenever allowed are skipped
    without running;
 5. the best `top` static candidates by screen PSNR measured on every calibration input:
    the best within budget of everything measured there wins. Fewer steps is always a
    contender, so the winner is never worse than it on the calibration inputs.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from dite.accel.build import as_methods, build_plans, resolve
from dite.accel.fastattn import read_plan
from dite.accel.methods import Adaptive, PlanContext
from dite.accel.tuned import TUNED_FORMAT
from dite.engine.errors import ConfigError, InputError
from dite.engine.runtime.tune_schedule import search_schedules
from dite.engine.version import dite_version

# Simple, generic prompts. For the demo SD3 they are training captions (none held out).
DEFAULT_PROMPTS = (
    "a red circle on the left", "a large blue square in the center", "a small yellow triangle at the top right",
    "At the bottom left, a green square", "a purple circle in the middle", "a cyan triangle at the bottom",
    "a large yellow square at the right", "a small purple square at the bottom right",
)
DEFAULT_SEED = 1000
PSNR_CAP = 100.0  # dB for identical images (PSNR is infinite there)
METRICS = {"compute": "compute_fraction", "flops": "flops_ratio"}
DITCACHE_ORDERS, DITCACHE_STRIDES = (0, 1, 2), (2, 3, 4)
DELTACACHE_ORDERS, DELTACACHE_INTERVALS = (0, 1, 2), (2, 3, 4)
# The adaptive search starts from the method's own defaults (the best measured on the demos).
ADAPTIVE_START = {key: getattr(Adaptive, key) for key in ("max_cached", "order", "front", "back")}
ADAPTIVE_AXES = (("max_cached", (2, 3, 4, 6)), ("order", (1, 2)), ("front", (1, 2)), ("back", (0, 1)))
FAMILIES = ("ditcache", "deltacache", "schedule", "adaptive")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return PSNR_CAP if mse == 0 else min(PSNR_CAP, 10 * math.log10(1.0 / mse))


@dataclass
class Measured:
    """One candidate measured on the first `images` calibration inputs."""

    kind: str  # fewer-steps, static, adaptive
    spec: str  # accel spec as run ("" = plain)
    steps: int  # steps run
    images: int
    compute: float  # compute_fraction against the plain T-step call
    flops: float  # flops_ratio against the plain T-step call
    psnrs: list[float]
    seconds: float
    resolved: str  # out.stats["accel"]: every setting spelled out
    params: dict = field(default_factory=dict)  # adaptive: its settings (threshold re-fitting)

    @property
    def psnr(self) -> float:
        return float(np.mean(self.psnrs))

    def row(self, budget: float, metric: str) -> dict:
        return {"spec": self.resolved if self.kind != "fewer-steps" else "none", "steps": self.steps,
                "kind": self.kind, "compute_fraction": round(self.compute, 5), "flops_ratio": round(self.flops, 5),
                "psnr_db": round(self.psnr, 3), "prompts": self.images,
                "within_budget": self.cost(metric) <= budget + 1e-9}

    def cost(self, metric: str) -> float:
        return self.compute if metric == "compute" else self.flops


class Tuner:
    def __init__(self, pipe, budget: float, *, steps: int | None = None, guidance: float | None = None,
                 size: tuple[int, int] | None = None, prompts=None, class_labels=None, calibration: int = 4,
                 screen: int = 2, metric: str = "compute", fastattn_plans=(), seed: int = DEFAULT_SEED,
                 negative_prompt=None, top: int = 5, methods=FAMILIES, log: Callable[[str], None] = print):
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) \
                or not 0 < budget <= 1:
            raise ConfigError(f"budget {budget!r} must be a number in (0, 1]: the share of the plain call's "
                              "compute to keep")
        if metric not in METRICS:
            raise ConfigError(f"metric {metric!r}: choose compute (block evaluations) or flops")
        for name, value in (("calibration", calibration), ("screen", screen), ("top", top)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        unknown = set(methods) - set(FAMILIES)
        if unknown:
            raise ConfigError(f"unknown method families {sorted(unknown)}; choose from {', '.join(FAMILIES)}")
        self.fastattn_plans = [str(p) for p in fastattn_plans]
        for plan in self.fastattn_plans:
            read_plan(plan)  # a missing or foreign file fails now, not mid-search
        if self.fastattn_plans and metric != "flops":
            raise ConfigError("fastattn plans save attention FLOPs, not block evaluations: tune them with "
                              "metric='flops' (--metric flops)")
        self.pipe, self.budget, self.metric, self.top, self.methods, self.log = pipe, float(budget), metric, top, \
            tuple(methods), log
        self.seed, self.negative_prompt = seed, negative_prompt
        self.depth = len(pipe.transformer.blocks)
        if pipe.family == "dit":
            if prompts:
                raise ConfigError("this is a class-conditional DiT: tune it with class labels, not prompts")
            labels = list(class_labels) if class_labels else self._default_labels(calibration)
            self.inputs = labels
        else:
            if class_labels:
                raise ConfigError(f"this is a text-to-image model ({pipe.family}): tune it with prompts, "
                                  "not class labels")
            texts = list(prompts) if prompts else [DEFAULT_PROMPTS[k % len(DEFAULT_PROMPTS)]
                                                   for k in range(calibration)]
            if not all(isinstance(t, str) and t.strip() for t in texts):
                raise ConfigError("calibration prompts must be non-empty strings")
            self.inputs = texts
        self.screen = min(screen, len(self.inputs))
        self.common = dict(seed=seed, output_type="np", progress=False)
        if guidance is not None:
            self.common["guidance_scale"] = guidance
        if size is not None:
            self.common["width"], self.common["height"] = size
        self.requested_steps = steps
        self.runs, self.measured = 0, []
        self._memo: dict = {}
        self._costs: dict = {}
        self.meta = None

    def _default_labels(self, n: int) -> list:
        known = sorted(set(self.pipe.labels.values())) or list(range(self.pipe.transformer.config.num_classes))
        picks = torch.randint(0, len(known), (n,), generator=torch.Generator().manual_seed(self.seed))
        return [known[k] for k in picks.tolist()]

    # --- running ------------------------------------------------------------------

    def _call(self, spec: str, steps: int | None, k: int, hook=None):
        kw = dict(self.common, accel=spec or None)
        if steps is not None:
            kw["num_inference_steps"] = steps
        if hook is not None:
            kw["plan_hook"] = hook
        if self.pipe.family == "dit":
            return self.pipe(class_labels=self.inputs[:k], **kw)
        if self.negative_prompt is not None:
            kw["negative_prompt"] = self.negative_prompt
        return self.pipe(prompt=self.inputs[:k], **kw)

    def references(self) -> None:
        captured = {}

        def hook(i, x, t, cond, plan, state):
            if i == 0:
                captured["x"], captured["cond"] = x, cond
            return plan

        start = time.perf_counter()
        out = self._call("", self.requested_steps, len(self.inputs), hook)
        self.runs += 1
        self.reference = out.images
        first = out.parameters[0]
        self.steps, self.guidance = first["steps"], first["guidance"]
        self.guided = self.guidance > 1.0
        self.size_text, self.latent_size = first["size"], list(out.latents.shape[-2:])
        x = captured["x"]
        self.x_shape = (x.shape[0] // (2 if captured["cond"].guided else 1), *x.shape[1:])
        self.cond = captured["cond"]
        self.ctx = PlanContext(self.pipe.family, self.depth, self.steps, self.guided, self.pipe.model_id)
        self.log(f"references: plain {self.steps} steps on {len(self.inputs)} calibration "
                 f"{'labels' if self.pipe.family == 'dit' else 'prompts'}, guidance {self.guidance}, "
                 f"{self.size_text} ({time.perf_counter() - start:.1f}s)")

    def measure(self, kind: str, spec: str, steps: int, k: int, params: dict | None = None) -> Measured | None:
        key = (spec, steps, k)
        if key in self._memo:
            return self._memo[key]
        start = time.perf_counter()
        try:
            out = self._call(spec, steps, k)
        except ConfigError as exc:  # a combination the methods refuse: not a candidate
            self.log(f"  skip {spec}: {exc}")
            self._memo[key] = None
            return None
        self.runs += 1
        stats, scale = out.stats, steps / self.steps
        m = Measured(kind, spec, steps, k, stats["compute_fraction"] * scale, stats["flops_ratio"] * scale,
                     [psnr(a, b) for a, b in zip(out.images, self.reference[:k])], time.perf_counter() - start,
                     stats["accel"], dict(params or {}))
        self._memo[key] = m
        self.measured.append(m)
        over = "" if m.cost(self.metric) <= self.budget + 1e-9 else "  (over budget)"
        shown = spec if spec else f"plain, {steps} of {self.steps} steps"
        self.log(f"  [{self.runs:3d}] {shown:<62} compute {m.compute:.3f} flops {m.flops:.3f}  "
                 f"PSNR {m.psnr:6.2f} dB  ({k} {'inputs' if k != 1 else 'input'}, {m.seconds:.1f}s){over}")
        return m

    # --- static costs -------------------------------------------------------------

    def cost(self, spec: str) -> float:
        """The compute (or FLOPs ratio) of a static spec from its plans, without running it."""
        if spec in self._costs:
            return self._costs[spec]
        methods = resolve(as_methods(spec), self.ctx)
        plans = build_plans(methods, self.ctx)
        plain_rows = 2 if self.guided else 1
        if self.metric == "compute":
            blocks = sum((plain_rows if p.cfg_mode == "both" else 1) * len(p.computed_blocks(self.depth))
                         for p in plans)
            value = blocks / (self.steps * plain_rows * self.depth)
        else:
            from dite.engine.runtime.accounting import meta_copy, step_flops
            from dite.models.plan import PLAIN_STEP

            if self.meta is None:
                self.meta = meta_copy(self.pipe.transformer)
                self._plain_flops = sum(s["total"] for s in step_flops(self.meta, [PLAIN_STEP] * self.steps,
                                                                       self.x_shape, self.cond))
            value = sum(s["total"] for s in step_flops(self.meta, plans, self.x_shape, self.cond)) / self._plain_flops
        self._costs[spec] = value
        return value

    def _fits(self, spec: str) -> bool:
        try:
            return self.cost(spec) <= self.budget + 1e-9
        except ConfigError:
            return False

    def first_fitting(self, values: list, spec_of: Callable) -> str | None:
        """`values` ordered by non-increasing cost: the spec of the first that fits (bisection)."""
        if not values or not self._fits(spec_of(values[-1])):
            return None
        lo, hi = 0, len(values) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if self._fits(spec_of(values[mid])):
                hi = mid
            else:
                lo = mid + 1
        return spec_of(values[lo])

    def addons(self) -> list[str]:
        """What may be added to a block cache: promptgate (guided), and with metric="flops"
        todo and each fastattn plan (also with promptgate)."""
        gate = ["promptgate"] if self.guided else []
        extra = ["todo"] + [f"fastattn(plan={p})" for p in self.fastattn_plans] if self.metric == "flops" else []
        return gate + extra + [f"{g}+{e}" for g in gate for e in extra]

    def fit_ditcache(self, order: int, stride: int, blocks, addon: str = "") -> str | None:
        span = "" if blocks is None else f",blocks={blocks[0]}:{blocks[1]}"
        tail = f"+{addon}" if addon else ""
        return self.first_fitting(list(range(self.steps - 1, 0, -1)),
                                  lambda s: f"ditcache(order={order},stride={stride},start_step={s}{span}){tail}")

    def fit_deltacache(self, order: int, addon: str = "") -> str | None:
        tail = f"+{addon}" if addon else ""
        for interval in DELTACACHE_INTERVALS:
            spec = self.first_fitting(
                list(range(1, self.depth + 1)),
                lambda c: f"deltacache(order={order},interval={interval},cached_blocks={c}){tail}")
            if spec:
                return spec
        return None

    # --- adaptive -----------------------------------------------------------------

    def adaptive_spec(self, p: dict, threshold: float) -> str:
        spec = (f"adaptive(order={p['order']},front={p['front']},back={p['back']},max_cached={p['max_cached']},"
                f"threshold={threshold:.4g})")
        return spec + (f"+{p['addon']}" if p.get("addon") else "")

    def adaptive_floor(self, p: dict) -> float:
        """The compute when every sample caches whenever it may (threshold -> infinity):
        after the warm-up, the middle blocks run once every max_cached + 1 steps."""
        warmup = Adaptive().resolved(self.ctx).warmup
        gate = None
        if "promptgate" in p.get("addon", ""):
            from dite.accel.methods import PromptGate

            gate = PromptGate().resolved(self.ctx).step
        plain_rows = 2 if self.guided else 1
        total, streak = 0, 0
        for i in range(self.steps):
            rows = 1 if gate is not None and i >= gate else plain_rows
            run = i < warmup or streak >= p["max_cached"]
            total += rows * (self.depth if run else p["front"] + p["back"])
            streak = 0 if run else streak + 1
        return total / (self.steps * plain_rows * self.depth)

    def bisect(self, p: dict, k: int, guess: float, evals: int) -> Measured | None:
        """The adaptive cache at settings `p` with the threshold that spends the budget on the
        first k inputs (`search_threshold`); None where even caching whenever allowed exceeds
        the budget (known without running)."""
        if p["front"] + p["back"] >= self.depth:
            return None
        floor = self.adaptive_floor(p)
        if floor > self.budget + (0.0 if self.metric == "compute" else 0.02):
            self.log(f"  skip {self.adaptive_spec(p, 0)}: at least {floor:.3f} even caching whenever allowed")
            return None
        return search_threshold(
            lambda t: self.measure("adaptive", self.adaptive_spec(p, t), self.steps, k, {**p, "threshold": t}),
            lambda m: m.cost(self.metric), self.budget, guess, evals)

    def search_adaptive(self, k: int) -> list[Measured]:
        """Coordinate search from the method's defaults: every other value of each axis, one
        axis at a time, around a centre (each point's threshold bisected); a second pass
        around the best if it moved; then the best with each add-on."""
        found, tried = [], set()

        def point(p: dict, guess: float, evals: int) -> Measured | None:
            key = tuple(p[a] for a in ADAPTIVE_START) + (p.get("addon", ""),)
            if key in tried:
                return None
            tried.add(key)
            m = self.bisect(p, k, guess, evals)
            if m:
                found.append(m)
            return m

        p = dict(ADAPTIVE_START, addon="")
        if self.adaptive_floor(p) > self.budget:  # start where the budget is reachable
            p["max_cached"] = max((v for axis, values in ADAPTIVE_AXES if axis == "max_cached" for v in values),
                                  default=p["max_cached"])
        best = point(p, Adaptive.threshold, 8)
        centre = dict(best.params) if best else p
        threshold = best.params["threshold"] if best else Adaptive.threshold
        for _ in range(2):  # a star around the centre: one axis changed at a time
            improved = False
            for axis, values in ADAPTIVE_AXES:
                for value in values:
                    trial = {**{a: centre[a] for a in ADAPTIVE_START}, "addon": "", axis: value}
                    m = point(trial, threshold, 6)
                    if m and (best is None or m.psnr > best.psnr):
                        best, improved = m, True
            if not improved:
                break
            centre, threshold = dict(best.params), best.params["threshold"]
        if best:
            for addon in self.addons():
                if "fastattn" in addon:  # the adaptive cache refuses DiTFastAttn's attention caches
                    continue
                point({**{a: best.params[a] for a in ADAPTIVE_START}, "addon": addon}, best.params["threshold"], 6)
        return found

    # --- the search ---------------------------------------------------------------

    def ditcache_bases(self, settings, blocks) -> list[tuple[str, Callable[[str], str | None]]]:
        """(label, fit(add-on) -> spec or None) for each (order, stride) in `settings`."""
        span = "" if blocks is None else f" {blocks[0]}:{blocks[1]}"
        return [(f"ditcache o{order} s{stride}{span}", lambda a, o=order, s=stride: self.fit_ditcache(o, s, blocks, a))
                for order, stride in settings]

    def deltacache_bases(self) -> list[tuple[str, Callable[[str], str | None]]]:
        return [(f"deltacache o{order}", lambda a, o=order: self.fit_deltacache(o, a)) for order in DELTACACHE_ORDERS]

    def screen_static(self, k: int) -> list[Measured]:
        """Static block caches fitted to the budget, measured on the first k inputs: every
        ditcache order x stride over the default blocks, the best three also over blocks
        1..depth, every deltacache order; then the best three with each add-on."""
        screened, fitted = [], {}

        def measure(bases):
            for label, fit in bases:
                spec = fit("")
                if spec is None:
                    self.log(f"  skip {label}: cannot fit the budget")
                    continue
                m = self.measure("static", spec, self.steps, k)
                if m:
                    fitted[label] = (fit, m)
                    screened.append(m)

        def best(n, prefix=""):
            ranked = sorted(((label, fm) for label, fm in fitted.items() if label.startswith(prefix)),
                            key=lambda x: -x[1][1].psnr)
            return ranked[:n]

        if "ditcache" in self.methods:
            grid = {f"ditcache o{o} s{s}": (o, s) for o in DITCACHE_ORDERS for s in DITCACHE_STRIDES}
            measure(self.ditcache_bases(grid.values(), None))
            measure(self.ditcache_bases([grid[label] for label, _ in best(3, "ditcache")], (1, self.depth)))
        if "deltacache" in self.methods:
            measure(self.deltacache_bases())
        for addon in self.addons():  # an add-on alone, where it fits
            if self._fits(addon):
                m = self.measure("static", addon, self.steps, k)
                if m:
                    screened.append(m)
        for label, (fit, _) in best(3):
            for addon in self.addons():
                spec = fit(addon)
                if spec:
                    m = self.measure("static", spec, self.steps, k)
                    if m:
                        screened.append(m)
        return screened

    def run(self) -> dict:
        start = time.perf_counter()
        self.references()
        n, k = len(self.inputs), self.screen
        self.log(f"budget {self.budget} ({METRICS[self.metric]}), screening on {k} of {n}")
        fewer = None
        few = int(math.floor(self.budget * self.steps + 1e-9))
        if few >= 1:
            fewer = self.measure("fewer-steps", "", few, n)
        results = self.screen_static(k)
        if "schedule" in self.methods:
            results += search_schedules(self, n)  # on every input: a schedule is fitted to them, as a threshold is
        # The adaptive threshold is fitted on every calibration input: its compute there is
        # what the budget bounds.
        adaptive = self.search_adaptive(n) if "adaptive" in self.methods else []
        # Final: the best `top` on every calibration input.
        finals = [fewer] if fewer else []
        if k < n:
            ranked, seen = [], set()
            for m in sorted(results, key=lambda m: -m.psnr):
                same = (m.compute, m.flops, tuple(m.psnrs))  # settings that made the same images count once
                if m.cost(self.metric) <= self.budget + 1e-9 and same not in seen:
                    seen.add(same)
                    ranked.append(m)
            self.log(f"final: the best {min(self.top, len(ranked))} static candidates on all {n} calibration "
                     "inputs")
            for m in ranked[:self.top]:
                full = self.measure(m.kind, m.spec, m.steps, n)
                if full:
                    finals.append(full)
        else:
            finals += results
        finals += adaptive
        feasible = [m for m in finals if m.cost(self.metric) <= self.budget + 1e-9 and m.images == n]
        if not feasible:
            raise ConfigError(f"nothing fits a budget of {self.budget}: not even 1 step of {self.steps}")
        choice = max(feasible, key=lambda m: (m.psnr, -m.cost(self.metric)))
        seconds = time.perf_counter() - start
        return self.result(choice, fewer, seconds)

    def result(self, choice: Measured, fewer: Measured | None, seconds: float) -> dict:
        n = len(self.inputs)
        rows, seen = [], set()
        for m in sorted(self.measured, key=lambda m: (m is not choice, m.images != n, -m.psnr)):
            key = (m.images, m.compute, m.flops, tuple(m.psnrs))  # settings that made the same images: once
            if key in seen or m.cost(self.metric) > self.budget + 1e-9:
                continue
            seen.add(key)
            rows.append(m.row(self.budget, self.metric))
        scheduler = self.pipe.scheduler
        calibration = {"class_labels": self.inputs} if self.pipe.family == "dit" else \
            {"prompts": self.inputs, "negative_prompt": self.negative_prompt}
        fewer_row = fewer.row(self.budget, self.metric) if fewer else None
        return {
            "format": TUNED_FORMAT,
            "spec": choice.resolved if choice.kind != "fewer-steps" else "none",
            "steps": choice.steps,
            "psnr_db": round(choice.psnr, 3),
            "compute_fraction": round(choice.compute, 5),
            "flops_ratio": round(choice.flops, 5),
            "budget": self.budget,
            "metric": self.metric,
            "valid_for": {
                "model": self.pipe.model_name or self.pipe.source, "model_id": self.pipe.model_id,
                "family": self.pipe.family, "depth": self.depth,
                "scheduler": {"class": type(scheduler).__name__,
                              "config": json.loads(json.dumps(scheduler.to_diffusers_config(), default=str))},
                "steps": self.steps, "guidance": self.guidance, "size": self.size_text,
                "latent_size": self.latent_size,
            },
            "calibration": {**calibration, "seed": self.seed, "inputs": n, "screen": self.screen,
                            "psnr_db_per_input": [round(x, 3) for x in choice.psnrs]},
            "fewer_steps": fewer_row,
            "candidates": rows[:12],
            "search": {"seconds": round(seconds, 1), "runs": self.runs, "measured": len(self.measured)},
            "dite_version": dite_version(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }


def search_threshold(measure_at: Callable[[float], "Measured | None"], cost: Callable[["Measured"], float],
                     budget: float, guess: float, evals: int) -> "Measured | None":
    """The best measured point within `budget` of a threshold search by `evals` runs, for
    thresholds where compute does not rise with the threshold but moves in steps (whole
    sample-steps of a block range; on one step the smallest threshold runs the most
    sensitive decisions), so the search does not stop at the first point under the budget:
    it multiplies or divides the threshold (by 1.2 to 4, by how far the compute is from the
    budget) until the budget is bracketed, then halves the bracket on a log scale until it is
    5 % wide. Used by the adaptive cache's and the step schedules' searches."""
    low = high = None  # thresholds known over budget / within budget
    best, t = None, guess
    for _ in range(evals):
        t = float(f"{t:.4g}")
        m = measure_at(t)
        if m is None:
            return best
        spent = cost(m)
        if spent <= budget + 1e-9:
            high = t if high is None else min(high, t)
            if best is None or m.psnr > best.psnr:
                best = m
        else:
            low = t if low is None else max(low, t)
        gap = abs(spent - budget)  # compute is steep in the threshold: small steps when close
        if high is None:
            if t >= 50:
                break
            t *= 1.2 if gap < 0.05 else 1.6 if gap < 0.15 else 4
        elif low is None:
            if t <= 1e-4:
                break
            t /= 1.2 if gap < 0.05 else 1.6 if gap < 0.15 else 4
        else:
            if high / low < 1.05:
                break
            t = math.sqrt(low * high)
    return best


def tune(pipe, budget: float, **options) -> dict:
    """Search methods and settings for `pipe` within `budget` (see the module docstring);
    returns the tuned file's data (write it with `write_tuned`)."""
    return Tuner(pipe, budget, **options).run()


def write_tuned(path: str | Path, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=1) + "\n")


def read_prompts(path: str | Path) -> list[str]:
    """A prompts file: one prompt a line; blank lines and lines starting with # are skipped."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise InputError(f"--prompts {path}: no such file") from None
    except (IsADirectoryError, UnicodeDecodeError) as exc:
        raise InputError(f"--prompts {path}: not a text file of prompts ({exc})") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise InputError(f"--prompts {path} holds no prompts (one a line)")
    return prompts
