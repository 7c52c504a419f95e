"""DRTune (Wu et al. 2024), as the LeapAlign paper defines it for flow models.

Every model call sees a stop-gradient input, v_i = v_theta(sg(x_i)), so no gradient flows through the
model's input Jacobian (the term that makes full backprop unstable and LeapAlign discounts with alpha).
Only K evenly spaced calls keep their velocity gradients; the rest run without a graph. The rollout
stops early at a random step t among the last m and leaps to x_hat_0 = x_t - sigma_t v_theta(sg(x_t)),
on which the reward is computed. With x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v_i,

    d x_hat_0 / d theta = sum_{i in K, i < t} (sigma_{i+1} - sigma_i) dv_i/dtheta - [t in K] sigma_t dv_t/dtheta,

and d x_hat_0 / d x_0 is exactly the identity. The K calls are chosen among the t + 1 calls 0..t
(the leap included) at spacing (t + 1) / K with a uniform random offset.
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
from leapalign.methods.refl import sample_late_step
from leapalign.models.flux import FluxPolicy
from leapalign.rewards.base import RewardFn
from leapalign.sampling import VelocityFn


def sample_grad_steps(num_calls: int, grad_steps: int, generator: torch.Generator) -> list[int]:
    """K distinct call indices in [0, num_calls), evenly spaced with a random offset."""
    k = min(grad_steps, num_calls)
    spacing = num_calls / k
    offset = float(torch.rand((), generator=generator)) * spacing
    return sorted({min(num_calls - 1, int(offset + i * spacing)) for i in range(k)})


def drtune_rollout(
    velocity_fn: VelocityFn, latents: Tensor, sigmas: Tensor, t: int, grad_calls: list[int]
) -> Tensor:
    """x_hat_0 [B, S, C]: rollout to step t then a leap, with graphs only at `grad_calls`, inputs detached."""
    x = latents.detach()
    with torch.enable_grad():
        for i in range(t + 1):
            model_input = x.detach()  # sg(x_i): no gradient through the model's input
            if i in grad_calls:
                velocity = velocity_fn(model_input, sigmas[i])
            else:
                with torch.no_grad():
                    velocity = velocity_fn(model_input, sigmas[i])
            next_sigma = sigmas[i + 1] if i < t else torch.zeros_like(sigmas[i])  # the last call leaps to 0
            x = x + (next_sigma - sigmas[i]) * velocity.to(x.dtype)
    return x


def drtune_loss(
    policy: FluxPolicy,
    prompts: list[str],
    reward_fn: RewardFn,
    cfg: Config,
    sigmas: Tensor,
    rng: StepRandomness,
) -> tuple[Tensor, dict[str, float | Tensor]]:
    opts = cfg.method.drtune
    batch = prepare_batch(policy, prompts, cfg, rng)
    t = sample_late_step(len(sigmas) - 1, opts.last_steps, rng.steps)
    grad_calls = sample_grad_steps(t + 1, opts.grad_steps, rng.steps)
    x0_hat = drtune_rollout(batch.velocity, batch.latents, sigmas, t, grad_calls)
    rewards = decode_and_score(policy, x0_hat, prompts, reward_fn, cfg)
    loss = hinge_loss(rewards, None, opts.hinge)
    return loss, {"loss": loss.detach(), **reward_metrics(rewards), "drtune/t": float(t)}


def update_nfe_range(cfg: Config) -> tuple[int, int]:
    """(fewest, most) forward-equivalents of one update: t + 1 forwards, a backward through each of the
    (at most K) calls with a graph; t among the last `last_steps` steps."""
    n, bw, opts = cfg.sampler.num_steps, backward_cost(cfg), cfg.method.drtune
    first = max(0, n - opts.last_steps)
    fewest = first + 1 + min(opts.grad_steps, first + 1) * bw
    return direct_update_nfe(cfg, fewest, n + min(opts.grad_steps, n) * bw)
