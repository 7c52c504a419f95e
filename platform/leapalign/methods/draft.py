"""DRaFT-LV (Clark et al. 2024) and full backpropagation through the sampler (DRaFT / AlignProp).

DRaFT-LV, as the LeapAlign paper defines it for flow models: only the last step keeps a graph. Roll
out to x_{N-1} without one, take the last step with a graph (for Euler with sigma_N = 0 the last step
is the leap x_0 = x_{N-1} - sigma_{N-1} v), then n more times re-noise sg(x_0) to sigma_{N-1} with
fresh noise and take the last step again; the reward gradients of the n + 1 images are summed (lower
variance at the cost of n more forward + backward passes on one step).

Full backprop keeps the graph of every step: activation memory grows linearly with the number of
steps (gradient checkpointing inside the transformer trades that memory for recomputation). It is
the cost reference of the benchmarks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from leapalign.config import Config
from leapalign.methods.common import (
    StepRandomness,
    decode_and_score,
    hinge_loss,
    prepare_batch,
    reward_metrics,
)
from leapalign.models.flux import FluxPolicy
from leapalign.rewards.base import RewardFn
from leapalign.sampling import VelocityFn, euler_step, rollout


def full_backprop_rollout(velocity_fn: VelocityFn, latents: Tensor, sigmas: Tensor) -> Tensor:
    """x_0 [B, S, C] with a graph through all N model calls."""
    x = latents.detach()
    with torch.enable_grad():
        for i in range(len(sigmas) - 1):
            x = euler_step(x, velocity_fn(x, sigmas[i]), sigmas[i], sigmas[i + 1])
    return x


def full_backprop_loss(
    policy: FluxPolicy,
    prompts: list[str],
    reward_fn: RewardFn,
    cfg: Config,
    sigmas: Tensor,
    rng: StepRandomness,
) -> tuple[Tensor, dict[str, float | Tensor]]:
    batch = prepare_batch(policy, prompts, cfg, rng)
    x0 = full_backprop_rollout(batch.velocity, batch.latents, sigmas)
    rewards = decode_and_score(policy, x0, prompts, reward_fn, cfg)
    loss = hinge_loss(rewards, None, cfg.method.full_backprop.hinge)
    return loss, {"loss": loss.detach(), **reward_metrics(rewards)}


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
