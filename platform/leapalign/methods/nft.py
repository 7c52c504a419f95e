"""DiffusionNFT: online RL on the forward process (Zheng et al., arXiv 2509.16117), as pure math.

Source: NVlabs/DiffusionNFT `scripts/train_nft_sd3.py` (the loss: lines 908-972; the old policy's decay:
`return_decay`, lines 169-189, applied at 1033-1039); Flux settings from X-GenGroup/Flow-Factory
`src/flow_factory/trainers/nft.py` and `examples/nft/lora/flux1/default.yaml`.

A rollout of the "old" policy v_old (deterministic ODE, no CFG) gives clean samples x_0 and, per prompt
group, advantages A. At a trained grid sigma t with x_t = (1 - t) x_0 + t eps, with A_max = adv_clip:

    r     = clip(A, -A_max, A_max) / (2 A_max) + 1/2                    in [0, 1]: optimality probability
    v+    = beta v_theta + (1 - beta) v_old                              implicit positive policy
    v-    = (1 + beta) v_old - beta v_theta                              implicit negative policy
    x0+-  = x_t - t v+-                                                  their x_0 predictions
    L+-   = mean_dims (x0+- - x_0)^2 / sg(max(mean_dims |x0+- - x_0|, 1e-5))   adaptive weighting
    loss  = A_max mean_b (r L+ + (1 - r) L-) / beta  +  kl_beta mean_b mean_dims (v_theta - v_ref)^2

(the factor A_max is the reference's `policy_loss = (ori_policy_loss * adv_clip_max).mean()`). The policy
is pushed toward v+ on good samples (r > 1/2) and away through v- on bad ones. On-policy (v_theta = v_old
in value) both predictions equal x_hat = x_t - t v_old, both weights equal w = mean |x_hat - x_0|, and

    d loss / d v_b = -(2 t A'_b / (B D w_b)) (x_hat_b - x_0,b),     A' = clip(A, -A_max, A_max),

whatever beta and A_max (D = latent elements per sample): advantage-weighted flow matching toward x_0.
After each rollout's updates the old policy moves: old <- d old + (1 - d) theta, d = min(rate k, cap) after k
optimizer steps (`forward_process.copy_decay`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from leapalign.config import Config
from leapalign.methods.forward_process import forward_update_nfe

WEIGHT_FLOOR = 1e-5  # the reference's .clip(min=0.00001) on the adaptive weight


def _per_sample(t: Tensor, like: Tensor) -> Tensor:
    """t [] or [B] -> broadcastable to like [B, ...]."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return t.view(-1, *([1] * (like.ndim - 1))) if t.ndim == 1 else t


def optimality_probability(advantages: Tensor, adv_clip: float) -> Tensor:
    """r = clip(A, +-A_max) / (2 A_max) + 1/2, clamped to [0, 1]: [B], no graph."""
    if adv_clip <= 0:
        raise ValueError(f"adv_clip={adv_clip} must be > 0 (DiffusionNFT: 5)")
    clipped = advantages.detach().clamp(-adv_clip, adv_clip)
    return (clipped / adv_clip / 2.0 + 0.5).clamp(0.0, 1.0)


def adaptive_x0_loss(x0_pred: Tensor, x0: Tensor) -> Tensor:
    """mean_dims (x0_pred - x0)^2 / sg(max(mean_dims |x0_pred - x0|, 1e-5)): [B] (the weight in float64)."""
    dims = tuple(range(1, x0.ndim))
    with torch.no_grad():
        weight = (x0_pred.double() - x0.double()).abs().mean(dim=dims, keepdim=True).clamp_min(WEIGHT_FLOOR)
    return ((x0_pred - x0) ** 2 / weight.to(x0_pred.dtype)).mean(dim=dims)


def nft_loss(
    velocity: Tensor,
    old_velocity: Tensor,
    latents: Tensor,
    x0: Tensor,
    sigma: Tensor,
    advantages: Tensor,
    *,
    beta: float,
    adv_clip: float,
    ref_velocity: Tensor | None = None,
    kl_beta: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The DiffusionNFT loss of B (sample, sigma) pairs (module docstring); mean over the B.

    velocity [B, S, C] v_theta(x_t) with graph; old_velocity, ref_velocity [B, S, C] no graph; latents x_t and
    x0 [B, S, C] constants; sigma [] or [B]; advantages [B]. Metrics are tensors (`nft/...`).
    """
    if beta <= 0:
        raise ValueError(f"beta={beta} must be > 0: the loss divides by it (DiffusionNFT: 1.0)")
    if kl_beta > 0 and ref_velocity is None:
        raise ValueError("kl_beta > 0 needs ref_velocity (the reference policy's prediction at x_t)")
    t = _per_sample(sigma, latents)
    old = old_velocity.detach()
    r = optimality_probability(advantages, adv_clip).to(velocity.dtype)  # [B]
    positive = beta * velocity + (1 - beta) * old  # v+
    negative = (1 + beta) * old - beta * velocity  # v-
    positive_loss = adaptive_x0_loss(latents - t * positive, x0)  # L+ [B]
    negative_loss = adaptive_x0_loss(latents - t * negative, x0)  # L- [B]
    per_sample = (r * positive_loss + (1 - r) * negative_loss) / beta  # [B]
    policy_loss = adv_clip * per_sample.mean()  # the reference's x adv_clip_max
    loss = policy_loss
    metrics = {
        "nft/policy_loss": policy_loss.detach(),
        "nft/old_deviation": ((velocity.detach() - old) ** 2).mean(),
    }
    if kl_beta > 0:
        kl = ((velocity - ref_velocity.detach()) ** 2).flatten(1).mean(dim=1).mean()  # v-space KL
        loss = loss + kl_beta * kl
        metrics["nft/kl"] = kl.detach()
    return loss, metrics


def update_nfe_range(cfg: Config) -> tuple[int, int]:
    """Forward-equivalents of one update (fewest = most): the forward process's, with v_old's forward at
    every trained pair."""
    cost = forward_update_nfe(cfg, cfg.method.nft, copy_forwards=1, later_images=0)
    return cost, cost
