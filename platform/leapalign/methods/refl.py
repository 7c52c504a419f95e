"""ReFL baseline (Xu et al. 2023), as the LeapAlign paper defines it for flow models.

Roll out without a graph to a random late step t (one of the last `last_steps`), take that one step
with a graph and leap straight to x_hat_0 = x_t - sigma_t v_theta(x_t); the reward is computed on
x_hat_0, so gradients only ever reach late steps. Cost: t + 1 forwards and one backward.
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
from leapalign.sampling import VelocityFn, euler_step


def sample_late_step(num_steps: int, last_steps: int, generator: torch.Generator) -> int:
    """A step index uniformly among the last `last_steps` (paper: m = 11 of T = 25)."""
    first = max(0, num_steps - last_steps)
    return int(torch.randint(first, num_steps, (1,), generator=generator).item())


def refl_rollout(velocity_fn: VelocityFn, latents: Tensor, sigmas: Tensor, t: int) -> Tensor:
    """x_hat_0 [B, S, C] with a graph through the single model call at step t."""
    x = latents.detach()
    with torch.no_grad():
        for i in range(t):
            x = euler_step(x, velocity_fn(x, sigmas[i]), sigmas[i], sigmas[i + 1])
    with torch.enable_grad():
        return x - sigmas[t] * velocity_fn(x, sigmas[t]).to(x.dtype)


def refl_loss(
    policy: FluxPolicy,
    prompts: list[str],
    reward_fn: RewardFn,
    cfg: Config,
    sigmas: Tensor,
    rng: StepRandomness,
) -> tuple[Tensor, dict[str, float | Tensor]]:
    opts = cfg.method.refl
    batch = prepare_batch(policy, prompts, cfg, rng)
    t = sample_late_step(len(sigmas) - 1, opts.last_steps, rng.steps)
    x0_hat = refl_rollout(batch.velocity, batch.latents, sigmas, t)
    rewards = decode_and_score(policy, x0_hat, prompts, reward_fn, cfg)
    loss = hinge_loss(rewards, None, opts.hinge)
    return loss, {
        "loss": loss.detach(),
        **reward_metrics(rewards),
        "refl/t": float(t),
        "refl/sigma_t": sigmas[t],
    }


def update_nfe_range(cfg: Config) -> tuple[int, int]:
    """(fewest, most) forward-equivalents of one update: t + 1 forwards and one backward, t among the last
    `last_steps` steps."""
    n, bw = cfg.sampler.num_steps, backward_cost(cfg)
    first = max(0, n - cfg.method.refl.last_steps)
    return direct_update_nfe(cfg, first + 1 + bw, n + bw)
