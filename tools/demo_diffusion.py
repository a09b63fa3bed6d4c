"""The DDPM training quantities of the demo DiT: its noise schedule, q(x_t | x_0), and the
improved-DDPM hybrid loss (L_simple on epsilon + L_vlb on the learned-range variance)."""

from __future__ import annotations

import math

import torch

# The demo DiT's noise schedule: improved DDPM's cosine, not DiT-XL/2's linear 1e-4..0.02. On
# small latents the linear schedule spends half of its timesteps at SNR < 0.1 (alpha_bar(500)
# = 0.078), where epsilon-prediction is nearly free and teaches little; improved DDPM (Nichol
# & Dhariwal 2021) found the same at 64x64 px and below. (It was not what made the earlier demo
# DiT draw several blobs: that was the 8x-down 4-channel VAE, see models/demo/README.md.)
DIT_BETA_SCHEDULE = "squaredcos_cap_v2"


class GaussianDiffusion:
    """The DDPM quantities DiT trains with (1000 betas of dite's own scheduler code, so training
    and sampling share one schedule), and the improved-DDPM hybrid loss (L_simple on epsilon +
    L_vlb on the learned-range variance, mean frozen)."""

    def __init__(self, steps: int = 1000, schedule: str = DIT_BETA_SCHEDULE):
        from dite.schedulers.betas import make_betas

        betas = make_betas(steps, 1e-4, 0.02, schedule).double()
        self.T = steps
        self.betas = betas
        acp = torch.cumprod(1 - betas, 0)
        acp_prev = torch.cat([torch.ones(1, dtype=torch.float64), acp[:-1]])
        self.sqrt_acp, self.sqrt_1m_acp = acp.sqrt(), (1 - acp).sqrt()
        self.sqrt_recip_acp, self.sqrt_recipm1_acp = (1 / acp).sqrt(), (1 / acp - 1).sqrt()
        var = betas * (1 - acp_prev) / (1 - acp)
        self.post_logvar = torch.log(torch.cat([var[1:2], var[1:]]))
        self.post_c1 = betas * acp_prev.sqrt() / (1 - acp)
        self.post_c2 = (1 - acp_prev) * (1 - betas).sqrt() / (1 - acp)
        self.log_betas = betas.log()

    @staticmethod
    def _at(table, t):
        return table[t].float().view(-1, 1, 1, 1)

    def q_sample(self, x0, t, noise):
        return self._at(self.sqrt_acp, t) * x0 + self._at(self.sqrt_1m_acp, t) * noise

    def min_snr_weight(self, t, gamma: float) -> torch.Tensor:
        """Min-SNR-gamma (Hang et al. 2023) for epsilon-prediction: min(SNR, gamma) / SNR. The
        low-noise steps, whose epsilon error dominates an unweighted loss, stop pulling the
        gradients away from the mid- and high-noise steps that decide an image's layout."""
        acp = self.sqrt_acp[t].pow(2)
        snr = acp / (1 - acp)
        return (snr.clamp(max=gamma) / snr).float()

    def loss(self, out, x0, xt, t, noise, min_snr: float = 0.0):
        c = x0.shape[1]
        eps, v = out[:, :c], out[:, c:]
        mse = (eps - noise).pow(2).mean(dim=(1, 2, 3))
        if min_snr:
            mse = mse * self.min_snr_weight(t, min_snr)
        # Variance: log sigma^2 between the posterior's and beta_t (learned range).
        frac = (v + 1) / 2
        logvar = frac * self._at(self.log_betas, t) + (1 - frac) * self._at(self.post_logvar, t)
        x0_pred = self._at(self.sqrt_recip_acp, t) * xt - self._at(self.sqrt_recipm1_acp, t) * eps.detach()
        mean = self._at(self.post_c1, t) * x0_pred + self._at(self.post_c2, t) * xt
        true_mean = self._at(self.post_c1, t) * x0 + self._at(self.post_c2, t) * xt
        true_logvar = self._at(self.post_logvar, t)
        kl = 0.5 * (-1 + logvar - true_logvar + (true_logvar - logvar).exp() + (true_mean - mean).pow(2) * (-logvar).exp())
        kl = kl.mean(dim=(1, 2, 3)) / math.log(2)
        nll = -discretized_gaussian_loglik(x0, mean, 0.5 * logvar).mean(dim=(1, 2, 3)) / math.log(2)
        vb = torch.where(t == 0, nll, kl)
        return mse.mean(), vb.mean()


def _approx_std_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_loglik(x, means, log_scales):
    """Log-likelihood of x in [-1, 1] under a Gaussian discretised to 256 bins (improved DDPM)."""
    centred = x - means
    inv = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv * (centred + 1 / 255))
    cdf_min = _approx_std_normal_cdf(inv * (centred - 1 / 255))
    log_cdf_plus = cdf_plus.clamp(min=1e-12).log()
    log_1m_cdf_min = (1 - cdf_min).clamp(min=1e-12).log()
    delta = (cdf_plus - cdf_min).clamp(min=1e-12).log()
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_1m_cdf_min, delta))
