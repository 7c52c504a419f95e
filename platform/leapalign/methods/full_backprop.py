"""Full backpropagation through the sampler (DRaFT / AlignProp): the graph of every step is kept.

Activation memory grows linearly with the number of steps (gradient checkpointing inside the transformer
trades that memory for recomputation). It is the cost reference of the benchmarks.
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


def update_nfe_range(cfg: Config) -> tuple[int, int]:
    """Forward-equivalents of one update: N forwards and N backwards (the graph spans every step)."""
    n = cfg.sampler.num_steps
    per_image = n + n * backward_cost(cfg)
    return direct_update_nfe(cfg, per_image, per_image)
