"""DRaFT-LV (Clark et al. 2024), as the LeapAlign paper defines it for flow models.

Only the last step keeps a graph. Roll out to x_{N-1} without one, take the last step with a graph (for
Euler with sigma_N = 0 the last step is the leap x_0 = x_{N-1} - sigma_{N-1} v), then n more times
re-noise sg(x_0) to sigma_{N-1} with fresh noise and take the last step again; the reward gradients of the
n + 1 images are summed (lower variance at the cost of n more forward + backward passes on one step).
"""

from __future__ import annotations

import torch
from torch import Tensor

from leapalign.config import Config
from leapalign.methods.common import (
    StepRandomness,
    backward_cost,
    decode_and_score,
    direct_update_nfe,
    hinge_loss,
    prepare_batch,
    reward_metrics,
)
from leapalign.models.flux import FluxPolicy
from leapalign.rewards.base import RewardFn
from leapalign.sampling import VelocityFn, rollout


def last_step_with_grad(velocity_fn: VelocityFn, x_last: Tensor, sigma_last: Tensor) -> Tensor:
    """x_0 = x_{N-1} - sigma_{N-1} v_theta(x_{N-1}): the final Euler step (sigma_N = 0), with a graph."""
    with torch.enable_grad():
        return x_last - sigma_last * velocity_fn(x_last, sigma_last).to(x_last.dtype)


def draft_lv_loss(
    policy: FluxPolicy,
    prompts: list[str],
    reward_fn: RewardFn,
    cfg: Config,
    sigmas: Tensor,
    rng: StepRandomness,
) -> tuple[Tensor, dict[str, float | Tensor]]:
    opts = cfg.method.draft_lv
    batch = prepare_batch(policy, prompts, cfg, rng)
    last = len(sigmas) - 2  # index of the last step; sigmas[last + 1] == 0
    # 1. No-grad rollout to x_{N-1}, then the last step with a graph.
    x_last = rollout(batch.velocity, batch.latents, sigmas[: last + 1])  # [B, S, C]
    x0 = last_step_with_grad(batch.velocity, x_last, sigmas[last])
    rewards = decode_and_score(policy, x0, prompts, reward_fn, cfg)
    loss = hinge_loss(rewards, None, opts.hinge)
    # 2. n re-noised repeats of the last step around sg(x_0): x' = (1 - s) sg(x_0) + s eps.
    sigma = sigmas[last]
    for _ in range(opts.extra_samples):
        eps = rng.randn_local(x0.shape, rng.noise).to(x0.device)  # drawn for the global batch
        renoised = (1 - sigma) * x0.detach() + sigma * eps
        extra = decode_and_score(
            policy, last_step_with_grad(batch.velocity, renoised, sigma), prompts, reward_fn, cfg
        )
        loss = loss + hinge_loss(extra, None, opts.hinge)  # the reward gradients are summed
    return loss, {"loss": loss.detach(), **reward_metrics(rewards)}


def update_nfe_range(cfg: Config) -> tuple[int, int]:
    """Forward-equivalents of one update: N - 1 rollout forwards, then the last step with a graph n + 1
    times (a forward and a backward each)."""
    n, repeats = cfg.sampler.num_steps, cfg.method.draft_lv.extra_samples + 1
    per_image = (n - 1) + repeats * (1 + backward_cost(cfg))
    return direct_update_nfe(cfg, per_image, per_image)
