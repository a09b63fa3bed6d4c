"""Benchmark dite's acceleration methods against the peer library cache-dit, on the same
diffusers folder, the same held-out prompts and the same initial latents.

    python tools/bench_peers.py --model demo-sd3 --prompts 8 \
        --dite ditcache ditcache+promptgate deltacache \
        --cachedit F4B0:0.12:taylor1 F1B0:0.08:taylor1 F1B0:0.12:taylor1 F1B0:0.2:taylor1 F1B0:0.08:none \
        --out bench/peers-demo-sd3

Both libraries load the same folder (a demo name is the folder shipped inside dite), fp32 on
the CPU; every prompt (a class label for a DiT) is one call of batch 1 with initial latents
drawn once per prompt from a seeded CPU generator and handed to both libraries. Rows:

- plain, full steps, in dite and in diffusers: each library's reference (PSNR inf). The two
  plain images are compared with each other too (max |diff|, reported above the table).
- dite specs (`--dite`), passed as is to `pipe(accel=SPEC)`.
- cache-dit settings (`--cachedit`), compact strings `F<n>B<n>:<threshold>:<taylorK|none>`
  (front compute blocks, back compute blocks, residual-diff threshold, TaylorSeer order or
  none), optionally followed by `:W<n>` (max_warmup_steps), `:M<n>` (max_cached_steps),
  `:MC<n>` (max_continuous_cached_steps); the rest is cache-dit's DBCacheConfig defaults.
  Applied with cache_dit.enable_cache on the diffusers pipeline and removed with
  cache_dit.disable_cache after each call (cache-dit resets its context on every pipeline call).
- plain dite with fewer steps (`--fewer`, default 14 17 19 21 24 scaled to --steps / 28).

Compute is counted the same way in both libraries: forward hooks on the transformer blocks add
the batch rows of each block call; a row's compute is its total over all prompts divided by
the plain run's of the same library. The wall ratio is the median over prompts of call time /
plain call time of the same library (runs interleaved prompt by prompt). PSNR (tools/bench.psnr)
and SSIM are of each image against the same library's plain image, averaged over prompts.
Writes OUT.md, OUT.json and OUT.png (PSNR against compute).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

TOOLS = Path(__file__).resolve().parent
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))

from demo_scenes_v2 import DEMOS as V2_DEMOS  # noqa: E402  (prompted with the v2 scenes' captions)

from dite.engine.families import by_pipeline_class  # noqa: E402
DEFAULT_FEWER = (14, 17, 19, 21, 24)
DEFAULT_FEWER_BASE = 28  # DEFAULT_FEWER is for this many steps; other step counts scale it
PSNR_CAP_DB = 100.0  # an image identical to its reference counts as this in the mean


# ---------------------------------------------------------------------------------------------
# Pure helpers (tested in tests/test_bench_peers.py)


@dataclasses.dataclass(frozen=True)
class CacheDitSpec:
    """One cache-dit setting: DBCache Fn/Bn compute blocks, residual-diff threshold, TaylorSeer
    order (None: no calibrator), and optional overrides of cache-dit's warmup / cache limits
    (None: cache-dit's default)."""

    text: str
    fn: int
    bn: int
    threshold: float
    taylor_order: int | None
    max_warmup_steps: int | None = None
    max_cached_steps: int | None = None
    max_continuous_cached_steps: int | None = None


_EXTRA = {"W": "max_warmup_steps", "M": "max_cached_steps", "MC": "max_continuous_cached_steps"}


def parse_cachedit_spec(text: str) -> CacheDitSpec:
    """`F4B0:0.12:taylor1` / `F1B0:0.08:none` (/ `...:W4:M20:MC3`) -> CacheDitSpec."""
    parts = text.strip().split(":")
    if len(parts) < 3:
        raise ValueError(f"cache-dit spec {text!r}: expected F<n>B<n>:<threshold>:<taylorK|none>[:W<n>][:M<n>][:MC<n>]")
    m = re.fullmatch(r"[Ff](\d+)[Bb](\d+)", parts[0])
    if not m:
        raise ValueError(f"cache-dit spec {text!r}: {parts[0]!r} is not F<n>B<n>")
    fn, bn = int(m.group(1)), int(m.group(2))
    if fn < 1:
        raise ValueError(f"cache-dit spec {text!r}: cache-dit needs at least one front block (F>=1)")
    try:
        threshold = float(parts[1])
    except ValueError:
        raise ValueError(f"cache-dit spec {text!r}: threshold {parts[1]!r} is not a number") from None
    if threshold < 0:
        raise ValueError(f"cache-dit spec {text!r}: negative threshold")
    calib = parts[2].lower()
    if calib in ("none", "no", "off", "taylor0"):
        order = None
    else:
        t = re.fullmatch(r"taylor(?:seer)?(\d+)", calib)
        if not t:
            raise ValueError(f"cache-dit spec {text!r}: {parts[2]!r} is not taylor<k> or none")
        order = int(t.group(1))
    extra = {}
    for field in parts[3:]:
        e = re.fullmatch(r"(MC|M|W)(-?\d+)", field.upper())
        if not e:
            raise ValueError(f"cache-dit spec {text!r}: {field!r} is not W<n>, M<n> or MC<n>")
        extra[_EXTRA[e.group(1)]] = int(e.group(2))
    return CacheDitSpec(text.strip(), fn, bn, threshold, order, **extra)


def fewer_steps_list(steps: int, ks=DEFAULT_FEWER, base: int | None = DEFAULT_FEWER_BASE) -> list[int]:
    """The fewer-steps baselines for a run of `steps`: `ks` (given for `base` steps) scaled to
    `steps` (base None: taken as is), rounded, deduplicated, each in 1..steps-1, ascending."""
    scale = 1.0 if base is None else steps / base
    out = {max(1, min(steps - 1, int(math.floor(k * scale + 0.5)))) for k in ks}
    return sorted(k for k in out if 1 <= k < steps)


def batch_rows(obj) -> int | None:
    """Batch size of a block's input: a tensor's first dimension, or the first tensor found in
    a tuple / list / dict / object (dite blocks take a `Hidden` whose `.image` is [B, N, D])."""
    if isinstance(obj, torch.Tensor):
        return int(obj.shape[0]) if obj.ndim else None
    if isinstance(obj, (list, tuple)):
        items = obj
    elif isinstance(obj, dict):
        items = list(obj.values())
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        preferred = [getattr(obj, n) for n in ("image", "hidden_states", "x") if hasattr(obj, n)]
        items = preferred + [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    elif hasattr(obj, "__dict__"):
        items = list(vars(obj).values())
    else:
        return None
    for item in items:
        if isinstance(item, torch.Tensor) and item.ndim:
            return int(item.shape[0])
    for item in items:
        if not isinstance(item, torch.Tensor) and item is not None and not isinstance(item, (int, float, str, bool)):
            rows = batch_rows(item)
            if rows is not None:
                return rows
    return None


class BlockCounter:
    """Forward hooks on a list of transformer blocks that add up the batch rows of every block
    call (block evaluations x rows). `per_block[i]` is block i's total."""

    def __init__(self, blocks):
        self.blocks = list(blocks)
        self.rows = 0
        self.calls = 0
        self.per_block = [0] * len(self.blocks)
        self.handles = [b.register_forward_hook(self._hook(i), with_kwargs=True) for i, b in enumerate(self.blocks)]

    def _hook(self, index: int):
        def hook(module, args, kwargs, output):
            rows = batch_rows(args) if args else None
            if rows is None:
                rows = batch_rows(kwargs)
            rows = 1 if rows is None else rows
            self.rows += rows
            self.calls += 1
            self.per_block[index] += rows
        return hook

    def reset(self) -> None:
        self.rows = self.calls = 0
        self.per_block = [0] * len(self.blocks)

    def take(self) -> int:
        """The rows counted since the last take / reset, and reset."""
        rows = self.rows
        self.reset()
        return rows

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def ssim(a: np.ndarray, b: np.ndarray, size: int = 11, sigma: float = 1.5) -> float:
    """SSIM of two images [H, W, 3] (or [N, H, W, 3]) in [0, 1]: Gaussian window, data range
    from the reference `a`, zero padding. An image-space score for the tables, kept as it was
    when the peer numbers were first taken (dite's calibration ssim_loss is the reference's
    latent-space metric, with data range 1 and a cropped border)."""
    ta, tb = (torch.from_numpy(np.asarray(x, dtype=np.float32)) for x in (a, b))
    if ta.ndim == 3:
        ta, tb = ta[None], tb[None]
    ref, out = ta.permute(0, 3, 1, 2), tb.permute(0, 3, 1, 2)
    coords = torch.arange(size, dtype=torch.float32) - size // 2
    g = torch.exp(-coords**2 / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(ref.shape[1], 1, size, size)

    def blur(x):
        return F.conv2d(x, kernel, padding=size // 2, groups=ref.shape[1])

    span = (ref.max() - ref.min()).clamp_min(1e-6)
    c1, c2 = (0.01 * span) ** 2, (0.03 * span) ** 2
    mu_x, mu_y = blur(ref), blur(out)
    var_x, var_y = blur(ref * ref) - mu_x**2, blur(out * out) - mu_y**2
    cov = blur(ref * out) - mu_x * mu_y
    value = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(value.mean())


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    from bench import psnr as bench_psnr  # tools/bench.py: one PSNR for all the tools

    return bench_psnr(a, b)


def mean_psnr(values: list[float]) -> float:
    """Mean of per-image PSNRs; inf only when every image is identical, otherwise identical
    images count as PSNR_CAP_DB."""
    if all(math.isinf(v) for v in values):
        return float("inf")
    return float(np.mean([min(v, PSNR_CAP_DB) for v in values]))


# ---------------------------------------------------------------------------------------------
# The two libraries


def model_folder(model: str) -> Path:
    """The diffusers folder of --model: a demo name resolves as dite resolves it (the wheel's
    folders, or a checkout's / the user cache's for a demo outside the wheel)."""
    from dite.engine.errors import DiteError
    from dite.engine.loading.hub import demo_folder

    try:
        folder = demo_folder(model) or Path(model)
    except DiteError as e:
        raise SystemExit(str(e)) from None
    if not (folder / "model_index.json").is_file():
        raise SystemExit(f"{folder} is not a diffusers folder (no model_index.json)")
    return folder


@dataclasses.dataclass
class Prompt:
    text: str  # caption (text models) or class name (DiT)
    class_id: int
    latents: torch.Tensor


class DiteRunner:
    library = "dite"

    def __init__(self, model: str):
        from dite.engine import load

        self.pipe = load(model, device="cpu")
        self.family = self.pipe.family
        self.counter = BlockCounter(self.pipe.transformer.blocks)

    def resolve(self, prompt: Prompt, steps: int | None, guidance: float | None) -> dict:
        """The model's defaults as the pipeline resolves them (steps, guidance, T5 length)."""
        out = self._call(prompt, steps, guidance, None)
        self.counter.reset()
        return out.parameters[0]

    def _call(self, prompt: Prompt, steps, guidance, spec):
        kw = dict(latents=prompt.latents.clone(), seed=0, output_type="np", progress=False, accel=spec or None)
        if steps is not None:
            kw["num_inference_steps"] = steps
        if guidance is not None:
            kw["guidance_scale"] = guidance
        if self.family == "dit":
            return self.pipe(class_labels=[prompt.class_id], **kw)
        return self.pipe(prompt=[prompt.text], **kw)

    def run(self, prompt: Prompt, steps: int, guidance: float, spec: str | None) -> dict:
        self.counter.reset()
        start = time.perf_counter()
        out = self._call(prompt, steps, guidance, spec)
        wall = time.perf_counter() - start
        stats = out.stats or {}
        return {"image": out.images[0], "rows": self.counter.take(), "wall": wall,
                "stats_evaluations": stats.get("block_evaluations"), "stats_plain": stats.get("plain_block_evaluations"),
                "resolved": stats.get("accel"), "blocks_per_step": [s.get("blocks") for s in stats.get("steps", [])],
                "rows_per_step": [s.get("rows") for s in stats.get("steps", [])]}


class DiffusersRunner:
    library = "cache-dit"

    def __init__(self, folder: Path, family: str, max_sequence_length: int | None):
        import diffusers

        index = json.loads((folder / "model_index.json").read_text())
        self.pipe = getattr(diffusers, index["_class_name"]).from_pretrained(folder, dtype=torch.float32).to("cpu")
        self.pipe.set_progress_bar_config(disable=True)
        self.family = family
        self.max_sequence_length = max_sequence_length
        # a PixArt demo's sample size is not one of the resolution bins: its folder says so (_dite)
        self.binning = index.get("_dite", {}).get("use_resolution_binning", True)
        self.counter = BlockCounter(self.pipe.transformer.transformer_blocks)
        # steps delimited by transformer calls: rows per step for the cached-step trace
        self._step_rows: list[int] = []
        self._step_start = 0
        self.pipe.transformer.register_forward_pre_hook(self._pre)
        self.pipe.transformer.register_forward_hook(self._post)

    def _pre(self, module, args):
        self._step_start = self.counter.rows

    def _post(self, module, args, output):
        self._step_rows.append(self.counter.rows - self._step_start)

    @contextlib.contextmanager
    def _latents(self, latents: torch.Tensor):
        """DiTPipeline takes no latents: hand it ours by patching its randn_tensor for the call."""
        if self.family != "dit":
            yield
            return
        import diffusers.pipelines.dit.pipeline_dit as pd

        original = pd.randn_tensor
        pd.randn_tensor = lambda *a, **k: latents.clone()
        try:
            yield
        finally:
            pd.randn_tensor = original

    def run(self, prompt: Prompt, steps: int, guidance: float, spec: CacheDitSpec | None) -> dict:
        config = None
        if spec is not None:
            config = enable_cachedit(self.pipe, spec, self.family)
        self.counter.reset()
        self._step_rows = []
        try:
            start = time.perf_counter()
            with self._latents(prompt.latents), torch.inference_mode():
                if self.family == "dit":
                    images = self.pipe(class_labels=[prompt.class_id], num_inference_steps=steps,
                                       guidance_scale=guidance, output_type="np").images
                else:
                    kw = {"max_sequence_length": self.max_sequence_length} if self.max_sequence_length else {}
                    if self.family == "pixart":
                        kw["use_resolution_binning"] = self.binning
                    images = self.pipe(prompt=[prompt.text], latents=prompt.latents.clone(), num_inference_steps=steps,
                                       guidance_scale=guidance, output_type="np", **kw).images
            wall = time.perf_counter() - start
        finally:
            if spec is not None:
                disable_cachedit(self.pipe)
        per_call = 2 if guidance > 1.0 else 1  # diffusers batches the CFG rows in one transformer call
        return {"image": np.asarray(images[0], dtype=np.float32), "rows": self.counter.take(), "wall": wall,
                "blocks_per_step": [r // per_call for r in self._step_rows], "rows_per_step": list(self._step_rows),
                "config": config}


def cachedit_configs(spec: CacheDitSpec, family: str = "sd3"):
    """(DBCacheConfig, TaylorSeerCalibratorConfig or None) of a spec, on cache-dit's defaults.

    One departure, SD3 with B0 and TaylorSeer: diffusers' last SD3 block is context_pre_only and
    returns no text stream, so the Mn blocks' text residual is None, the encoder calibrator never
    gets a state and cache-dit 1.5.3 fails on the first cached step (AssertionError "State
    '..._Bn_residual' not found" in TaylorSeerCalibrator.approximate). With B0 the text stream
    after the last block is discarded, so turning the encoder calibrator off there changes nothing
    in the output; the image-stream calibrator stays on."""
    from cache_dit import DBCacheConfig, TaylorSeerCalibratorConfig

    overrides = {k: getattr(spec, k) for k in ("max_warmup_steps", "max_cached_steps", "max_continuous_cached_steps")
                 if getattr(spec, k) is not None}
    cache = DBCacheConfig(Fn_compute_blocks=spec.fn, Bn_compute_blocks=spec.bn,
                          residual_diff_threshold=spec.threshold, **overrides)
    calibrator = None
    if spec.taylor_order is not None:
        calibrator = TaylorSeerCalibratorConfig(taylorseer_order=spec.taylor_order)
        if family == "sd3" and spec.bn == 0:
            calibrator.enable_encoder_calibrator = False
    return cache, calibrator


def enable_cachedit(pipe, spec: CacheDitSpec, family: str) -> dict:
    import cache_dit

    cache, calibrator = cachedit_configs(spec, family)
    cache_dit.enable_cache(pipe, cache_config=cache, calibrator_config=calibrator)
    # enable_cache resolves enable_separate_cfg from the pipeline's adapter; record the result
    return {"cache_config": cache.as_dict() | {"cache_type": str(cache.cache_type)},
            "calibrator_config": calibrator.as_dict() if calibrator else None,
            "strify": cache.strify() + ("_" + calibrator.strify() if calibrator else "")}


def disable_cachedit(pipe) -> None:
    import cache_dit

    cache_dit.disable_cache(pipe)


def quiet_cachedit() -> None:
    """cache-dit logs every enable / disable at INFO / WARNING: keep errors only."""
    import logging

    for name in list(logging.root.manager.loggerDict):
        if name.startswith("cache_dit"):
            logging.getLogger(name).setLevel(logging.ERROR)


# ---------------------------------------------------------------------------------------------
# The benchmark


@dataclasses.dataclass
class Row:
    library: str  # "dite" / "cache-dit" (cache-dit rows run in diffusers)
    setting: str
    kind: str  # plain / dite / cache-dit / fewer
    steps: int
    spec: object = None
    results: list = dataclasses.field(default_factory=list)


def make_prompts(family: str, n: int, seed: int, shape: tuple[int, ...], scenes_v2: bool = False) -> list[Prompt]:
    import demo_scenes
    import demo_scenes_v2

    from demo_scenes import class_name

    scenes = (demo_scenes_v2 if scenes_v2 else demo_scenes).heldout_scenes(n, seed=seed)
    prompts = []
    for i, sc in enumerate(scenes):
        latents = torch.randn(1, *shape, generator=torch.Generator("cpu").manual_seed(seed + i), dtype=torch.float32)
        cid = sc.attributes.class_id if family == "dit" else 0
        prompts.append(Prompt(class_name(cid) if family == "dit" else sc.caption, cid, latents))
    return prompts


def latent_shape(folder: Path, family: str) -> tuple[int, int, int]:
    cfg = json.loads((folder / "transformer" / "config.json").read_text())
    side = cfg["sample_size"]
    return (cfg["in_channels"], side, side)


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        import os

        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def summarize(row: Row, plain: Row) -> dict:
    res, ref = row.results, plain.results
    psnrs = [psnr(r["image"], p["image"]) for r, p in zip(res, ref)]
    ssims = [ssim(p["image"], r["image"]) for r, p in zip(res, ref)]
    rows_total, plain_total = sum(r["rows"] for r in res), sum(p["rows"] for p in ref)
    out = {
        "library": row.library, "setting": row.setting, "kind": row.kind, "steps": row.steps,
        "compute": rows_total / plain_total,
        "wall_ratio": statistics.median(r["wall"] / p["wall"] for r, p in zip(res, ref)),
        "psnr_db": mean_psnr(psnrs), "psnr_min_db": min(psnrs), "ssim": float(np.mean(ssims)),
        "block_rows": rows_total, "plain_block_rows": plain_total,
        "wall_s_median": statistics.median(r["wall"] for r in res),
        "per_prompt": [{"psnr_db": p, "ssim": s, "rows": r["rows"], "wall_s": r["wall"]}
                       for p, s, r in zip(psnrs, ssims, res)],
    }
    if row.kind == "dite" and all(r.get("stats_evaluations") is not None for r in res):
        # dite's own accounting (stats["block_evaluations"] / its plain), a cross-check of the hooks
        out["stats_compute"] = sum(r["stats_evaluations"] for r in res) / sum(r["stats_plain"] for r in res)
        out["resolved"] = res[0].get("resolved")
    if res and res[0].get("blocks_per_step"):
        out["first_prompt_blocks_per_step"] = res[0]["blocks_per_step"]
        out["first_prompt_rows_per_step"] = res[0]["rows_per_step"]
    if row.kind == "cache-dit":
        out["cachedit"] = res[0]["config"]
    return out


def fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.3f}"
    return str(v)


def markdown(title: str, rows: list[dict], meta: dict) -> str:
    cols = ["library", "setting", "steps", "compute", "wall_ratio", "psnr_db", "ssim", "psnr_min_db", "config"]
    lines = [f"### {title}", "",
             f"Command: `{meta['command']}`", "",
             f"Load (`uptime` at start): `{meta['uptime_start']}`; at end: `{meta['uptime_end']}`; "
             f"torch threads {meta['threads']}; run time {meta['elapsed_s']:.0f} s.", "",
             f"Versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}.", "",
             f"Plain diffusers vs plain dite, same latents: max |diff| {meta['parity_max_abs_diff']:.2e} "
             f"(worst prompt), PSNR {fmt(meta['parity_psnr_db'])} dB (mean).", "",
             f"Block-hook compute vs dite's own accounting (stats block_evaluations / plain) on the dite rows: "
             f"{meta['hooks_vs_stats']}.", "",
             "compute = transformer block evaluations x batch rows (forward hooks on the blocks, both libraries) / "
             "the same library's plain run; wall_ratio = median over prompts of call time / plain call time of the "
             "same library; psnr_db / ssim = mean over prompts of each image against the same library's plain image "
             f"(an identical image counts {PSNR_CAP_DB:.0f} dB unless all are); psnr_min_db = worst prompt.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            if c == "config":
                v = r.get("config_short", "")
            else:
                v = r.get(c)
            cells.append(fmt(v))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "cache-dit settings (exact config objects, cache-dit's defaults except F/B/threshold/order):", ""]
    for r in rows:
        if r["kind"] == "cache-dit":
            cfg = r["cachedit"]
            lines.append(f"- `{r['setting']}`: `{cfg['strify']}`; DBCacheConfig({_kw(cfg['cache_config'])}); "
                         f"calibrator {'None' if cfg['calibrator_config'] is None else 'TaylorSeerCalibratorConfig(' + _kw(cfg['calibrator_config']) + ')'}")
    return "\n".join(lines) + "\n"


def _kw(d: dict) -> str:
    keys = ("Fn_compute_blocks", "Bn_compute_blocks", "residual_diff_threshold", "max_warmup_steps", "warmup_interval",
            "max_cached_steps", "max_continuous_cached_steps", "max_accumulated_residual_diff_threshold",
            "enable_separate_cfg", "cfg_compute_first", "cfg_diff_compute_separate",
            "enable_calibrator", "enable_encoder_calibrator", "calibrator_type", "calibrator_cache_type",
            "taylorseer_order")
    return ", ".join(f"{k}={d[k]!r}" for k in keys if k in d)


def plot(rows: list[dict], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: install matplotlib (pip install 'dite[bench]')", file=sys.stderr)
        return False
    finite = [r["psnr_db"] for r in rows if not math.isinf(r["psnr_db"])]
    cap = max(finite + [40.0]) + 5
    value = lambda r: min(r["psnr_db"], cap)  # noqa: E731
    fig, ax = plt.subplots(figsize=(7, 4.5))
    fewer = sorted([r for r in rows if r["kind"] in ("fewer", "plain") and r["library"] == "dite"],
                   key=lambda r: r["compute"])
    ax.plot([r["compute"] for r in fewer], [value(r) for r in fewer], "k--o", ms=4, label="dite, fewer steps")
    for r in fewer:
        if r["kind"] == "fewer":
            ax.annotate(str(r["steps"]), (r["compute"], value(r)), fontsize=7, xytext=(3, -9), textcoords="offset points")
    styles = {"dite": ("o", "tab:blue"), "cache-dit": ("s", "tab:orange")}
    for library, (marker, colour) in styles.items():
        pts = [r for r in rows if r["library"] == library and r["kind"] in ("dite", "cache-dit")]
        if not pts:
            continue
        ax.scatter([r["compute"] for r in pts], [value(r) for r in pts], marker=marker, color=colour, s=40,
                   label=f"{library}" + (" (on diffusers)" if library == "cache-dit" else ""), zorder=3)
        for r in pts:
            ax.annotate(r["setting"], (r["compute"], value(r)), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("compute (block evaluations x rows / plain)")
    ax.set_ylabel(f"PSNR vs own plain (dB; plain at {cap:.0f})")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def versions() -> dict:
    out = {"torch": torch.__version__}
    for name in ("diffusers", "cache_dit"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001
            out[name] = "missing"
    try:
        from importlib.metadata import version

        out["dite"] = version("dite")
    except Exception:  # noqa: BLE001
        pass
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo-sd3",
                   help="a demo (demo-sd3, demo-dit, demo-sd3-128, demo-pixart) or a diffusers folder (SD3, PixArt, DiT)")
    p.add_argument("--scenes", choices=["v1", "v2"], default=None,
                   help="held-out captions of the first or second demo scenes (default: v2 for the second-generation "
                        "demos, else v1)")
    p.add_argument("--prompts", type=int, default=8, help="held-out prompts (classes for a DiT), one call each")
    p.add_argument("--steps", type=int, default=None, help="default: the model's")
    p.add_argument("--guidance", type=float, default=None, help="default: the model's")
    p.add_argument("--seed", type=int, default=0, help="prompt i's latents come from seed + i")
    p.add_argument("--dite", nargs="*", default=["ditcache", "ditcache+promptgate", "deltacache"], metavar="SPEC",
                   help="dite accel specs, passed as accel=SPEC")
    p.add_argument("--cachedit", nargs="*", default=["F4B0:0.12:taylor1", "F1B0:0.08:taylor1", "F1B0:0.08:none"],
                   metavar="SPEC", help="cache-dit settings F<n>B<n>:<threshold>:<taylorK|none>[:W<n>][:M<n>][:MC<n>]")
    p.add_argument("--fewer", nargs="*", type=int, default=None,
                   help=f"plain dite step counts; default {' '.join(map(str, DEFAULT_FEWER))} scaled to --steps / "
                        f"{DEFAULT_FEWER_BASE}")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default="bench/peers", help="path stem of the .md, .json and .png written")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python " + shlex.join(["tools/bench_peers.py"] + (sys.argv[1:] if argv is None else list(argv)))
    started, load_start = time.perf_counter(), uptime()

    cachedit_specs = [parse_cachedit_spec(s) for s in args.cachedit]
    folder = model_folder(args.model)
    index = json.loads((folder / "model_index.json").read_text())
    found = by_pipeline_class(index["_class_name"])
    if found is None:
        raise SystemExit(f"{folder}: {index['_class_name']} is not an SD3, PixArt or DiT pipeline")
    family = found.name
    scenes_v2 = args.scenes == "v2" if args.scenes else args.model in V2_DEMOS

    dite = DiteRunner(args.model)
    prompts = make_prompts(family, args.prompts, args.seed, latent_shape(folder, family), scenes_v2)
    resolved = dite.resolve(prompts[0], args.steps, args.guidance)  # also dite's warm-up
    steps, guidance = int(resolved["steps"]), float(resolved["guidance"])
    fewer = (fewer_steps_list(steps) if args.fewer is None
             else fewer_steps_list(steps, args.fewer, base=None))
    ref = DiffusersRunner(folder, family, resolved.get("max_sequence_length"))
    if cachedit_specs:
        import cache_dit  # noqa: F401  (import once, then silence its logs)

        quiet_cachedit()

    rows = [Row("dite", "plain", "plain", steps), Row("cache-dit", "plain (diffusers)", "plain", steps)]
    rows += [Row("dite", s, "dite", steps, s) for s in args.dite]
    rows += [Row("cache-dit", s.text, "cache-dit", steps, s) for s in cachedit_specs]
    rows += [Row("dite", f"fewer steps ({k})", "fewer", k) for k in fewer]

    def run(row: Row, prompt: Prompt) -> dict:
        runner = dite if row.library == "dite" else ref
        return runner.run(prompt, row.steps, guidance, row.spec)

    for row in rows:  # warm-up: allocator, oneDNN kernels, cache-dit's first enable
        run(row, prompts[0])
    for i, prompt in enumerate(prompts):
        order = rows[i % len(rows):] + rows[:i % len(rows)]  # interleaved, start rotated per prompt
        for row in order:
            row.results.append(run(row, prompt))
        print(f"prompt {i + 1}/{len(prompts)}: {time.perf_counter() - started:.0f}s", file=sys.stderr)

    plain = {r.library: r for r in rows if r.kind == "plain"}
    table = []
    for row in rows:
        s = summarize(row, plain[row.library])
        if row.kind == "cache-dit":
            c = s["cachedit"]["cache_config"]
            s["config_short"] = (f"W{c['max_warmup_steps']} I{c['warmup_interval']} M{c['max_cached_steps']} "
                                 f"MC{c['max_continuous_cached_steps']} sepCFG={c['enable_separate_cfg']}")
        elif row.kind == "dite":
            s["config_short"] = s.get("resolved") or ""
        table.append(s)
    mismatches = [r["setting"] for r in table if "stats_compute" in r and abs(r["stats_compute"] - r["compute"]) > 1e-9]
    hooks_vs_stats = ("agree" if not mismatches else "DIFFER on " + ", ".join(mismatches)) if any(
        "stats_compute" in r for r in table) else "no dite spec rows"
    diffs = [float(np.abs(a["image"] - b["image"]).max()) for a, b in zip(plain["dite"].results, plain["cache-dit"].results)]
    parity_psnr = mean_psnr([psnr(a["image"], b["image"]) for a, b in zip(plain["dite"].results, plain["cache-dit"].results)])
    meta = {"command": command, "uptime_start": load_start, "uptime_end": uptime(), "threads": torch.get_num_threads(),
            "elapsed_s": time.perf_counter() - started, "versions": versions(), "model": args.model,
            "folder": str(folder), "family": family, "prompts": [p.text for p in prompts], "steps": steps,
            "guidance": guidance, "max_sequence_length": resolved.get("max_sequence_length"), "seed": args.seed,
            "parity_max_abs_diff": max(diffs), "parity_max_abs_diff_per_prompt": diffs, "parity_psnr_db": parity_psnr,
            "fewer": fewer, "hooks_vs_stats": hooks_vs_stats}
    title = (f"{args.model}: dite vs cache-dit {meta['versions'].get('cache_dit')}, {len(prompts)} held-out prompts, "
             f"{steps} steps, guidance {guidance:g}, batch 1, fp32 CPU")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = markdown(title, table, meta)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"title": title, "meta": meta, "rows": table}, indent=2,
                                                   default=str, allow_nan=True))
    plot(table, out.with_suffix(".png"), title)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
