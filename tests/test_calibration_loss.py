"""DiTFastAttn calibration losses against numbers worked out by hand from the reference's formulas.

relative: thu-nics/DiTFastAttn `compression_loss`,
    diff = (a - b) / (torch.max(a, b) + 1e-6); loss = diff.abs().clip(0, 10).mean()
(signed elementwise max, absolute value after the division).
ssim: the same function's `1 - StructuralSimilarityIndexMeasure(data_range=1.0)(a, b)`, torchmetrics
1.4 as of the reference's SSIM commit: Gaussian window 11, sigma 1.5, k1 0.01, k2 0.03, reflect
padding by 5 and the 5-pixel border of the SSIM map cropped, i.e. the mean over valid windows.
"""

from __future__ import annotations

import math

import pytest
import torch

from dite.engine.errors import ConfigError
from dite.engine.runtime.calibrate import relative_loss, ssim_loss

# (O, O') pairs, one per element, chosen so the absolute value's place matters:
#   (-2, -1):    (-1) / (-1 + 1e-6)   ->  1.000001   (abs first: -1.000001, clipped to 0)
#   ( 2,  1):      1  / (2 + 1e-6)    ->  0.4999998
#   ( 1, -3):      4  / (1 + 1e-6)    ->  3.999996
#   (-1, 0.5):  (-1.5) / (0.5 + 1e-6) ->  2.999994   (same both ways: the max is positive)
#   (1e-3, -1): 1.001 / 0.001001      ->  1000, clipped to 10
#   (-0.5, -4):   3.5 / (-0.5 + 1e-6) ->  7.000014   (abs first: -7.000014, clipped to 0)
REF = [-2.0, 2.0, 1.0, -1.0, 1e-3, -0.5]
OUT = [-1.0, 1.0, -3.0, 0.5, -1.0, -4.0]
# mean of the six: 25.5000048 / 6; the abs-first formula gives 17.49999 / 6 = 2.9166650
EXPECTED_RELATIVE = 4.2500008


def test_relative_loss_is_the_references_formula():
    by_hand = sum(min(abs((a - b) / (max(a, b) + 1e-6)), 10.0) for a, b in zip(REF, OUT)) / len(REF)
    assert by_hand == pytest.approx(EXPECTED_RELATIVE, rel=1e-6)
    loss = relative_loss(torch.tensor(REF), torch.tensor(OUT))
    assert float(loss) == pytest.approx(EXPECTED_RELATIVE, rel=1e-5)
    abs_first = sum(max(0.0, min(abs(a - b) / (max(a, b) + 1e-6), 10.0)) for a, b in zip(REF, OUT)) / len(REF)
    assert abs_first == pytest.approx(2.916665, rel=1e-5) and float(loss) > abs_first + 1.3


def test_relative_loss_signed_max_elementwise_and_symmetric():
    # Both negative: the signed max is -1 (a max of magnitudes would be 2 and give 0.5).
    assert float(relative_loss(torch.tensor([-2.0]), torch.tensor([-1.0]))) == pytest.approx(1.0, rel=1e-5)
    assert float(relative_loss(torch.tensor([2.0]), torch.tensor([1.0]))) == pytest.approx(0.5, rel=1e-5)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    # |x / m| is the same for x = a - b and b - a, and max is symmetric.
    assert torch.allclose(relative_loss(a, b), relative_loss(b, a))
    assert float(relative_loss(a, a)) == 0.0


def _gaussian_window() -> torch.Tensor:
    g = torch.tensor([math.exp(-((k - 5) ** 2) / (2 * 1.5**2)) for k in range(11)], dtype=torch.float64)
    g = g / g.sum()
    return g[:, None] * g[None, :]


def _ssim_of_window(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> float:
    """SSIM of one 11x11 window, data range 1: written out from the definition."""
    c1, c2 = 0.01**2, 0.03**2
    mx, my = (w * x).sum(), (w * y).sum()
    vx = max(float((w * x * x).sum() - mx * mx), 0.0)
    vy = max(float((w * y * y).sum() - my * my), 0.0)
    cxy = float((w * x * y).sum() - mx * my)
    mx, my = float(mx), float(my)
    return (2 * mx * my + c1) * (2 * cxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2))


def _valid_ssim_loss(a: torch.Tensor, b: torch.Tensor) -> float:
    """1 - mean SSIM over every channel and every 11x11 window lying inside the image: what
    reflect padding by 5 followed by cropping the map's 5-pixel border leaves."""
    w = _gaussian_window()
    a, b = a.double(), b.double()
    values = [_ssim_of_window(a[n, c, i:i + 11, j:j + 11], b[n, c, i:i + 11, j:j + 11], w)
              for n in range(a.shape[0]) for c in range(a.shape[1])
              for i in range(a.shape[2] - 10) for j in range(a.shape[3] - 10)]
    return 1 - sum(values) / len(values)


def test_ssim_data_range_is_one():
    # Constant images 0.02 and 0.01: means 0.02, 0.01, no variance, so
    # SSIM = (2ab + c1) / (a^2 + b^2 + c1) with c1 = (0.01 * 1.0)^2 = 1e-4:
    # 0.0005 / 0.0006 = 5/6, loss 1/6. A data range taken from the images (0 here) would give
    # 0.0004 / 0.0005 = 0.8, loss 0.2; one of 0.01 (their spread) 0.00040001 / 0.00050001.
    a, b = torch.full((1, 2, 11, 11), 0.02), torch.full((1, 2, 11, 11), 0.01)
    assert float(ssim_loss(a, b)) == pytest.approx(1 / 6, abs=1e-5)
    assert float(ssim_loss(a, a)) == pytest.approx(0.0, abs=1e-6)


def test_ssim_one_window_by_hand():
    # 11x11: the cropped map keeps one pixel, the Gaussian-weighted statistics of the whole image.
    x = (torch.arange(121.0) / 120).reshape(1, 1, 11, 11)
    y = x**2
    # (float64 here, float32 in dite: they agree to ~2e-6; the wrong choices differ by > 0.01)
    assert float(ssim_loss(x, y)) == pytest.approx(_valid_ssim_loss(x, y), abs=1e-5)
    # Computed once with torchmetrics 1.4.1: 1 - StructuralSimilarityIndexMeasure(data_range=1.0)(x, y).
    # torchmetrics >= 1.5 no longer crops the border and gives 0.3107651 here.
    assert float(ssim_loss(x, y)) == pytest.approx(0.1804366, abs=1e-6)


def test_ssim_reflect_padding_then_border_crop():
    # Reflect-padding by 5, filtering with the 11x11 window and cropping 5 pixels from each
    # side of the map keeps exactly the windows that lie inside the image, so the value is the
    # mean over valid windows (2x3 per channel at 12x13, 21x21 at 31x31), computed here by hand.
    g = torch.Generator().manual_seed(1)
    a = torch.rand(2, 3, 12, 13, generator=g)
    b = (a + 0.2 * torch.randn(2, 3, 12, 13, generator=g)).clamp(0, 1)
    assert float(ssim_loss(a, b)) == pytest.approx(_valid_ssim_loss(a, b), abs=1e-5)
    big_a, big_b = torch.rand(1, 1, 31, 31, generator=g), torch.rand(1, 1, 31, 31, generator=g)
    assert float(ssim_loss(big_a, big_b)) == pytest.approx(_valid_ssim_loss(big_a, big_b), abs=1e-5)


def test_ssim_refuses_latents_smaller_than_its_window():
    # demo-sd3's 8x8 latent: torchmetrics 1.4 would average an empty map (NaN) and every
    # candidate would fail its threshold silently.
    with pytest.raises(ConfigError, match="at least 11x11"):
        ssim_loss(torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8))
