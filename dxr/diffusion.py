"""Noise schedules, the training loss and the samplers of DDPM/DDIM (built on ``dxr.ops``)."""

from __future__ import annotations

import math

import torch


def linear_schedule(num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 2e-2) -> torch.Tensor:
    """ᾱ_t (float64, (num_steps,)) of the linear β schedule of Ho et al. 2020."""
    betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


def cosine_schedule(num_steps: int = 1000, s: float = 8e-3, max_beta: float = 0.999) -> torch.Tensor:
    """ᾱ_t (float64, (num_steps,)) of the cosine schedule of Nichol & Dhariwal 2021, β clipped at max_beta."""
    steps = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=max_beta)
    return torch.cumprod(1 - betas, 0)
