"""Sigma schedules and Euler ODE rollouts for rectified flow (Flux).

Time runs from sigma = 1 (noise) to sigma = 0 (image): x_sigma = (1 - sigma) x_0 + sigma x_1 and the
model predicts the velocity v = x_1 - x_0, so one Euler step is
    x_next = x + (sigma_next - sigma) * v_theta(x, sigma).
Plain PyTorch; the model is any `VelocityFn(latents, sigma) -> velocity`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

VelocityFn = Callable[[Tensor, Tensor], Tensor]  # (latents [B, S, C], sigma []) -> velocity [B, S, C]


def calculate_shift_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """Flux's resolution-dependent shift: mu grows linearly with the number of image tokens."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (image_seq_len - base_seq_len)


def flux_sigmas(
    num_steps: int,
    image_seq_len: int,
    *,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
    device: torch.device | str | None = None,
) -> Tensor:
    """The dynamically shifted grid of diffusers' FluxPipeline, terminal 0 appended: [num_steps + 1].

    sigmas = linspace(1, 1/N, N), then sigma' = e^mu / (e^mu + 1/sigma - 1); float32 like diffusers.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps}: need at least one step")
    mu = calculate_shift_mu(image_seq_len, base_seq_len, max_seq_len, base_shift, max_shift)
    base = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
    shifted = math.exp(mu) / (math.exp(mu) + (1.0 / base - 1.0))
    sigmas = torch.cat([shifted, torch.zeros(1, dtype=torch.float64)]).to(torch.float32)
    return sigmas.to(device) if device is not None else sigmas


def euler_step(latents: Tensor, velocity: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """x_next = x + (sigma_next - sigma) * v, in the latents' dtype (fp32 during training)."""
    return latents + (sigma_next - sigma) * velocity.to(latents.dtype)


@torch.no_grad()
def rollout(velocity_fn: VelocityFn, latents: Tensor, sigmas: Tensor, keep_trajectory: bool = False):
    """Deterministic Euler ODE from sigmas[0] to sigmas[-1] without a graph.

    Returns x_0 [B, S, C], or the list [x_{sigma_0}, ..., x_0] (N + 1 latents) with keep_trajectory.
    """
    x = latents
    trajectory = [x]
    for i in range(len(sigmas) - 1):
        x = euler_step(x, velocity_fn(x, sigmas[i]), sigmas[i], sigmas[i + 1])
        if keep_trajectory:
            trajectory.append(x)
    return trajectory if keep_trajectory else x
