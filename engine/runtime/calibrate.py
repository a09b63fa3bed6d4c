"""DiTFastAttn calibration: the reference's greedy search for a plan of attention policies.

One generation runs on the calibration batch (N prompts or class labels, fixed seed). At
each step s > 0 (step 0 is never compressed), before the real forward:
  1. the reference output O of step s is computed with every layer at full attention;
  2. for layer 0 .. L-1 in order, candidates are tried in the fixed order output_share,
     residual_window_attn+cfg_attn_share, residual_window_attn, full_attn+cfg_attn_share;
     the first whose loss against O is below (layer + 1) / L * threshold is kept, with the
     layers before it already at their chosen policies; each try re-runs the whole
     transformer for step s with cache writes disabled, so the caches are left as they were;
  3. the real forward runs with the chosen policies, every computing layer storing its
     output and (full layers) its residual for the steps after.
The plan (per layer, one method name per step) is written with what it was made for.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dite.engine.runtime.delta_store import DeltaStore
from dite.engine.runtime.finite import check_number
from dite.accel.fastattn import LABELS, write_plan
from dite.accel.methods import FAMILY_CFG_ROW_ORDER
from dite.engine.errors import ConfigError
from dite.engine.runtime.step import run_step
from dite.models.plan import AttentionPolicy, BlockPlan, StepPlan

CANDIDATES = ("output_share", "residual_window_attn+cfg_attn_share", "residual_window_attn", "full_attn+cfg_attn_share")
RANK = {"full_attn": 0, "full_attn+cfg_attn_share": 1, "residual_window_attn": 2,
        "residual_window_attn+cfg_attn_share": 3, "output_share": 4}
DEFAULT_PROMPTS = (
    "a photograph of a red fox in the snow", "a bowl of fruit on a wooden table", "a city street at night in the rain",
    "a watercolor painting of mountains at sunrise", "a portrait of an old man with a beard",
    "a small boat on a calm lake", "a cat sleeping on a sofa", "a futuristic building made of glass",
)


def relative_loss(ref: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The reference's metric: mean(clip(|(O - O') / (max(O, O') + 1e-6)|, 0, 10)), where max
    is the signed elementwise maximum (not of magnitudes) and the absolute value is taken
    after the division, as DiTFastAttn's `compression_loss` computes it: an element whose
    maximum is negative counts with its magnitude, not as 0."""
    return ((ref - out) / (torch.maximum(ref, out) + 1e-6)).abs().clamp(0, 10).mean()


SSIM_SIGMA = 1.5
SSIM_WINDOW = int(3.5 * SSIM_SIGMA + 0.5) * 2 + 1  # 11: torchmetrics sizes its Gaussian from sigma
SSIM_DATA_RANGE = 1.0


def ssim_loss(ref: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """1 - SSIM of the model outputs (B, C, H, W) as images, as the reference computes it:
    torchmetrics' `StructuralSimilarityIndexMeasure(data_range=1.0)` with its defaults
    (Gaussian window 11, sigma 1.5, k1 0.01, k2 0.03, variances clamped at 0), in the version
    the reference's SSIM metric was written against (torchmetrics 1.4, August 2024): both
    images reflect-padded by 5, filtered, and the 5-pixel border of the SSIM map cropped
    before the mean. Every kept window then lies inside the image, so the padding never
    reaches the value: this is the SSIM of the valid windows. (torchmetrics >= 1.5 keeps the
    border, so the reference run with a newer torchmetrics scores the padded edge too.)
    Computed in float32."""
    if ref.ndim != 4:
        raise ConfigError(f"--metric ssim compares (batch, channels, height, width) outputs, not shape {tuple(ref.shape)}")
    pad = SSIM_WINDOW // 2
    height, width = ref.shape[-2:]
    if height < SSIM_WINDOW or width < SSIM_WINDOW:
        raise ConfigError(f"--metric ssim needs a latent of at least {SSIM_WINDOW}x{SSIM_WINDOW} (the reference's "
                          f"Gaussian window, its border cropped); this model's is {height}x{width}: "
                          "use --metric relative or a larger --size")
    ref, out = ref.float(), out.float()
    channels, batch = ref.shape[1], ref.shape[0]
    coords = torch.arange(SSIM_WINDOW, dtype=torch.float32, device=ref.device) - pad
    g = torch.exp(-((coords / SSIM_SIGMA) ** 2) / 2)
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(channels, 1, SSIM_WINDOW, SSIM_WINDOW)
    x = F.pad(ref, (pad, pad, pad, pad), mode="reflect")
    y = F.pad(out, (pad, pad, pad, pad), mode="reflect")
    mu_x, mu_y, xx, yy, xy = F.conv2d(torch.cat((x, y, x * x, y * y, x * y)), kernel, groups=channels).split(batch)
    c1, c2 = (0.01 * SSIM_DATA_RANGE) ** 2, (0.03 * SSIM_DATA_RANGE) ** 2
    var_x, var_y = (xx - mu_x**2).clamp_min(0.0), (yy - mu_y**2).clamp_min(0.0)
    cov = xy - mu_x * mu_y
    ssim = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return 1 - ssim[..., pad:-pad, pad:-pad].mean()


METRICS = {"relative": relative_loss, "ssim": ssim_loss}


def _policy(label: str, window: int, row_order: str, store: bool) -> AttentionPolicy:
    kind, share = LABELS[label]
    return AttentionPolicy(kind=kind, window=window, cfg_share=row_order if share else None,
                           store_residual=store and kind == "full", store_output=store and kind != "share")


def _plan(labels: list[str], window: int, row_order: str, store: bool = False) -> StepPlan:
    return StepPlan(blocks=tuple(BlockPlan(attention=_policy(label, window, row_order, store)) for label in labels))


def quantize(chosen: list[list[str]], max_signatures: int) -> list[list[str]]:
    """At most `max_signatures` distinct per-step policy tuples (graph executors compile one
    graph per distinct step plan): the rarest signature is merged with its nearest one,
    both taking, layer by layer, the more exact of the two policies — merging only ever
    makes a step more exact, never less."""
    steps = [tuple(s) for s in chosen]
    while len(set(steps)) > max_signatures:
        counts = {sig: steps.count(sig) for sig in set(steps)}
        rare = min(counts, key=lambda sig: (counts[sig], sig))
        others = [sig for sig in counts if sig != rare]
        near = min(others, key=lambda sig: (sum(a != b for a, b in zip(sig, rare)), -counts[sig], sig))
        merged = tuple(min(a, b, key=RANK.__getitem__) for a, b in zip(rare, near))
        steps = [merged if sig in (rare, near) else sig for sig in steps]
    return [list(s) for s in steps]


def calibrate(pipe, out_path, *, steps: int, threshold: float, window: int, n_calib: int = 4,
              guidance_scale: float | None = None, negative_prompt: str = "", prompts=None, class_labels=None,
              metric: str = "relative", seed: int = 3, max_signatures: int | None = None,
              height: int | None = None, width: int | None = None, progress: bool = True) -> dict:
    """Calibrate a DiTFastAttn plan for `pipe` and write it to `out_path`; returns its data."""
    if metric not in METRICS:
        raise ConfigError(f"unknown calibration metric {metric!r}; choose one of {', '.join(METRICS)}")
    threshold = check_number("threshold", threshold, ConfigError)  # NaN or inf would pass `< 0` and mean nothing
    if threshold < 0 or window < 0 or n_calib < 1:
        raise ConfigError("threshold and window must be >= 0 and the calibration set non-empty")
    loss_fn = METRICS[metric]
    model = pipe.transformer
    depth = len(model.blocks)
    guided = (guidance_scale if guidance_scale is not None else (4.0 if pipe.family == "dit" else 7.0)) > 1.0
    row_order = FAMILY_CFG_ROW_ORDER[pipe.family] if guided else "none"
    candidates = [c for c in CANDIDATES if guided or not LABELS[c][1]]
    chosen: list[list[str]] = []
    bar = tqdm(total=steps * depth, disable=not progress, desc="calibrate", leave=False)

    def hook(i, x, t, cond, plan, state):
        labels = ["full_attn"] * depth
        if i > 0:
            attention = state.attention
            attention.writes = False
            with torch.no_grad():
                reference = run_step(model, x, t, cond, _plan(labels, window, row_order), DeltaStore(), attention)
                for layer in range(depth):
                    limit = (layer + 1) / depth * threshold
                    for label in candidates:
                        kind = LABELS[label][0]
                        if kind != "full" and not attention.has("residual" if kind == "window" else "output", layer):
                            continue
                        trial = labels[:layer] + [label] + labels[layer + 1:]
                        out = run_step(model, x, t, cond, _plan(trial, window, row_order), DeltaStore(), attention)
                        if loss_fn(reference, out) < limit:
                            labels = trial
                            break
                    bar.update()
            attention.writes = True
        else:
            bar.update(depth)
        chosen.append(labels)
        return replace(_plan(labels, window, row_order, store=True), cfg_mode=plan.cfg_mode)

    common = dict(num_inference_steps=steps, seed=seed, output_type="latent", progress=False, plan_hook=hook,
                  height=height, width=width)
    if guidance_scale is not None:
        common["guidance_scale"] = guidance_scale
    if pipe.family == "dit":
        # Default: seeded labels from the named classes when the model has names (a model trained
        # on a few of its table's rows, like the demo DiT, is calibrated on those), else any class.
        labels = class_labels
        if not labels:
            known = sorted(set(pipe.labels.values())) or list(range(pipe.transformer.config.num_classes))
            picks = torch.randint(0, len(known), (n_calib,), generator=torch.Generator().manual_seed(seed))
            labels = [known[k] for k in picks.tolist()]
        pipe(class_labels=list(labels), **common)
        calibration = {"class_labels": list(labels)}
    else:
        texts = list(prompts or [DEFAULT_PROMPTS[k % len(DEFAULT_PROMPTS)] for k in range(n_calib)])
        pipe(prompt=texts, negative_prompt=negative_prompt if guided else None, **common)
        calibration = {"prompts": texts, "negative_prompt": negative_prompt}
    bar.close()
    if max_signatures is not None:
        chosen = quantize(chosen, max_signatures)
    layers = [[chosen[s][k] for s in range(steps)] for k in range(depth)]
    meta = {"model": pipe.source, "model_id": pipe.model_id, "family": pipe.family, "steps": steps,
            "threshold": threshold, "window": window, "guidance_scale": guidance_scale, "metric": metric,
            "seed": seed, "calibration": calibration, "signatures": len({tuple(s) for s in chosen}),
            "counts": {label: sum(layer.count(label) for layer in layers) for label in RANK}}
    write_plan(out_path, layers, meta)
    return {**meta, "layers": layers}
