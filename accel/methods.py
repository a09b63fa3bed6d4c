"""The seed acceleration methods, each a frozen dataclass of settings that turns into
per-step plan edits. Defaults left as None are derived from the model's depth and the
number of steps (see each `resolved`), so one spec works on every family and size.

Reference settings (docs/acceleration.md): DiTCache and PromptGate from mindone's
SD3-medium pipeline (24 blocks, 28 steps), ToDo from mindone's MMDiT port, Δ-Cache a
reconstruction of Δ-DiT (its code is unpublished; the choices marked "ours" are ours).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import ClassVar

from dite.engine.errors import ConfigError
from dite.engine.families import FAMILIES
from dite.models.plan import ADAPTIVE_JUDGES, ADAPTIVE_SIGNALS, FORECAST_COORDS, AttentionPolicy, RangeOp

INTERPOLATION_MODES = ("bilinear", "bicubic", "nearest", "nearest-exact", "area")


FAMILY_CFG_ROW_ORDER = {f.name: f.cfg_row_order for f in FAMILIES}


@dataclass(frozen=True)
class PlanContext:
    """What plan building needs to know about one call. `model_id` fingerprints the
    weights (calibrated plans are refused on another model); `cfg_row_order` is the row order of
    the guided batch."""

    family: str
    depth: int
    steps: int
    guided: bool
    model_id: str = ""

    @property
    def cfg_row_order(self) -> str:
        return FAMILY_CFG_ROW_ORDER.get(self.family, "uncond_first") if self.guided else "none"


@dataclass
class StepDraft:
    """One step's plan while methods add to it (turned into a frozen StepPlan at the end)."""

    ranges: list[RangeOp]
    attention: list[AttentionPolicy | None]
    cfg_mode: str = "both"


class Method:
    """Base of every method: `name` in specs, a one-line `summary`, and the two hooks."""

    name: ClassVar[str]
    summary: ClassVar[str]
    # What the method edits; two methods editing the same thing conflict.
    edits: ClassVar[str]

    def resolved(self, ctx: PlanContext) -> "Method":  # pragma: no cover - every method overrides
        raise NotImplementedError

    def edit(self, drafts: list[StepDraft], ctx: PlanContext) -> None:  # pragma: no cover
        raise NotImplementedError

    def settings(self) -> dict:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        if values.get("order") == 0 and self.name != "adaptive":
            # Without a forecast there is no coordinate: the spec reads as it always did.
            values.pop("order")
            values.pop("coord", None)
        return values

    def spec(self) -> str:
        # A setting left unset (None: resolved per call) is left out, so the spec parses back
        # to the same method.
        args = ",".join(f"{k}={_format(v)}" for k, v in self.settings().items() if v is not None)
        return f"{self.name}({args})"


def merge_policy(draft: StepDraft, block: int, **fields) -> None:
    """Set attention fields of one block in one step, keeping what other methods set.
    ToDo's downsampled keys and WA-RS's band both assume their own key sequence, so the two
    never share a layer."""
    merged = replace(draft.attention[block] or AttentionPolicy(), **fields)
    if merged.kind == "window" and merged.downsamples_kv:
        raise ConfigError(f"block {block}: ToDo (downsampled keys) and DiTFastAttn's window attention cannot share "
                          "a layer; restrict todo(blocks=...) to other blocks")
    draft.attention[block] = merged


def _format(value) -> str:
    if isinstance(value, tuple):
        return f"{value[0]}:{value[1]}"
    return str(value)


def _check_blocks(name: str, blocks: tuple[int, int], depth: int) -> None:
    a, b = blocks
    if not 0 <= a < b <= depth:
        raise ConfigError(f"{name}: blocks={a}:{b} is not a range inside the model's {depth} blocks (0:{depth})")


def check_forecast(name: str, order, coord) -> None:
    if not isinstance(order, int) or isinstance(order, bool) or not 0 <= order <= 3:
        raise ConfigError(f"{name}: order={order!r} must be 0 (re-add the last delta), 1, 2 or 3 (forecast)")
    if coord not in FORECAST_COORDS:
        raise ConfigError(f"{name}: coord={coord!r} must be one of {', '.join(FORECAST_COORDS)}")


def _check_step(name: str, what: str, step: int, low: int, steps: int) -> None:
    if not low <= step < steps:
        raise ConfigError(f"{name}: {what}={step} must be in [{low}, {steps - 1}] for {steps} steps")


@dataclass(frozen=True)
class DiTCache(Method):
    """Skip a middle block range on alternate late steps, reusing the delta it added the last
    time it ran (both streams, per batch row).

    Schedule (explicit for any stride): steps before `start_step - 1` run plainly; from
    step r = start_step - 1 on, steps r, r + stride, r + 2*stride, ... run the range and
    record its delta, the others reuse it. stride 2 reproduces the reference (record 9,
    11, ..., 27; reuse 10, 12, ..., 26 of 28). The reference's own rule, `i % stride ==
    start_step % 2`, hard-codes the 2 and is only meaningful for stride 2.
    """

    name: ClassVar[str] = "ditcache"
    summary: ClassVar[str] = "block-range delta cache on a fixed alternating schedule (mindone, SD3)"
    edits: ClassVar[str] = "ranges"
    blocks: tuple[int, int] | None = None
    start_step: int | None = None
    stride: int = 2
    order: int = 0
    coord: str = "step"

    def resolved(self, ctx: PlanContext) -> "DiTCache":
        # SD3-medium: [1, 21) of 24 leaves block 0 and the last 3 (1/8) running; the same
        # proportions for other depths (28 -> [1, 24)). Start 10 of 28 scales with steps.
        blocks = self.blocks or (1, ctx.depth - max(1, round(ctx.depth / 8)))
        start = self.start_step if self.start_step is not None else max(1, round(ctx.steps * 10 / 28))
        _check_blocks(self.name, blocks, ctx.depth)
        _check_step(self.name, "start_step", start, 1, ctx.steps)
        if not isinstance(self.stride, int) or self.stride < 2:
            raise ConfigError(f"{self.name}: stride={self.stride} must be an integer >= 2 (1 would never reuse)")
        check_forecast(self.name, self.order, self.coord)
        return replace(self, blocks=blocks, start_step=start)

    def edit(self, drafts: list[StepDraft], ctx: PlanContext) -> None:
        record = self.start_step - 1
        # A forecast needs order + 1 records: with order > 0 the steps before the schedule
        # record too (they run the range anyway; recording costs one subtraction).
        first = 0 if self.order else record
        for i in range(first, ctx.steps):
            action = "record" if i < record or (i - record) % self.stride == 0 else "apply"
            drafts[i].ranges.append(RangeOp(*self.blocks, action, order=self.order, coord=self.coord))


@dataclass(frozen=True)
class DeltaCache(Method):
    """Δ-DiT's Δ-Cache: before the boundary step the rear `cached_blocks` blocks are cached,
    from it on the front ones; within each stage every `interval`-th step (counted from
    the stage's first step, so a compute step is forced at the switch) runs and records.

    Defaults reconstructed from the paper's PixArt-α 20-step setting (N=2, N_c=21 of 28,
    b=12): cached_blocks = 3/4 of the depth and boundary = 0.6 of the steps (ours).
    """

    name: ClassVar[str] = "deltacache"
    summary: ClassVar[str] = "Δ-DiT: rear blocks cached early, front blocks late (reconstruction)"
    edits: ClassVar[str] = "ranges"
    interval: int = 2
    cached_blocks: int | None = None
    boundary: int | None = None
    order: int = 0
    coord: str = "step"

    def resolved(self, ctx: PlanContext) -> "DeltaCache":
        cached = self.cached_blocks if self.cached_blocks is not None else max(1, round(ctx.depth * 3 / 4))
        boundary = self.boundary if self.boundary is not None else round(ctx.steps * 0.6)
        if not 1 <= cached <= ctx.depth:
            raise ConfigError(f"{self.name}: cached_blocks={cached} must be in [1, {ctx.depth}]")
        if not 0 <= boundary <= ctx.steps:
            raise ConfigError(f"{self.name}: boundary={boundary} must be in [0, {ctx.steps}]")
        if not isinstance(self.interval, int) or self.interval < 2:
            raise ConfigError(f"{self.name}: interval={self.interval} must be an integer >= 2")
        check_forecast(self.name, self.order, self.coord)
        return replace(self, cached_blocks=cached, boundary=boundary)

    def edit(self, drafts: list[StepDraft], ctx: PlanContext) -> None:
        for i in range(ctx.steps):
            early = i < self.boundary
            blocks = (ctx.depth - self.cached_blocks, ctx.depth) if early else (0, self.cached_blocks)
            stage_start = 0 if early else self.boundary
            action = "record" if (i - stage_start) % self.interval == 0 else "apply"
            drafts[i].ranges.append(RangeOp(*blocks, action, order=self.order, coord=self.coord))


@dataclass(frozen=True)
class PromptGate(Method):
    """From `step` on the unconditional rows leave the batch and guidance stops (20 of 28
    on SD3; the same fraction of any step count). Per-row caches keep the conditional rows."""

    name: ClassVar[str] = "promptgate"
    summary: ClassVar[str] = "drop the unconditional CFG branch from a gate step on (mindone, SD3)"
    edits: ClassVar[str] = "cfg"
    step: int | None = None

    def resolved(self, ctx: PlanContext) -> "PromptGate":
        if not ctx.guided:
            raise ConfigError(f"{self.name} drops the unconditional branch, but this call has none "
                              "(guidance_scale <= 1): raise guidance_scale or leave promptgate out")
        step = self.step if self.step is not None else max(1, round(ctx.steps * 20 / 28))
        _check_step(self.name, "step", step, 1, ctx.steps)
        return replace(self, step=step)

    def edit(self, drafts: list[StepDraft], ctx: PlanContext) -> None:
        for draft in drafts[self.step:]:
            draft.cfg_mode = "cond_only"


@dataclass(frozen=True)
class ToDo(Method):
    """Keys and values of the image tokens from their 2-D grid downsampled by `factor` per
    side (queries and text tokens full), on blocks [a, b), every step, both CFG branches.

    SD3 reference: factor 1.6, bilinear, blocks 0-11 of 24. For DiT and PixArt (their
    self-attention only) no reference exists; the same factor on the first half of the
    blocks is our default.
    """

    name: ClassVar[str] = "todo"
    summary: ClassVar[str] = "downsample image keys/values on the token grid (ToDo, mindone's MMDiT port)"
    edits: ClassVar[str] = "kv"
    factor: float = 1.6
    blocks: tuple[int, int] | None = None
    mode: str = "bilinear"

    def resolved(self, ctx: PlanContext) -> "ToDo":
        blocks = self.blocks or (0, max(1, ctx.depth // 2))
        _check_blocks(self.name, blocks, ctx.depth)
        if not isinstance(self.factor, (int, float)) or self.factor < 1:
            raise ConfigError(f"{self.name}: factor={self.factor} must be >= 1 (it divides the grid side)")
        if self.mode not in INTERPOLATION_MODES:
            raise ConfigError(f"{self.name}: mode={self.mode!r} is not one of {INTERPOLATION_MODES}")
        return replace(self, blocks=blocks, factor=float(self.factor))

    def edit(self, drafts: list[StepDraft], ctx: PlanContext) -> None:
        for draft in drafts:
            for k in range(*self.blocks):
                merge_policy(draft, k, kv_factor=self.factor, kv_mode=self.mode)


@dataclass(frozen=True)
class Adaptive(Method):
    """The dynamic block cache, decided per sample at run time.

    `front` blocks always run; how much their output changed since a sample last ran the
    middle blocks decides whether it runs them now (and records their delta) or gets the
    delta forecast from its history (`order`, in `coord`); `back` blocks always run. The
    first `warmup` steps always run, a sample never reuses more than `max_cached` steps in a
    row, and `threshold` is the relative L1 change that makes it run. Defaults are the best
    measured on the demo models (README, "Forecasting and adaptive caching").
    """

    name: ClassVar[str] = "adaptive"
    summary: ClassVar[str] = "per-sample dynamic block cache with forecast deltas (decided at run time)"
    edits: ClassVar[str] = "ranges"
    front: int = 1
    back: int = 0
    threshold: float = 0.08
    warmup: int | None = None
    max_cached: int = 4
    order: int = 1
    coord: str = "step"
    signal: str = "residual"
    judge: str = "last"

    def resolved(self, ctx: PlanContext) -> "Adaptive":
        for what in ("front", "back", "max_cached"):
            value = getattr(self, what)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{self.name}: {what}={value!r} must be an integer >= 0")
        if self.front + self.back >= ctx.depth:
            raise ConfigError(f"{self.name}: front={self.front} + back={self.back} leave no middle blocks to cache "
                              f"in a {ctx.depth}-block model")
        if self.max_cached < 1:
            raise ConfigError(f"{self.name}: max_cached={self.max_cached} must be >= 1 (0 would never reuse)")
        threshold = self.threshold
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not 0 <= threshold < float("inf"):
            raise ConfigError(f"{self.name}: threshold={threshold!r} must be a finite number >= 0")
        check_forecast(self.name, self.order, self.coord)
        if self.signal not in ADAPTIVE_SIGNALS:
            raise ConfigError(f"{self.name}: signal={self.signal!r} must be one of {', '.join(ADAPTIVE_SIGNALS)}")
        if self.judge not in ADAPTIVE_JUDGES:
            raise ConfigError(f"{self.name}: judge={self.judge!r} must be one of {', '.join(ADAPTIVE_JUDGES)}")
        if self.signal == "residual" and self.front == 0:
            raise ConfigError(f"{self.name}: signal=residual is what the front blocks add, so it needs front >= 1; "
                              "use signal=hidden with front=0")
        # Warm-up: the first 2/7 of the steps (8 of 28, as cache-dit) always run: the early
        # steps change the image most, and the forecast needs a history. Measured on
        # demo-sd3 (4 held-out prompts): 8 of 28 gave 65.1 dB at compute 0.673 where 4 of 28
        # gave 59 dB at 0.62 (README, "Forecasting and adaptive caching").
        warmup = self.warmup if self.warmup is not None else max(1, round(ctx.steps * 8 / 28))
        if not isinstance(warmup, int) or not 1 <= warmup <= ctx.steps:
            raise ConfigError(f"{self.name}: warmup={warmup!r} must be an integer in [1, {ctx.steps}]")
        return replace(self, warmup=warmup, threshold=float(threshold))

    def edit(self, drafts: list[StepDraft], ctx: PlanContext) -> None:
        for i, draft in enumerate(drafts):
            draft.ranges.append(RangeOp(self.front, ctx.depth - self.back, "adaptive", order=self.order,
                                        coord=self.coord, threshold=self.threshold, max_cached=self.max_cached,
                                        force=i < self.warmup, signal=self.signal, judge=self.judge))
