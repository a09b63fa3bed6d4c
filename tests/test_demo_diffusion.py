"""The demo DDPM loss (tools/demo_diffusion.py): the Min-SNR-gamma weight the continued PixArt
demo training uses, and that gamma 0 leaves the first demos' unweighted loss unchanged."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from demo_diffusion import GaussianDiffusion  # noqa: E402


def test_min_snr_weight_is_one_at_low_snr_and_gamma_over_snr_above():
    d = GaussianDiffusion()
    acp = d.sqrt_acp.pow(2)
    snr = acp / (1 - acp)
    t = torch.arange(d.T)
    w = d.min_snr_weight(t, 5.0)
    low = snr <= 5.0
    assert low.any() and (~low).any()
    assert torch.all(w[low] == 1.0)
    assert torch.allclose(w[~low].double(), 5.0 / snr[~low], rtol=1e-6)
    assert w[0] < 1e-3 < w[-1] == 1.0  # the cleanest step weighs least


def test_loss_weights_only_the_epsilon_term():
    d = GaussianDiffusion()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 2, 4, 4, generator=g), torch.randn(4, 2, 4, 4, generator=g)
    t = torch.tensor([3, 200, 600, 990])
    xt = d.q_sample(x0, t, noise)
    out = torch.randn(4, 4, 4, 4, generator=g)
    mse0, vb0 = d.loss(out, x0, xt, t, noise)
    mse5, vb5 = d.loss(out, x0, xt, t, noise, min_snr=5.0)
    per_sample = (out[:, :2] - noise).pow(2).mean(dim=(1, 2, 3))
    assert torch.allclose(mse0, per_sample.mean())
    assert torch.allclose(mse5, (per_sample * d.min_snr_weight(t, 5.0)).mean())
    assert torch.equal(vb0, vb5) and mse5 < mse0
