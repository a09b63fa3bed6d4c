"""Step-plan types: the vocabulary that denoisers and the step runner read.

A plan says, for one denoising step, how each block and each attention layer runs, which
block ranges are computed, recorded or replaced by a cached delta, and whether both CFG
branches are in the batch. Plans are frozen dataclasses built before the sampling loop (by
`dite.accel`, which re-exports these types); models only read them and never import an
acceleration method. Two steps with equal plans run the same code path with the same
shapes, which is what lets a graph executor compile one static graph per distinct plan.
"""

from __future__ import annotations

from dataclasses import dataclass

from dite.engine.errors import ConfigError

CFG_MODES = ("both", "cond_only")
RANGE_ACTIONS = ("record", "apply", "adaptive")
# What a forecast is a polynomial in: the step index, or the scheduler's timestep value
# (sigma x 1000 for flow matching), which is uneven in the step index.
FORECAST_COORDS = ("step", "time")
# What the adaptive decision compares between steps: the hidden state entering the range
# ("hidden"), or what the front blocks added to the state after `prepare` ("residual").
ADAPTIVE_SIGNALS = ("hidden", "residual")
# What the signal is compared with: its value at the last step the range ran ("last"), or
# its forecast from the steps the range ran, by the range's own order ("forecast").
ADAPTIVE_JUDGES = ("last", "forecast")


ATTENTION_KINDS = ("full", "window", "share")
# Kernels of full attention (models/attention_kernels.py): PyTorch SDPA, the explicit
# matmul-softmax-matmul reference, Ascend's torch_npu.npu_fusion_attention.
ATTENTION_BACKENDS = ("sdpa", "math", "npu")


@dataclass(frozen=True)
class AttentionPolicy:
    """How one attention layer computes for one step.

    kind "full" is exact attention; "window" (DiTFastAttn's WA-RS) is band attention of
    half-width `window` tokens plus the residual (full - window) stored by this layer's
    last full step; "share" (AST) returns this layer's output from its last computed step.
    `cfg_share` (ASC) names the batch's CFG row order: attention runs on the conditional half
    only and its output is copied to both halves. `store_residual` / `store_output` make a
    computing step keep what a later step of the same layer will use.

    `kv_factor` > 1 (ToDo) computes the image tokens' keys and values from their 2-D token
    grid resized by 1/kv_factor per side (`kv_mode` interpolation) before the K/V
    projections; queries and text tokens stay full.

    `backend` is the kernel of full attention (one of ATTENTION_BACKENDS); executors set it
    from the pipeline's `attention` choice, so it is part of the plan a graph is built for.
    """

    kind: str = "full"
    window: int = 0
    cfg_share: str | None = None
    store_residual: bool = False
    store_output: bool = False
    kv_factor: float = 1.0
    kv_mode: str = "bilinear"
    backend: str = "sdpa"

    def __post_init__(self):
        if self.backend not in ATTENTION_BACKENDS:
            raise ConfigError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {self.backend!r}")
        if self.kind not in ATTENTION_KINDS:
            raise ConfigError(f"attention kind must be one of {ATTENTION_KINDS}, got {self.kind!r}")
        if self.cfg_share not in (None, "cond_first", "uncond_first"):
            raise ConfigError(f"cfg_share must be None, 'cond_first' or 'uncond_first', got {self.cfg_share!r}")
        if (self.kind == "window" or self.store_residual) and self.window < 0:
            raise ConfigError(f"window half-width must be >= 0, got {self.window}")

    @property
    def downsamples_kv(self) -> bool:
        return self.kv_factor != 1.0

    @property
    def label(self) -> str:
        """DiTFastAttn's name of the method (for plan files and stats)."""
        name = {"full": "full_attn", "window": "residual_window_attn", "share": "output_share"}[self.kind]
        return name + ("+cfg_attn_share" if self.cfg_share else "")


FULL_ATTENTION = AttentionPolicy()


@dataclass(frozen=True)
class BlockPlan:
    """What one block does in one step: the policy of its attention layer(s). `skip`: the
    block is an identity (every stream passes through unchanged), as skip-layer guidance's
    extra pass needs (engine/runtime/slg.py)."""

    attention: AttentionPolicy = FULL_ATTENTION
    skip: bool = False


PLAIN_BLOCK = BlockPlan()


@dataclass(frozen=True)
class RangeOp:
    """Blocks [start, stop) either run and record their delta (out - in, per stream and
    batch row) ("record"), or do not run: out = in + the delta recorded for this range
    ("apply"), or decide per sample at run time which of the two to do ("adaptive").

    `order` > 0 replaces the last delta by its forecast: the polynomial of degree `order`
    through the range's last order + 1 recorded deltas (per row), evaluated at this step's
    `coord` ("step" index or scheduler "time"); order 0 re-adds the last delta.

    "adaptive" (the dynamic block cache): a sample runs the range when `force` is set
    (warm-up), when it has no record yet, when it has reused `max_cached` steps in a row, or
    when the relative L1 change of its `signal` since the last step it ran the range exceeds
    `threshold` (or, with `judge` "forecast", when its signal strays from the forecast of the
    signal by more than that: the skipped delta gets the same extrapolation); otherwise it
    gets the (forecast) delta. The CFG rows of one sample decide
    together, on their joint change, so guidance always combines branches of the same step.
    """

    start: int
    stop: int
    action: str
    order: int = 0
    coord: str = "step"
    threshold: float = 0.0
    max_cached: int = 0
    force: bool = False
    signal: str = "residual"
    judge: str = "last"
    # This step's forecast uses at most degree + 1 of the order + 1 records (None: all), so a
    # call can forecast with order 2 on some steps and order 1 on others from one history.
    degree: int | None = None

    def __post_init__(self):
        if self.action not in RANGE_ACTIONS:
            raise ConfigError(f"range action must be one of {RANGE_ACTIONS}, got {self.action!r}")
        if not 0 <= self.start < self.stop:
            raise ConfigError(f"block range [{self.start}, {self.stop}) is empty or negative")
        if not isinstance(self.order, int) or not 0 <= self.order <= 3:
            raise ConfigError(f"forecast order must be 0, 1, 2 or 3, got {self.order!r}")
        if self.coord not in FORECAST_COORDS:
            raise ConfigError(f"forecast coordinate must be one of {FORECAST_COORDS}, got {self.coord!r}")
        if self.degree is not None and (not isinstance(self.degree, int) or not 0 <= self.degree <= self.order):
            raise ConfigError(f"a step's forecast degree must be an integer in [0, order={self.order}], "
                              f"got {self.degree!r}")
        if self.judge not in ADAPTIVE_JUDGES:
            raise ConfigError(f"adaptive judge must be one of {ADAPTIVE_JUDGES}, got {self.judge!r}")
        if self.signal not in ADAPTIVE_SIGNALS:
            raise ConfigError(f"adaptive signal must be one of {ADAPTIVE_SIGNALS}, got {self.signal!r}")
        if self.signal == "residual" and self.action == "adaptive" and self.start == 0:
            raise ConfigError("the adaptive 'residual' signal is what the front blocks add: it needs front >= 1 "
                              "(or signal=hidden)")

    @property
    def forecasts(self) -> bool:
        """Whether this range keeps a delta history (forecasting or deciding at run time)."""
        return self.order > 0 or self.action == "adaptive"

    @property
    def key(self) -> tuple[int, int]:
        return (self.start, self.stop)


@dataclass(frozen=True)
class StepPlan:
    """The plan of one denoising step.

    `blocks` holds one BlockPlan per block, or is empty for "every block plain". `ranges`
    are non-overlapping block-range operations; blocks outside them simply run.
    `cfg_mode` is "both" (conditional and unconditional rows batched) or "cond_only" (the
    unconditional rows have left the batch and no guidance is applied).
    """

    blocks: tuple[BlockPlan, ...] = ()
    ranges: tuple[RangeOp, ...] = ()
    cfg_mode: str = "both"

    def __post_init__(self):
        if self.cfg_mode not in CFG_MODES:
            raise ConfigError(f"cfg_mode must be one of {CFG_MODES}, got {self.cfg_mode!r}")
        ordered = sorted(self.ranges, key=lambda r: r.start)
        for a, b in zip(ordered, ordered[1:]):
            if b.start < a.stop:
                raise ConfigError(f"block ranges [{a.start}, {a.stop}) and [{b.start}, {b.stop}) overlap")
        object.__setattr__(self, "ranges", tuple(ordered))

    def block(self, index: int) -> BlockPlan:
        return self.blocks[index] if self.blocks else PLAIN_BLOCK

    def segments(self, depth: int) -> list[tuple[int, int, str]]:
        """[0, depth) cut into (start, stop, action) with action compute / record / apply."""
        if self.ranges and self.ranges[-1].stop > depth:
            last = self.ranges[-1]
            raise ConfigError(f"block range [{last.start}, {last.stop}) is past the last block ({depth} blocks)")
        if self.blocks and len(self.blocks) != depth:
            raise ConfigError(f"plan has {len(self.blocks)} block plans for a {depth}-block denoiser")
        out, at = [], 0
        for r in self.ranges:
            if r.start > at:
                out.append((at, r.start, "compute"))
            out.append((r.start, r.stop, r.action))
            at = r.stop
        if at < depth:
            out.append((at, depth, "compute"))
        return out

    def computed_blocks(self, depth: int) -> list[int]:
        """Blocks that run for every row (an adaptive range's blocks run only for some rows:
        the loop counts those from what ran)."""
        return [i for start, stop, action in self.segments(depth) if action in ("compute", "record")
                for i in range(start, stop)]

    def range_at(self, start: int) -> RangeOp:
        return next(r for r in self.ranges if r.start == start)

    @property
    def adaptive(self) -> bool:
        return any(r.action == "adaptive" for r in self.ranges)


PLAIN_STEP = StepPlan()
