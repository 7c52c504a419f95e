"""AWM, Advantage Weighted Matching (Xue et al., arXiv 2509.25050), as pure math.

Source: scxue/advantage_weighted_matching `advantage_weighted_matching/scripts/train_sd3_awm.py` (the
log-likelihood surrogate `compute_log_prob_awm`, lines 210-252; the loss, lines 1292-1354; the EMA policy's
decay, lines 1409-1419); Flux settings from X-GenGroup/Flow-Factory `src/flow_factory/trainers/awm.py` and
`examples/awm/lora/flux1/default.yaml`.

Clean samples x_0 of the ODE rollout, per-group advantages A; at a trained grid sigma t with
x_t = (1 - t) x_0 + t eps, the flow-matching error of the velocity against its target eps - x_0 stands in
for the policy's log-likelihood of x_0 (the ELBO up to constants and a t-dependent weight):

    m       = mean_dims (v_theta(x_t) - (eps - x_0))^2                        (float64)
    log p   = -m                     uniform
            = -m t,  -m t^2          t, t**2
            = -(sqrt(m + 1e-10) - 1e-5) t                                     huber
            = -((m + 1e-10)^q - (1e-10)^q) t / q                              ghuber (default, q = 0.25)
    ratio   = exp(log p - log p_old)                 per (sample, t): the reference's loss_type=exp_first
    policy  = mean max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps))            PPO's clipped surrogate
    loss    = policy + kl_beta mean (v_theta - v_ref)^2 + ema_kl_beta mean (v_theta - v_ema)^2

v_ref is the reference (LoRA adapter off), v_ema an EMA copy of the trained weights: ema <- d ema +
(1 - d) theta after each rollout, d = min(rate k, cap) after k optimizer steps. On-policy (the first
optimizer step of a rollout) ratio = 1 and the gradient is the advantage-weighted flow-matching gradient

    d policy / d v_b = (A_b / B) w'(m_b) (2 / D) (v_b - (eps_b - x_0,b)),   w'(m) = d(-log p)/dm
    (uniform 1, t: t, ghuber: t (m + 1e-10)^(q - 1)).
"""

from __future__ import annotations

import torch
from torch import Tensor

from leapalign.config import AWM_WEIGHTINGS, Config
from leapalign.methods.forward_process import forward_update_nfe
from leapalign.methods.grpo import ppo_clipped_loss

_EPS = 1e-10  # the reference's 1e-10 inside the root


def awm_log_prob(
    velocity: Tensor, x0: Tensor, noise: Tensor, sigma: Tensor, weighting: str = "ghuber", power: float = 0.25
) -> Tensor:
    """AWM's surrogate log-likelihood [B] of x_0 at sigma (module docstring), in float64, graph to velocity.

    velocity, x0, noise [B, S, C]; sigma [] or [B]."""
    if weighting not in AWM_WEIGHTINGS:
        raise ValueError(f"unknown AWM weighting {weighting!r}: use one of {AWM_WEIGHTINGS}")
    if weighting == "ghuber" and power <= 0:
        raise ValueError(f"ghuber power={power} must be > 0 (AWM: 0.25)")
    target = noise.double() - x0.double()  # eps - x_0
    mse = ((velocity.double() - target) ** 2).flatten(1).mean(dim=1)  # m [B]
    t = torch.as_tensor(sigma, dtype=torch.float64, device=mse.device).reshape(-1)  # [1] or [B]
    if weighting == "uniform":
        return -mse
    if weighting == "t":
        return -mse * t
    if weighting == "t2":
        return -mse * t**2
    if weighting == "huber":
        return -(torch.sqrt(mse + _EPS) - 1e-5) * t
    floor = torch.tensor(_EPS, dtype=torch.float64, device=mse.device) ** power
    return -((mse + _EPS) ** power - floor) * t / power  # ghuber


def awm_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    velocity: Tensor,
    *,
    clip_range: float,
    ref_velocity: Tensor | None = None,
    kl_beta: float = 0.0,
    ema_velocity: Tensor | None = None,
    ema_kl_beta: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor | float]]:
    """The AWM loss of B (sample, sigma) pairs: PPO's clipped surrogate on `awm_log_prob` plus the two
    velocity-space KL terms (module docstring). log_prob [B] with graph; old_log_prob, advantages [B];
    velocity [B, S, C] with graph; ref_velocity, ema_velocity [B, S, C] no graph when their beta > 0."""
    if kl_beta > 0 and ref_velocity is None:
        raise ValueError("kl_beta > 0 needs ref_velocity (the reference policy's prediction at x_t)")
    if ema_kl_beta > 0 and ema_velocity is None:
        raise ValueError("ema_kl_beta > 0 needs ema_velocity (the EMA policy's prediction at x_t)")
    policy_loss, ppo = ppo_clipped_loss(log_prob, old_log_prob, advantages.to(log_prob.dtype), clip_range)
    loss = policy_loss.float()
    metrics: dict[str, Tensor | float] = {
        "awm/policy_loss": policy_loss.detach().float(),
        "awm/ratio_mean": ppo["grpo/ratio_mean"],
        "awm/clip_frac": ppo["grpo/clip_frac"],
        "awm/log_prob": log_prob.detach().float().mean(),
    }
    for name, other, weight in (("kl", ref_velocity, kl_beta), ("ema_kl", ema_velocity, ema_kl_beta)):
        if weight > 0:
            kl = ((velocity - other.detach()) ** 2).flatten(1).mean(dim=1).mean()
            loss = loss + weight * kl
            metrics[f"awm/{name}"] = kl.detach()
    return loss, metrics


def update_nfe_range(cfg: Config) -> tuple[int, int]:
    """Forward-equivalents of one update (fewest = most): the forward process's, with v_ema's forward at
    every trained pair when ema_kl_beta > 0, and the later optimizer steps' pairs scored once more under the
    rollout weights (the first step's share holds ceil(images / U) images: torch.tensor_split)."""
    opts = cfg.method.awm
    images = cfg.train.batch_size * opts.group_size
    later = images - -(-images // opts.updates_per_rollout)
    cost = forward_update_nfe(cfg, opts, copy_forwards=1 if opts.ema_kl_beta > 0 else 0, later_images=later)
    return cost, cost
