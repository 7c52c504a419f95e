"""The GRPO family for flow models: Flow-GRPO, DanceGRPO, MixGRPO, Flow-GRPO-Fast and CPS, as pure math.

GRPO needs a stochastic policy, so the deterministic sampler dx/dsigma = v(x, sigma) is replaced by an
SDE with the same marginals p_sigma. Time runs from sigma = 1 (noise) to 0 (image); with a diffusion
coefficient g(sigma) and dsigma < 0, the reverse-time SDE

    dx = [v - (g^2 / 2) grad log p_sigma(x)] dsigma + g dW,      Var(dW) = |dsigma|

has the Fokker-Planck equation of the ODE (the g^2 / 2 Laplacian terms cancel). For rectified flow,
x_sigma = (1 - sigma) x_0 + sigma x_1, Tweedie gives x_hat_0 = x - sigma v and

    grad log p_sigma(x) = -(x - (1 - sigma) x_hat_0) / sigma^2 = -(x + (1 - sigma) v) / sigma.

One Euler-Maruyama step of it, dt = sigma_next - sigma < 0, is a Gaussian policy
    x_next ~ N(mean_theta(x), std^2 I)
whose per-step log-density is what the PPO ratio is made of. The kinds of step (`sde_step`):

    flow_grpo   g = a sqrt(sigma / (1 - sigma)); std = g sqrt(-dt)                (Flow-GRPO)
    dance_grpo  g = eta (constant);              std = eta sqrt(sigma - sigma_next) (DanceGRPO)
    cps         coefficients-preserving: a DDIM-like step, std = sigma_next sin(a pi / 2)

and the variants (`plan_steps`) differ only in which steps are stochastic and which get a policy
gradient: Flow-GRPO (all SDE, first 99% trained), DanceGRPO (all SDE, a random 60% per sample),
MixGRPO (SDE in a sliding window, ODE elsewhere), Flow-GRPO-Fast (a random 2-3 step SDE window early).

Everything here is plain PyTorch on tensors; the training recipe owns the model calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from leapalign.compute import backward_nfe
from leapalign.config import GRPO_VARIANTS, SDE_KINDS, STD_SCOPES, Config
from leapalign.sampling import euler_step

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


# ----------------------------------------------------------------------------- one SDE step


@dataclass
class SDEStep:
    """One step x -> x_next of the stochastic sampler and the log-density of x_next."""

    prev_sample: Tensor  # x_next [B, S, C], detached (the given prev_sample when there was one)
    mean: Tensor  # [B, S, C] mean of x_next given x; keeps the graph to `velocity`
    std: Tensor  # [] std of x_next given x (per dim); 0 for an ODE step
    log_prob: Tensor | None  # [B] log-density of prev_sample, averaged over non-batch dims; None if std == 0


def flow_grpo_diffusion(sigma: Tensor, noise_level: float, sigma_max: Tensor | float | None = None) -> Tensor:
    """Flow-GRPO's diffusion coefficient g = a sqrt(sigma / (1 - sigma)): [], in sigma's dtype.

    g blows up at sigma = 1, so there Flow-GRPO puts sigma_max (the grid's next value, sigmas[1]) in the
    denominator: g = a sqrt(1 / (1 - sigma_max)). Flow-GRPO's KL penalty divides by g^2 (not by the
    step's variance g^2 |dt|); pass this as `std` to `kl_to_reference` to reproduce its beta scale.
    """
    sigma = torch.as_tensor(sigma)
    # CPU-GPU sync when sigma lives on the GPU: one scalar per step, negligible next to a model call.
    if float(sigma) >= 1.0:
        if sigma_max is None:
            raise ValueError(
                "flow_grpo step at sigma = 1 needs sigma_max (the next grid value, sigmas[1]): "
                "sqrt(sigma / (1 - sigma)) is infinite there"
            )
        if not 0.0 < float(sigma_max) < 1.0:
            raise ValueError(f"sigma_max={float(sigma_max)} must lie in (0, 1): pass sigmas[1] of the grid")
        denominator = torch.as_tensor(sigma_max, dtype=sigma.dtype, device=sigma.device)
    else:
        denominator = sigma
    return noise_level * torch.sqrt(sigma / (1 - denominator))


def _gaussian_log_prob(sample: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """log N(sample; mean, std^2) per element with all constants, averaged over non-batch dims: [B]."""
    log_density = -((sample - mean) ** 2) / (2 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    return log_density.flatten(1).mean(dim=1)


def _draw_noise(like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise shaped like `like`, drawn in fp32 on the generator's device (CPU), then moved.

    Same convention as the rest of the repo: one seed gives the same noise on every device.
    """
    device = generator.device if generator is not None else torch.device("cpu")
    noise = torch.randn(like.shape, generator=generator, dtype=torch.float32, device=device)
    return noise.to(device=like.device, dtype=like.dtype)


def sde_step(
    kind: str,
    latents: Tensor,
    velocity: Tensor,
    sigma: Tensor,
    sigma_next: Tensor,
    noise_level: float,
    *,
    sigma_max: Tensor | float | None = None,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
) -> SDEStep:
    """One stochastic step of the sampler `kind` and the log-density of its result.

    With x = latents, v = velocity, s = sigma_next, dt = s - sigma < 0, a = eta = noise_level:

      flow_grpo   g = a sqrt(sigma / (1 - sigma))     (sigma_max in the denominator at sigma = 1)
                  mean = x (1 + g^2 dt / (2 sigma)) + v (1 + g^2 (1 - sigma) / (2 sigma)) dt
                  std  = g sqrt(-dt)
                  log_prob = mean over dims of log N(x_next; mean, std^2)
      dance_grpo  x_hat_0 = x - sigma v,  score = -(x - (1 - sigma) x_hat_0) / sigma^2
                  mean = x + dt v - 0.5 eta^2 score dt,  std = eta sqrt(sigma - s)
                  log_prob = mean over dims of log N(x_next; mean, std^2)
      cps         std = s sin(a pi / 2),  x_hat_0 = x - sigma v,  x_hat_1 = x + (1 - sigma) v
                  mean = x_hat_0 (1 - s) + x_hat_1 sqrt(s^2 - std^2)
                  log_prob = mean over dims of -(x_next - mean)^2   (no constants, as Flow-GRPO's CPS)

    and x_next = mean + std eps. flow_grpo and dance_grpo are the same reverse SDE (module docstring)
    with g(sigma) = a sqrt(sigma / (1 - sigma)) and g = eta; expanding DanceGRPO's score gives
    mean = x + [v + eta^2 / (2 sigma) (x + (1 - sigma) v)] dt, Flow-GRPO's form with g = eta.

    Rollout: prev_sample=None draws eps from `generator` (`_draw_noise`), or takes `noise` (eps drawn by
    the caller: the recipe draws it for the global batch, so neither the number of ranks nor the
    micro-batches change it). Training pass: pass the rollout's x_next as prev_sample to get its
    log-density under the current model (graph through `mean` to `velocity`). noise_level = 0, and
    CPS's last step (s = 0), are the Euler ODE step `sampling.euler_step` itself: std 0, log_prob None,
    no noise drawn.

    Computed in fp32, or in the latents' dtype when wider: bf16 velocities overflow in the mean, and
    the log-density of a small-std Gaussian needs the precision (Flow-GRPO does the same).
    """
    if kind not in SDE_KINDS:
        raise ValueError(f"unknown SDE kind {kind!r}: use one of {SDE_KINDS}")
    if noise_level < 0:
        raise ValueError(f"noise_level={noise_level} must be >= 0 (0 is the deterministic ODE step)")
    if kind == "cps" and noise_level > 1:
        raise ValueError(
            f"noise_level={noise_level} for cps is an angle fraction in [0, 1]: std = s sin(a pi/2)"
        )
    if prev_sample is not None:
        prev_sample = prev_sample.detach()

    # The ODE step, bit for bit: the zero-noise SDE is Euler (mean = x + dt v), and CPS's last step
    # (std = 0 at s = 0, mean = x_hat_0) is the same step up to rounding.
    # CPU-GPU sync for the cps check when sigma_next lives on the GPU: one scalar per step.
    if noise_level == 0 or (kind == "cps" and float(sigma_next) == 0.0):
        mean = euler_step(latents, velocity, sigma, sigma_next)  # [B, S, C]
        sample = mean.detach() if prev_sample is None else prev_sample.to(mean.dtype)
        return SDEStep(prev_sample=sample, mean=mean, std=mean.new_zeros(()), log_prob=None)

    dtype = torch.promote_types(latents.dtype, torch.float32)
    x = latents.to(dtype)  # [B, S, C]
    v = velocity.to(dtype)  # [B, S, C]
    sigma = torch.as_tensor(sigma, dtype=dtype, device=x.device)
    sigma_next = torch.as_tensor(sigma_next, dtype=dtype, device=x.device)
    dt = sigma_next - sigma  # < 0

    if kind == "flow_grpo":
        g = flow_grpo_diffusion(sigma, noise_level, sigma_max)
        mean = x * (1 + g**2 / (2 * sigma) * dt) + v * (1 + g**2 * (1 - sigma) / (2 * sigma)) * dt
        std = g * torch.sqrt(-dt)
    elif kind == "dance_grpo":
        x_hat_0 = x - sigma * v
        score = -(x - (1 - sigma) * x_hat_0) / sigma**2
        mean = x + dt * v - 0.5 * noise_level**2 * score * dt
        std = noise_level * torch.sqrt(sigma - sigma_next)
    else:  # cps
        std = sigma_next * math.sin(noise_level * math.pi / 2)
        x_hat_0 = x - sigma * v
        x_hat_1 = x + (1 - sigma) * v
        # clamp: at a = 1 rounding can leave s^2 - std^2 a hair below zero, and sqrt would give NaN
        mean = x_hat_0 * (1 - sigma_next) + x_hat_1 * torch.sqrt((sigma_next**2 - std**2).clamp_min(0))

    if prev_sample is None:
        if noise is None:
            noise = _draw_noise(mean, generator)
        elif noise.shape != mean.shape:
            raise ValueError(f"noise {tuple(noise.shape)} must have the latents' shape {tuple(mean.shape)}")
        prev_sample = mean.detach() + std * noise.to(device=mean.device, dtype=mean.dtype)
    else:
        prev_sample = prev_sample.to(dtype)

    if kind == "cps":
        log_prob = (-((prev_sample - mean) ** 2)).flatten(1).mean(dim=1)
    else:
        log_prob = _gaussian_log_prob(prev_sample, mean, std)
    return SDEStep(prev_sample=prev_sample, mean=mean, std=std, log_prob=log_prob)


# ----------------------------------------------------------------------------- advantages and loss


def group_advantages(
    rewards: Tensor,
    group_size: int,
    *,
    std_scope: str = "group",
    eps: float = 1e-4,
    clip: float = 5.0,
    correction: int = 0,
) -> Tensor:
    """A_b = clamp((r_b - mean_{g(b)} r) / (std + eps), -clip, clip): [B], no graph.

    rewards [B] with B = num_groups * group_size; consecutive samples form a group (one prompt).
    std_scope "group": the std of b's own group (DanceGRPO); "batch": the std of the whole given batch
    (Flow-GRPO's default; pass the rewards gathered from every worker). correction: 0 for the population
    std (Flow-GRPO's np.std), 1 for Bessel's (DanceGRPO's torch.std).
    Computed in float64 around each group's first reward, so equal rewards give exactly 0 (a plain
    r - mean(r) is not exact: mean([0.1] * 3) != 0.1 in floating point).
    """
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be [B], got shape {tuple(rewards.shape)}")
    if group_size < 2:
        raise ValueError(f"group_size={group_size}: a group needs at least 2 samples to have a baseline")
    if rewards.numel() % group_size != 0:
        raise ValueError(
            f"batch of {rewards.numel()} rewards is not a multiple of group_size={group_size}: "
            "give whole groups (consecutive samples of one prompt)"
        )
    if std_scope not in STD_SCOPES:
        raise ValueError(f"unknown std_scope {std_scope!r}: use one of {STD_SCOPES}")
    if eps <= 0 or clip <= 0:
        raise ValueError(f"eps={eps} and clip={clip} must be > 0")
    grouped = rewards.detach().double().view(-1, group_size)  # [G, K]
    shifted = grouped - grouped[:, :1]  # exactly 0 within a group of equal rewards
    centered = shifted - shifted.mean(dim=1, keepdim=True)  # [G, K]
    if std_scope == "group":
        std = shifted.std(dim=1, keepdim=True, correction=correction)  # [G, 1]
    else:
        std = rewards.detach().double().std(correction=correction)  # []
    advantages = (centered / (std + eps)).clamp(-clip, clip).flatten()  # [B]
    return advantages.to(torch.promote_types(rewards.dtype, torch.float32))


def ppo_clipped_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    clip_range: float,
    log_ratio: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """PPO's clipped surrogate for one trained step, as Flow-GRPO and DanceGRPO write it.

        ratio = exp(log_prob - old_log_prob)
        loss  = mean_b max(-A_b ratio_b, -A_b clamp(ratio_b, 1 - eps, 1 + eps))

    log_prob [B] (with graph), old_log_prob [B] (rollout's, no graph), advantages [B]. At ratio = 1
    the gradient is the plain policy gradient -mean(A grad log_prob); once the ratio leaves
    [1 - eps, 1 + eps] on the side that would increase the surrogate further, that sample's gradient
    is 0. Metrics: grpo/ratio_mean, grpo/clip_frac (share with |ratio - 1| > eps), grpo/approx_kl
    (0.5 mean (log_prob - old_log_prob)^2). The metrics are .item()s: one CPU-GPU sync per call.
    log_ratio: another log ratio [B] with a graph (GRPO-Guard's, `guard_log_ratio`) in place of
    log_prob - old_log_prob.
    """
    if clip_range <= 0:
        raise ValueError(f"clip_range={clip_range} must be > 0 (Flow-GRPO uses 1e-4, Fast 1e-5)")
    if not log_prob.shape == old_log_prob.shape == advantages.shape:
        raise ValueError(
            f"log_prob {tuple(log_prob.shape)}, old_log_prob {tuple(old_log_prob.shape)} and "
            f"advantages {tuple(advantages.shape)} must have the same shape [B]"
        )
    advantages = advantages.detach()
    if log_ratio is None:
        log_ratio = log_prob - old_log_prob.detach()  # [B]
    ratio = torch.exp(log_ratio)  # [B]
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        metrics = {
            "grpo/ratio_mean": ratio.mean().item(),
            "grpo/clip_frac": ((ratio - 1.0).abs() > clip_range).float().mean().item(),
            "grpo/approx_kl": (0.5 * log_ratio**2).mean().item(),
        }
    return loss, metrics


def diffusion_coefficient(step: SDEStep, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """g of the step, std / sqrt(sigma - sigma_next): what Flow-GRPO divides its KL by (so a beta means what
    the papers' beta means), a sqrt(sigma / (1 - sigma)) for flow_grpo, eta for dance_grpo."""
    dt = torch.as_tensor(sigma, dtype=step.std.dtype) - torch.as_tensor(sigma_next, dtype=step.std.dtype)
    return step.std / torch.sqrt(dt)


def guard_log_ratio(
    log_prob: Tensor, old_log_prob: Tensor, mean: Tensor, old_mean: Tensor, std: Tensor
) -> Tensor:
    """GRPO-Guard's step-normalised log importance ratio [B] (Flow-Factory's GRPOGuardTrainer):

        log r = (log_prob - old_log_prob) * s + mean_dims (mean - old_mean)^2 / (2 s),   s = the step's std

    With x_next = old_mean + s eps this is exactly mean_dims eps (mean - old_mean): a ratio whose size does
    not grow as 1/s at the small-std steps (where the standard ratio's log-density difference explodes)."""
    mse = ((mean - old_mean.detach()) ** 2).flatten(1).mean(dim=1)  # [B]
    return (log_prob - old_log_prob.detach()) * std + mse / (2 * std)


def kl_to_reference(mean: Tensor, ref_mean: Tensor, std: Tensor) -> Tensor:
    """KL(N(mean, std^2) || N(ref_mean, std^2)) per dim, averaged over non-batch dims: [B].

        KL_b = mean over dims of (mean - ref_mean)^2 / (2 std^2)

    Closed form because both policies share the step's std; gradient to `mean` only (the reference,
    e.g. the LoRA adapter disabled, is a constant). std > 0 and broadcastable to mean: with the
    step's std (`SDEStep.std`) this is the exact KL of the two steps; Flow-GRPO divides by g^2
    (`flow_grpo_diffusion`), which is that KL times |dt|.
    """
    diff = mean - ref_mean.detach()  # [B, S, C]
    return (diff**2 / (2 * std**2)).flatten(1).mean(dim=1)


# ----------------------------------------------------------------------------- which steps are SDE / trained


@dataclass
class StepPlan:
    """Per rollout: which steps are stochastic, and which (sample, step) transitions are trained."""

    sde: Tensor  # [N] bool: SDE step (noise injected, log-prob recorded); the rest are Euler ODE steps
    train: Tensor  # [B, N] bool: gets a policy-gradient term; always a subset of sde


def plan_steps(
    variant: str,
    num_steps: int,
    batch_size: int,
    *,
    iteration: int,
    generator: torch.Generator,
    train_fraction: float,
    window_size: int,
    window_shift_every: int,
    window_shift: int = 1,
    last_step_stochastic: bool = True,
) -> StepPlan:
    """The SDE and trained steps of an N-step rollout of B samples, per GRPO variant.

      flow_grpo   all SDE; train steps 0 .. int(f N) - 1, the same for every sample (Flow-GRPO: f = 0.99,
                  i.e. all but the last step)
      dance_grpo  all SDE; each sample trains its own random max(1, int(f (N - 1))) distinct steps among the
                  first N - 1 (DanceGRPO: f = 0.6; its last step is never trained), drawn from `generator`
      mixgrpo     SDE and trained only in the window [start, start + window_size) with
                  start = min((iteration // window_shift_every) * window_shift, N - 2 - window_size): the
                  window never covers the last two steps (MixGRPO's max_timesteps = N - 2); ODE before and
                  after (MixGRPO: 25 steps, window 4, one step later every 25 iterations)
      fast        Flow-GRPO-Fast: SDE and trained only in a window of window_size (2 or 3) steps whose
                  start is uniform in [0, N // 2 - window_size], so the window lies in the first half;
                  one window per rollout, drawn from `generator`

    Arguments a variant does not use are not checked; `generator` is consumed only by dance_grpo and fast.
    last_step_stochastic=False (CPS: at sigma_next = 0 its std is 0, the step is Euler's and has no
    log-density) makes the last step an untrained ODE step in every variant.
    """
    if variant not in GRPO_VARIANTS:
        raise ValueError(f"unknown GRPO variant {variant!r}: use one of {GRPO_VARIANTS}")
    if num_steps < 1 or batch_size < 1:
        raise ValueError(f"num_steps={num_steps} and batch_size={batch_size} must be >= 1")
    if iteration < 0:
        raise ValueError(f"iteration={iteration} must be >= 0")
    sde = torch.zeros(num_steps, dtype=torch.bool)  # [N]

    if variant in ("flow_grpo", "dance_grpo"):
        if not 0.0 < train_fraction <= 1.0:
            raise ValueError(
                f"train_fraction={train_fraction} must lie in (0, 1]: the share of steps trained"
            )
        sde[:] = True
        if variant == "flow_grpo":
            train_row = torch.zeros(num_steps, dtype=torch.bool)
            train_row[: max(1, int(train_fraction * num_steps))] = True  # Flow-GRPO trains the first steps
            train = train_row.expand(batch_size, num_steps).clone()  # [B, N]
        else:
            # DanceGRPO (train_grpo_flux.py): the last step is never a candidate; int((N - 1) f) of the
            # other N - 1, a uniform random subset per sample (the first of a random permutation).
            candidates = max(1, num_steps - 1)
            num_train = max(1, int(train_fraction * candidates))
            order = torch.rand(batch_size, candidates, generator=generator).argsort(dim=1)  # [B, N - 1]
            train = torch.zeros(batch_size, num_steps, dtype=torch.bool)
            train.scatter_(1, order[:, :num_train], True)
        return _last_step_deterministic(StepPlan(sde=sde, train=train), last_step_stochastic)

    if variant == "mixgrpo":
        last = num_steps - 2  # MixGRPO's max_timesteps: the window never covers the last two steps
        if num_steps < 3 or not 1 <= window_size <= last:
            raise ValueError(
                f"window_size={window_size} must be in [1, num_steps - 2 = {last}] (num_steps >= 3): MixGRPO's "
                "window never covers the last two steps"
            )
        if window_shift_every < 1 or window_shift < 0:
            raise ValueError(
                f"window_shift_every={window_shift_every} must be >= 1 and window_shift={window_shift} >= 0 "
                "(the window moves window_shift steps later every window_shift_every iterations)"
            )
        start = min((iteration // window_shift_every) * window_shift, last - window_size)
    else:  # fast
        half = num_steps // 2
        if not 1 <= window_size <= half:
            raise ValueError(
                f"window_size={window_size} must be in [1, num_steps // 2 = {half}]: Flow-GRPO-Fast's window "
                "lies in the first half of the trajectory (it uses 2 or 3 steps)"
            )
        start = int(torch.randint(0, half - window_size + 1, (1,), generator=generator).item())
    sde[start : start + window_size] = True
    return _last_step_deterministic(
        StepPlan(sde=sde, train=sde.expand(batch_size, num_steps).clone()), last_step_stochastic
    )


def _last_step_deterministic(plan: StepPlan, last_step_stochastic: bool) -> StepPlan:
    """last_step_stochastic=False (CPS): the last step an untrained ODE step."""
    if not last_step_stochastic:
        plan.sde[-1] = False
        plan.train[:, -1] = False
    return plan


def update_nfe_range(cfg: Config) -> tuple[int, int]:
    """Forward-equivalents of one update (fewest = most): per rollout image N sampling calls, and per trained
    step a forward and a backward, plus the reference's forward when kl_beta > 0."""
    n, opts = cfg.sampler.num_steps, cfg.method.grpo
    trained = {
        "flow_grpo": max(1, int(opts.train_fraction * n)),
        "dance_grpo": max(1, int(opts.train_fraction * (n - 1))),  # never its last step
        "mixgrpo": min(opts.window_size, n - 2),  # never the last two steps
        "fast": opts.window_size,
    }[opts.variant]
    if opts.sde == "cps" and opts.variant == "flow_grpo":
        trained = min(trained, n - 1)  # CPS's last step is deterministic: never trained
    bw = backward_nfe(cfg.finetune.gradient_checkpointing)
    per_image = n + trained * (1 + bw + (1 if opts.kl_beta > 0 else 0))
    cost = cfg.train.batch_size * opts.group_size * per_image
    return cost, cost
