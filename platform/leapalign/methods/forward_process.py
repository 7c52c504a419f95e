"""What DiffusionNFT and AWM share: they train on the forward (noising) process of clean rollout samples.

Both roll out the deterministic ODE, score the clean x_0, and then, instead of a policy gradient through
the sampler's steps, re-noise x_0 to a few grid sigmas and regress the velocity there:

    x_t = (1 - sigma_t) x_0 + sigma_t eps,   eps ~ N(0, I),   target velocity eps - x_0

    plan_timesteps   which grid sigmas each sample is trained at ([B, N] bool, a GRPO `StepPlan.train`)
    noise_latents    x_t from x_0 and eps
    forward_update_nfe  the cost formula both methods' own `update_nfe_range` build on
    copy_decay       the ramped decay of the weight copy each method keeps (DiffusionNFT's "old" policy,
                     AWM's EMA-KL target): copy <- d copy + (1 - d) current after each rollout

Everything here is plain PyTorch on tensors; the recipe (leapalign.recipes.forward) owns the model calls.
"""

from __future__ import annotations

import torch
from torch import Tensor

from leapalign.compute import backward_nfe
from leapalign.config import TIMESTEP_SAMPLINGS, AWMConfig, Config, NFTConfig


def plan_timesteps(
    sampling: str,
    num_steps: int,
    batch_size: int,
    count: int,
    timestep_range: float,
    generator: torch.Generator,
) -> Tensor:
    """[B, N] bool: the grid steps (sigmas_0 .. sigmas_{N-1}) each sample is trained at, `count` per sample.

    Eligible steps are the first E = max(count, int(timestep_range N)) of the grid (index 0 = pure noise).
      random      each sample its own uniform random subset of `count` eligible steps (DiffusionNFT's
                  train_nft_sd3.py: a per-sample permutation of the N steps, its first int(0.99 N))
      stratified  [0, E) cut into `count` strata (boundaries floor(linspace(0, E, count + 1))), one uniform
                  step from each, per sample (AWM's time_type=discrete and Flow-Factory's discrete sampler,
                  which draw one set per micro-batch)
    """
    if sampling not in TIMESTEP_SAMPLINGS:
        raise ValueError(f"unknown timestep sampling {sampling!r}: use one of {TIMESTEP_SAMPLINGS}")
    if not 1 <= count <= num_steps:
        raise ValueError(f"count={count} trained steps per sample must lie in [1, num_steps={num_steps}]")
    if not 0.0 < timestep_range <= 1.0:
        raise ValueError(f"timestep_range={timestep_range} must lie in (0, 1]: the share of steps eligible")
    eligible = max(count, int(timestep_range * num_steps))
    plan = torch.zeros(batch_size, num_steps, dtype=torch.bool)
    if sampling == "random":
        order = torch.rand(batch_size, eligible, generator=generator).argsort(dim=1)  # [B, E]
        plan.scatter_(1, order[:, :count], True)
    else:
        bounds = torch.linspace(0, eligible, count + 1, dtype=torch.float64).floor().long()  # [K + 1]
        lower, width = bounds[:-1], bounds[1:] - bounds[:-1]  # width >= 1 because E >= K
        u = torch.rand(batch_size, count, generator=generator, dtype=torch.float64)  # [B, K]
        steps = lower + (u * width).long().clamp_max(width - 1)  # [B, K], distinct: one per stratum
        plan.scatter_(1, steps, True)
    return plan


def noise_latents(x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
    """x_t = (1 - sigma) x_0 + sigma eps: [B, S, C]; sigma [] or [B]. No graph reaches x_0 (a rollout
    constant)."""
    sigma = torch.as_tensor(sigma, dtype=x0.dtype, device=x0.device)
    if sigma.ndim == 1:
        sigma = sigma.view(-1, *([1] * (x0.ndim - 1)))
    return (1 - sigma) * x0.detach() + sigma * noise.to(x0.dtype)


def copy_decay(optimizer_steps: int, rate: float, cap: float) -> float:
    """d = min(rate * optimizer_steps, cap): the weight copy's decay after `optimizer_steps` optimizer steps.

    DiffusionNFT's return_decay (decay_type 1: rate 0.001, cap 0.5; no flat phase) and AWM's
    kl_ema_decay_type=linear (rate 0.001, cap 0.3) are this schedule on the global optimizer step count;
    Flow-Factory's piecewise_linear / linear-from-0 schedules are the same on its epoch index. d = 0 makes
    the copy the current weights: DiffusionNFT on-policy.
    """
    if optimizer_steps < 0 or rate < 0 or not 0.0 <= cap < 1.0:
        raise ValueError(
            f"optimizer_steps={optimizer_steps}, rate={rate} must be >= 0 and cap={cap} in [0, 1)"
        )
    return min(rate * optimizer_steps, cap)


def forward_update_nfe(
    cfg: Config, opts: NFTConfig | AWMConfig, copy_forwards: int, later_images: int
) -> int:
    """Forward-equivalents of one update: N rollout forwards per image; per trained pair (K per image) a
    forward and its backward, the reference's forward (kl_beta > 0) and `copy_forwards` of the weight copy;
    and one forward per pair of `later_images` (AWM scores its later optimizer steps' pairs under the
    rollout weights)."""
    images, k = cfg.train.batch_size * opts.group_size, opts.train_timesteps
    bw = backward_nfe(cfg.finetune.gradient_checkpointing)
    per_pair = 1 + bw + (1 if opts.kl_beta > 0 else 0) + copy_forwards
    return images * (cfg.sampler.num_steps + k * per_pair) + k * later_images
