"""LeapAlign: reward gradients at any generation step through a two-step trajectory (arXiv 2604.15311).

One update rolls out the full deterministic ODE trajectory x_{sigma_0} -> ... -> x_0 (Eq. 4), and
records a graph only at two steps k < j:

    leap 1      x_hat_j = x_k - (sigma_k - sigma_j) v_theta(x_k)                     (Eq. 5)
    connector   x_j    := x_hat_j + sg(x_j - x_hat_j)       value = rollout latent   (Eq. 6)
    discount    input_j = alpha x_j + (1 - alpha) sg(x_j)                            (Eq. 9)
    leap 2      x_hat_0 = x_j - sigma_j v_theta(input_j)                             (Eq. 7)
    connector   x_0    := x_hat_0 + sg(x_0 - x_hat_0)       reward on the real image

so that (Eq. 8/10), with the rollout constants x_k, x_j:
    dx_0/dtheta = - sigma_j dv(x_j)/dtheta - (sigma_k - sigma_j) dv(x_k)/dtheta
                  + alpha sigma_j (sigma_k - sigma_j) dv(x_j)/dx_j . dv(x_k)/dtheta.

Straight-through values are written as `value + (g - sg(g))` rather than `g + sg(value - g)`: the two
have the same gradient, but only the first is bit-exact in floating point (`a + (b - a)` is not
always `b`), which keeps the rollout's latents identical to a plain no-grad rollout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from leapalign.config import Config, LeapConfig
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
from leapalign.sampling import VelocityFn, euler_step, rollout


def _straight_through(value: Tensor, grad_source: Tensor, scale: float = 1.0) -> Tensor:
    """Exactly `value` in the forward pass; d out / d grad_source = scale in the backward pass."""
    return value + scale * (grad_source - grad_source.detach())


# ----------------------------------------------------------------------------- leap pair laws


def leap_pair_probabilities(sigmas: Tensor, cfg: LeapConfig) -> Tensor:
    """P[k, j] for every pair of step indices k < j of an N-step trajectory: [N, N], upper triangular.

    Index 0 is the pure-noise step; sigmas is the [N + 1] grid (terminal 0 included). Laws:
      uniform      every pair equally likely (the paper's default: the whole trajectory)
      sigma_range  uniform over pairs whose two sigmas lie in [sigma_min, sigma_max]
      fixed_gap    j = k + gap, k uniform (the paper's fixed-gap ablation)
      beta         P[k, j] ~ m_k m_j with m_i the Beta(a, b) mass of step i's sigma interval
                   [sigma_{i+1}, sigma_i] (midpoint rule); a = b = 1 weighs steps by their length
    """
    num_steps = len(sigmas) - 1
    step_sigmas = sigmas[:-1].double()
    upper = torch.ones(num_steps, num_steps, dtype=torch.float64).triu(diagonal=1)
    if cfg.distribution == "uniform":
        weights = upper
    elif cfg.distribution == "sigma_range":
        inside = ((step_sigmas >= cfg.sigma_min) & (step_sigmas <= cfg.sigma_max)).double()
        weights = upper * inside[:, None] * inside[None, :]
        if weights.sum() == 0:
            raise ValueError(
                f"leap.sigma_min={cfg.sigma_min}, leap.sigma_max={cfg.sigma_max} contain fewer than two of the "
                f"{num_steps} step sigmas {[round(s, 3) for s in step_sigmas.tolist()]}: widen the range"
            )
    elif cfg.distribution == "fixed_gap":
        if not 1 <= cfg.gap < num_steps:
            raise ValueError(f"leap.gap={cfg.gap} must be in [1, {num_steps - 1}] for {num_steps} steps")
        weights = torch.ones(num_steps, num_steps, dtype=torch.float64).triu(cfg.gap).tril(cfg.gap)
    elif cfg.distribution == "beta":
        beta = torch.distributions.Beta(
            torch.tensor(cfg.beta_a, dtype=torch.float64), torch.tensor(cfg.beta_b, dtype=torch.float64)
        )
        lo, hi = sigmas[1:].double(), sigmas[:-1].double()
        mid = ((lo + hi) / 2).clamp(1e-6, 1 - 1e-6)
        mass = beta.log_prob(mid).exp() * (hi - lo)
        weights = upper * mass[:, None] * mass[None, :]
    else:
        raise ValueError(f"unknown leap distribution {cfg.distribution!r}")
    return weights / weights.sum()


def sample_leap_pair(probabilities: Tensor, generator: torch.Generator) -> tuple[int, int]:
    """Draw one pair (k, j), k < j, from an [N, N] pair law; the generator makes it reproducible."""
    flat = torch.multinomial(probabilities.flatten().float(), 1, generator=generator).item()
    k, j = divmod(int(flat), probabilities.shape[1])
    return k, j


# ----------------------------------------------------------------------------- the two-step rollout


@dataclass
class LeapRollout:
    """What one LeapAlign rollout hands to the loss. Latents are [B, S, C] (packed Flux tokens)."""

    x0: Tensor  # real final latents; value = ODE rollout, gradient through leap 2 (connector 2)
    x0_hat: Tensor  # leap-2 prediction of x_0 (with graph)
    d_j: Tensor  # [B] mean |x_j - x_hat_j|, no grad
    d_0: Tensor  # [B] mean |x_0 - x_hat_0|, no grad
    k: int
    j: int
    trajectory: list[Tensor] | None  # detached latents [x_{sigma_0}, ..., x_0] when asked for


def _mean_abs(diff: Tensor) -> Tensor:
    return diff.detach().abs().flatten(1).mean(dim=1)


def rollout_with_leaps(
    velocity_fn: VelocityFn,
    latents: Tensor,
    sigmas: Tensor,
    k: int,
    j: int,
    alpha: float,
    keep_trajectory: bool = False,
) -> LeapRollout:
    """Full Euler rollout that keeps a graph only for the model calls at steps k and j (k < j).

    Memory: two transformer graphs, whatever the number of steps. The rollout itself always
    continues from detached latents, so its values equal those of `sampling.rollout`.
    """
    num_steps = len(sigmas) - 1
    if not 0 <= k < j < num_steps:
        raise ValueError(f"need 0 <= k < j < num_steps={num_steps}, got k={k}, j={j}")
    x = latents.detach()
    trajectory = [x] if keep_trajectory else None
    x_hat_j = x0_hat = d_j = None
    for i in range(num_steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if i == k:
            with torch.enable_grad():
                velocity = velocity_fn(x, sigma)  # graph 1: dv(x_k)/dtheta
                x_hat_j = x - (sigma - sigmas[j]) * velocity.to(x.dtype)  # leap 1 (Eq. 5)
            velocity = velocity.detach()  # the rollout's own step at k uses sg(v)
        elif i == j:
            with torch.enable_grad():
                x_j = _straight_through(x, x_hat_j)  # connector 1 (Eq. 6)
                model_input = _straight_through(x, x_hat_j, scale=alpha)  # alpha x_j + (1 - alpha) sg(x_j)
                velocity = velocity_fn(model_input, sigma)  # graph 2: dv(x_j)/dtheta, dv/dx_j
                x0_hat = x_j - sigma * velocity.to(x.dtype)  # leap 2 (Eq. 7): sigma_0 = 0
            d_j = _mean_abs(x - x_hat_j)
            velocity = velocity.detach()
        else:
            with torch.no_grad():
                velocity = velocity_fn(x, sigma)
        x = euler_step(x, velocity, sigma, sigma_next).detach()
        if keep_trajectory:
            trajectory.append(x)
    x0 = _straight_through(x, x0_hat)  # connector 2: the reward sees the real x_0
    return LeapRollout(
        x0=x0, x0_hat=x0_hat, d_j=d_j, d_0=_mean_abs(x - x0_hat), k=k, j=j, trajectory=trajectory
    )


# ----------------------------------------------------------------------------- weighting and loss


def weight_cap(tau: float, mode: str) -> float | None:
    """The largest similarity weight (both distances at the floor tau), or None for mode "none"."""
    return {"both": 1.0 / (2 * tau), "d_j": 1.0 / tau, "d_0": 1.0 / tau}.get(mode)


def similarity_weight(d_j: Tensor, d_0: Tensor, tau: float, mode: str = "both") -> Tensor:
    """w = 1 / (max(d_j, tau) + max(d_0, tau)) per sample, no grad (Eq. 11-12); w <= 1 / (2 tau).

    Ablations: `d_j` or `d_0` keep one distance (w = 1 / max(d, tau), so w <= 1 / tau); `none` gives 1.
    """
    d_j, d_0 = d_j.detach(), d_0.detach()
    if mode == "both":
        return 1.0 / (d_j.clamp_min(tau) + d_0.clamp_min(tau))
    if mode == "d_j":
        return 1.0 / d_j.clamp_min(tau)
    if mode == "d_0":
        return 1.0 / d_0.clamp_min(tau)
    if mode == "none":
        return torch.ones_like(d_j)
    raise ValueError(f"unknown weighting {mode!r}: use both, d_j, d_0 or none")


# ----------------------------------------------------------------------------- several pairs per rollout


def sample_leap_pairs(probabilities: Tensor, count: int, generator: torch.Generator) -> list[tuple[int, int]]:
    """`count` pairs drawn independently (with replacement) from the pair law."""
    return [sample_leap_pair(probabilities, generator) for _ in range(count)]


def leaps_from_trajectory(
    velocity_fn: VelocityFn,
    trajectory: list[Tensor],
    sigmas: Tensor,
    pairs: list[tuple[int, int]],
    alpha: float,
    weights_fn,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Reuse one no-grad rollout for P leap pairs: x_0 whose gradient is the weighted mean of the pairs'.

    For pair p the two leaps are recomputed from the stored rollout latents (2 transformer calls with a
    graph), exactly as `rollout_with_leaps` builds them. All pairs share the real x_0 as value, so the
    reward and the VAE are evaluated once: with per-sample weights w_p and w_bar = mean_p w_p,

        x_0 := x_0 + sum_p c_p (x_hat_0^p - sg(x_hat_0^p)),   c_p = w_p / (P w_bar)
        L   = mean_b w_bar_b max(0, lambda - r_b(x_0))   =>   dL/dtheta = (1/P) sum_p dL_p/dtheta,

    where L_p is the one-pair LeapAlign loss of pair p. Memory: 2P transformer graphs; compute:
    N + 2P forwards and 2P backwards instead of P (N + 2) forwards and 2P backwards.
    Returns (x_0 [B, S, C], w_bar [B], metrics).
    """
    x_final = trajectory[-1]
    predictions, weights, d_js, d_0s = [], [], [], []
    for k, j in pairs:
        x_k, x_j = trajectory[k], trajectory[j]
        with torch.enable_grad():
            x_hat_j = x_k - (sigmas[k] - sigmas[j]) * velocity_fn(x_k, sigmas[k])  # leap 1 (Eq. 5)
            x_j_st = _straight_through(x_j, x_hat_j)  # connector 1 (Eq. 6)
            model_input = _straight_through(x_j, x_hat_j, scale=alpha)
            x0_hat = x_j_st - sigmas[j] * velocity_fn(model_input, sigmas[j])  # leap 2 (Eq. 7)
        d_j, d_0 = _mean_abs(x_j - x_hat_j), _mean_abs(x_final - x0_hat)
        predictions.append(x0_hat)
        weights.append(weights_fn(d_j, d_0))
        d_js.append(d_j)
        d_0s.append(d_0)
    weight = torch.stack(weights)  # [P, B]
    mean_weight = weight.mean(dim=0)  # [B]
    x0 = x_final
    for w_p, x0_hat in zip(weight, predictions, strict=True):
        coefficient = (w_p / (len(pairs) * mean_weight)).view(-1, *([1] * (x0_hat.ndim - 1)))
        x0 = x0 + coefficient * (x0_hat - x0_hat.detach())
    metrics = {"leap/d_j": torch.stack(d_js).mean(), "leap/d_0": torch.stack(d_0s).mean()}
    return x0, mean_weight, metrics


# ----------------------------------------------------------------------------- the method


def leapalign_loss(
    policy: FluxPolicy,
    prompts: list[str],
    reward_fn: RewardFn,
    cfg: Config,
    sigmas: Tensor,
    rng: StepRandomness,
) -> tuple[Tensor, dict[str, float | Tensor]]:
    """The LeapAlign loss of one micro-batch (paper Eq. 4-13); the caller runs backward."""
    opts = cfg.method.leapalign
    pair_law = leap_pair_probabilities(sigmas.cpu(), cfg.leap)  # [N, N]; cheap, no state to carry
    # 1. Frozen text conditioning and the noise: no graph.
    batch = prepare_batch(policy, prompts, cfg, rng)
    if opts.pairs_per_rollout == 1:
        # 2. Full ODE rollout; graphs only at the leap steps k < j (their calls are the rollout's own).
        k, j = sample_leap_pair(pair_law, rng.steps)
        leap = rollout_with_leaps(batch.velocity, batch.latents, sigmas, k, j, alpha=opts.alpha)
        # 3. Reward on the real final image (or on x_hat_0 for the ablation); grads flow to the pixels.
        final = leap.x0 if opts.reward_on == "final" else leap.x0_hat
        rewards = decode_and_score(policy, final, prompts, reward_fn, cfg)  # [B]
        # 4. Trajectory-similarity weight (no grad) and the hinge loss.
        weight = similarity_weight(leap.d_j, leap.d_0, opts.tau, opts.weighting)  # [B]
        pair_metrics = {
            "leap/k": float(k),
            "leap/j": float(j),
            "leap/sigma_k": sigmas[k],
            "leap/sigma_j": sigmas[j],
            "leap/d_j": leap.d_j.mean(),
            "leap/d_0": leap.d_0.mean(),
        }
    else:
        if opts.reward_on != "final":
            raise ValueError(
                "method.leapalign.reward_on=leap needs pairs_per_rollout=1 (one x_hat_0 to score)"
            )
        # 2. One no-grad rollout, then P pairs' leaps recomputed from its latents.
        pairs = sample_leap_pairs(pair_law, opts.pairs_per_rollout, rng.steps)
        trajectory = rollout(batch.velocity, batch.latents, sigmas, keep_trajectory=True)
        final, weight, pair_metrics = leaps_from_trajectory(
            batch.velocity,
            trajectory,
            sigmas,
            pairs,
            opts.alpha,
            lambda d_j, d_0: similarity_weight(d_j, d_0, opts.tau, opts.weighting),
        )
        rewards = decode_and_score(policy, final, prompts, reward_fn, cfg)
        pair_metrics["leap/k"] = sum(k for k, _ in pairs) / len(pairs)
        pair_metrics["leap/j"] = sum(j for _, j in pairs) / len(pairs)
    loss = hinge_loss(rewards, weight, opts.hinge)
    cap = weight_cap(opts.tau, opts.weighting)
    # The share of samples whose weight sits at its cap (every distance below tau): there the weighting
    # no longer tells near trajectories from far ones; a tau large for the latents' scale makes it ~1.
    at_cap = {"weight/at_cap": (weight >= cap * (1 - 1e-6)).float().mean()} if cap is not None else {}
    return loss, {
        "loss": loss.detach(),
        **reward_metrics(rewards),
        **pair_metrics,
        "weight/mean": weight.mean(),
        **at_cap,
    }


def update_nfe_range(cfg: Config) -> tuple[int, int]:
    """(fewest, most) forward-equivalents of one update: N rollout calls and two calls with a graph per leap
    pair; P > 1 pairs per rollout re-run each pair's two forwards with a graph (N + 2P + 2P bw per image)."""
    n, bw, pairs = cfg.sampler.num_steps, backward_cost(cfg), cfg.method.leapalign.pairs_per_rollout
    per_image = (n + 2 * bw) if pairs == 1 else (n + 2 * pairs + 2 * pairs * bw)
    return direct_update_nfe(cfg, per_image, per_image)
