"""Hand-derived checks of the GRPO family's math: SDE steps and their log-densities, marginals on a
Gaussian toy, group advantages, the PPO clipped loss, the KL to the reference, and step plans."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from leapalign.methods.grpo import (
    SDE_KINDS,
    diffusion_coefficient,
    group_advantages,
    guard_log_ratio,
    kl_to_reference,
    plan_steps,
    ppo_clipped_loss,
    sde_step,
)
from leapalign.sampling import euler_step, flux_sigmas

F64 = torch.float64


def _scalar(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=F64)


def _random_state(seed: int = 0, shape=(3, 4, 5)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=F64), torch.randn(shape, generator=g, dtype=F64)


# ----------------------------------------------------------------------------- 1. advantages


@pytest.mark.parametrize("std_scope", ["group", "batch"])
def test_advantages_are_exactly_zero_for_equal_rewards(std_scope):
    # 0.1 is not representable: a plain r - mean(r) leaves rounding residue here.
    rewards = torch.tensor([0.1] * 3 + [0.7] * 3 + [1e3 + 0.1] * 3, dtype=torch.float32)
    adv = group_advantages(rewards, 3, std_scope=std_scope)
    assert torch.equal(adv, torch.zeros_like(adv)), f"equal rewards in a group gave advantages {adv.tolist()}"


@pytest.mark.parametrize("std_scope", ["group", "batch"])
def test_advantages_are_invariant_to_a_constant_shift(std_scope):
    rewards = torch.tensor([0.3, 0.1, 0.5, 0.2, 0.9, 0.4, 0.4, 0.0], dtype=F64)
    base = group_advantages(rewards, 4, std_scope=std_scope)
    shifted = group_advantages(rewards + 12.5, 4, std_scope=std_scope)
    assert torch.allclose(base, shifted, atol=1e-12, rtol=0), (
        f"shift by 12.5 changed the advantages by {(base - shifted).abs().max():.2e}"
    )


def test_advantages_hand_values():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0, 10.0, 10.0, 10.0], dtype=F64)
    deviations = torch.tensor([-1.5, -0.5, 0.5, 1.5, 0.0, 0.0, 0.0, 0.0], dtype=F64)
    # group 1: population variance (2.25 + 0.25 + 0.25 + 2.25) / 4 = 1.25; group 2: 0
    group_std = torch.tensor([math.sqrt(1.25)] * 4 + [0.0] * 4, dtype=F64)
    expected_group = deviations / (group_std + 1e-4)
    # whole batch: mean 6.25, E[r^2] = 430 / 8 = 53.75, variance 53.75 - 6.25^2 = 14.6875
    expected_batch = deviations / (math.sqrt(14.6875) + 1e-4)
    got_group = group_advantages(rewards, 4, std_scope="group")
    got_batch = group_advantages(rewards, 4, std_scope="batch")
    assert torch.allclose(got_group, expected_group, atol=1e-12), (
        f"group scope: {got_group} != {expected_group}"
    )
    assert torch.allclose(got_batch, expected_batch, atol=1e-12), (
        f"batch scope: {got_batch} != {expected_batch}"
    )


def test_advantages_are_clipped():
    # one success among 30: mean 1/30, population std sqrt(29)/30, so the success gets sqrt(29) ~ 5.39 > 5
    rewards = torch.zeros(30, dtype=F64)
    rewards[7] = 1.0
    adv = group_advantages(rewards, 30, eps=1e-12)
    assert adv[7].item() == 5.0, f"advantage sqrt(29) ~ 5.39 must be clipped to 5, got {adv[7].item()}"
    others = torch.cat([adv[:7], adv[8:]])
    assert torch.allclose(others, torch.full_like(others, -1 / math.sqrt(29)), atol=1e-9), (
        f"unclipped advantages must be -1/sqrt(29), got {others.unique().tolist()}"
    )
    small = group_advantages(torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=F64), 4, clip=1.0)
    assert small.tolist()[3] == 1.0 and small.max() <= 1.0 and small.min() >= -1.0, f"clip=1 gave {small}"


@pytest.mark.parametrize(
    "num_rewards,group_size,kwargs,match",
    [
        (6, 4, {}, "multiple of group_size"),
        (4, 1, {}, "at least 2"),
        (4, 2, {"std_scope": "all"}, "std_scope"),
    ],
)
def test_advantages_reject_bad_inputs(num_rewards, group_size, kwargs, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(torch.zeros(num_rewards), group_size, **kwargs)


# ----------------------------------------------------------------------------- 2. log-densities by hand


def test_flow_grpo_log_prob_is_the_gaussian_density():
    x, v = _random_state(0)
    sigma, sigma_next, a = 0.7, 0.55, 0.7
    dt = sigma_next - sigma
    # Written independently in the score form: mean = x + (v - g^2/2 score) dt, score = -(x + (1-sigma) v)/sigma
    g = a * math.sqrt(sigma / (1 - sigma))
    score = -(x + (1 - sigma) * v) / sigma
    mean = x + (v - 0.5 * g**2 * score) * dt
    std = g * math.sqrt(-dt)
    prev = mean + 0.8 * torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    step = sde_step("flow_grpo", x, v, _scalar(sigma), _scalar(sigma_next), a, prev_sample=prev)
    expected = Normal(mean, std).log_prob(prev).mean(dim=(1, 2))
    assert torch.allclose(step.mean, mean, atol=1e-12), f"mean off by {(step.mean - mean).abs().max():.2e}"
    assert abs(step.std.item() - std) < 1e-12, f"std {step.std.item()} != g sqrt(-dt) = {std}"
    assert torch.allclose(step.log_prob, expected, atol=1e-10), f"log_prob {step.log_prob} != {expected}"
    assert torch.equal(step.prev_sample, prev), "the given prev_sample must come back unchanged"


def test_flow_grpo_rollout_noise_and_log_prob():
    """Rollout: x_next = mean + std eps with eps = randn(fp32, CPU generator); re-scoring it gives the same log_prob."""
    x, v = _random_state(1)
    v.requires_grad_(True)
    sigma, sigma_next, a = _scalar(0.5), _scalar(0.4), 0.9
    step = sde_step("flow_grpo", x, v, sigma, sigma_next, a, generator=torch.Generator().manual_seed(11))
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(11), dtype=torch.float32).to(F64)
    expected = step.mean.detach() + step.std * eps
    assert torch.equal(step.prev_sample, expected), "rollout sample must be mean + std * randn(seeded, fp32)"
    assert not step.prev_sample.requires_grad, "the sampled latents must be detached"
    assert step.log_prob.requires_grad, "log_prob must keep the graph to the velocity"
    rescored = sde_step("flow_grpo", x, v, sigma, sigma_next, a, prev_sample=step.prev_sample)
    assert torch.equal(rescored.log_prob, step.log_prob), (
        "training pass must reproduce the rollout's log_prob"
    )
    by_hand = Normal(step.mean, step.std).log_prob(step.prev_sample).mean(dim=(1, 2))
    assert torch.allclose(step.log_prob, by_hand, atol=1e-10), f"{step.log_prob} != {by_hand}"


def test_flow_grpo_at_sigma_one_uses_sigma_max():
    x, v = _random_state(2)
    with pytest.raises(ValueError, match="sigma_max"):
        sde_step("flow_grpo", x, v, _scalar(1.0), _scalar(0.9), 0.7)
    step = sde_step("flow_grpo", x, v, _scalar(1.0), _scalar(0.9), 0.7, sigma_max=0.9)
    expected_std = 0.7 * math.sqrt(1.0 / (1 - 0.9)) * math.sqrt(0.1)  # g = a sqrt(1 / (1 - sigma_max))
    assert abs(step.std.item() - expected_std) < 1e-12, (
        f"std at sigma = 1: {step.std.item()} != {expected_std}"
    )
    assert torch.isfinite(step.log_prob).all(), "log_prob at sigma = 1 must be finite"


def test_dance_grpo_log_prob_is_the_gaussian_density():
    x, v = _random_state(3)
    sigma, sigma_next, eta = 0.6, 0.45, 0.3
    dt = sigma_next - sigma
    # DanceGRPO's score term expanded: mean = x + [v + eta^2 / (2 sigma) (x + (1 - sigma) v)] dt
    mean = x + (v + eta**2 / (2 * sigma) * (x + (1 - sigma) * v)) * dt
    std = eta * math.sqrt(sigma - sigma_next)
    prev = mean + std * torch.randn(x.shape, generator=torch.Generator().manual_seed(6), dtype=F64)
    step = sde_step("dance_grpo", x, v, _scalar(sigma), _scalar(sigma_next), eta, prev_sample=prev)
    expected = Normal(mean, std).log_prob(prev).mean(dim=(1, 2))
    assert torch.allclose(step.mean, mean, atol=1e-12), f"mean off by {(step.mean - mean).abs().max():.2e}"
    assert abs(step.std.item() - std) < 1e-12, f"std {step.std.item()} != eta sqrt(sigma - s) = {std}"
    assert torch.allclose(step.log_prob, expected, atol=1e-10), f"log_prob {step.log_prob} != {expected}"


def test_cps_log_prob_is_its_formula():
    x, v = _random_state(4)
    sigma, s, a = 0.6, 0.45, 0.7
    theta = a * math.pi / 2
    # x_hat_0 = x - sigma v, x_hat_1 = x + (1 - sigma) v; sqrt(s^2 - std^2) = s cos(theta)
    mean = (x - sigma * v) * (1 - s) + (x + (1 - sigma) * v) * s * math.cos(theta)
    prev = mean + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=F64)
    step = sde_step("cps", x, v, _scalar(sigma), _scalar(s), a, prev_sample=prev)
    assert torch.allclose(step.mean, mean, atol=1e-12), f"mean off by {(step.mean - mean).abs().max():.2e}"
    assert abs(step.std.item() - s * math.sin(theta)) < 1e-12, f"std {step.std.item()} != s sin(a pi / 2)"
    expected = -((prev - mean) ** 2).mean(dim=(1, 2))
    assert torch.allclose(step.log_prob, expected, atol=1e-12), f"log_prob {step.log_prob} != {expected}"


def test_log_prob_is_fp32_for_bf16_velocities():
    x = torch.randn(2, 3, 4)
    v = torch.randn(2, 3, 4).to(torch.bfloat16)
    for kind in SDE_KINDS:
        step = sde_step(kind, x, v, torch.tensor(0.5), torch.tensor(0.4), 0.7, generator=torch.Generator())
        assert step.log_prob.dtype == torch.float32, f"{kind}: log_prob is {step.log_prob.dtype}, not fp32"
        assert step.log_prob.shape == (2,), (
            f"{kind}: log_prob shape {tuple(step.log_prob.shape)}, expected [B]"
        )


@pytest.mark.parametrize(
    "kind,noise_level,match", [("ddim", 0.5, "unknown SDE kind"), ("flow_grpo", -0.1, ">= 0")]
)
def test_sde_step_rejects_bad_inputs(kind, noise_level, match):
    x, v = _random_state(0)
    with pytest.raises(ValueError, match=match):
        sde_step(kind, x, v, _scalar(0.5), _scalar(0.4), noise_level)


# ----------------------------------------------------------------------------- 3. noise 0 is the ODE


@pytest.mark.parametrize("kind", SDE_KINDS)
def test_zero_noise_is_the_euler_step(kind):
    sigmas = flux_sigmas(6, image_seq_len=1024)  # fp32, starts at exactly 1 and ends at 0
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 3, generator=g)
    for i in range(6):
        v = torch.randn(2, 4, 3, generator=g)
        step = sde_step(kind, x, v, sigmas[i], sigmas[i + 1], 0.0)
        euler = euler_step(x, v, sigmas[i], sigmas[i + 1])
        assert torch.equal(step.prev_sample, euler), f"{kind} step {i}: noise 0 differs from euler_step"
        assert torch.equal(step.mean, euler), f"{kind} step {i}: mean at noise 0 differs from euler_step"
        assert step.std.item() == 0.0 and step.log_prob is None, (
            f"{kind} step {i}: ODE step must have no log_prob"
        )
        x = step.prev_sample


def test_cps_last_step_is_deterministic():
    """At s = 0 CPS's std = 0 sin(.) = 0 and mean = x_hat_0: the Euler step to 0, no log-density."""
    x, v = _random_state(8)
    step = sde_step("cps", x, v, _scalar(0.2), _scalar(0.0), 0.7, generator=torch.Generator())
    assert torch.equal(step.prev_sample, euler_step(x, v, _scalar(0.2), _scalar(0.0))), (
        "CPS last step != Euler"
    )
    assert torch.allclose(step.prev_sample, x - 0.2 * v, atol=1e-12), "CPS last step must land on x_hat_0"
    assert step.log_prob is None and step.std.item() == 0.0, "CPS last step has std 0 and no log_prob"


# ----------------------------------------------------------------------------- 4. marginals on a Gaussian toy
#
# Data x_0 ~ N(m, tau^2) per dim, noise x_1 ~ N(0, 1), x_sigma = (1 - sigma) x_0 + sigma x_1. Then x_sigma is
# Gaussian with mean (1 - sigma) m and variance V(sigma) = (1 - sigma)^2 tau^2 + sigma^2, and (x_0, x_1, x_sigma)
# are jointly Gaussian, so with u = x - (1 - sigma) m the posterior means are linear in u:
#   E[x_0 | x] = m + Cov(x_0, x) / V u = m + (1 - sigma) tau^2 u / V,   E[x_1 | x] = sigma u / V.
# The exact velocity is v = E[x_1 - x_0 | x] = -m + (sigma - (1 - sigma) tau^2) u / V, and the exact score is
# grad log p_sigma(x) = -u / V. Every step below is affine in x plus independent noise, x_next = A x + B + std eps,
# so its exact law is N(A mu + B, A^2 V + std^2); the Monte Carlo draws check the sampling itself.

TOY_M = torch.tensor([0.5, -1.0], dtype=F64)  # [C] data means
TOY_TAU = torch.tensor([0.5, 1.0], dtype=F64)  # [C] data stds


def _toy_marginal(sigma: float, m=TOY_M, tau=TOY_TAU):
    return (1 - sigma) * m, (1 - sigma) ** 2 * tau**2 + sigma**2  # mean [C], variance [C]


def _toy_velocity(x, sigma: float, m=TOY_M, tau=TOY_TAU):
    _, var = _toy_marginal(sigma, m, tau)
    return -m + (sigma - (1 - sigma) * tau**2) * (x - (1 - sigma) * m) / var


def _exact_step_law(kind, a, sigma, s, m=TOY_M, tau=TOY_TAU):
    """Mean [C] and variance [C] of x_next when x ~ p_sigma exactly: read A, B off the step at x = 0 and 1."""
    points = torch.stack([torch.zeros_like(m), torch.ones_like(m)])[:, None, :]  # [2, 1, C]
    step = sde_step(kind, points, _toy_velocity(points, sigma, m, tau), _scalar(sigma), _scalar(s), a,
                    prev_sample=points)  # fmt: skip
    offset = step.mean[0, 0]
    slope = step.mean[1, 0] - offset
    mu, var = _toy_marginal(sigma, m, tau)
    return slope * mu + offset, slope**2 * var + step.std**2


@pytest.mark.parametrize("kind", ["flow_grpo", "dance_grpo"])
@pytest.mark.parametrize("noise_level", [0.0, 0.7, 0.3])
@pytest.mark.parametrize("sigma", [0.8, 0.5, 0.3])
def test_sde_marginal_error_is_second_order_in_the_step(kind, noise_level, sigma):
    """The one-step law has the exact mean, and a variance error c h^2 with no first-order term.

    The injected noise adds g^2 h to the variance, a first-order term; only the score correction of the
    drift removes it. Without it, error / h^2 would grow like 1/h instead of staying constant.
    """
    scaled_errors = []
    for h in (0.04, 0.02, 0.01):
        mean, var = _exact_step_law(kind, noise_level, sigma, sigma - h)
        target_mean, target_var = _toy_marginal(sigma - h)
        assert torch.allclose(mean, target_mean, atol=1e-14), f"{kind} mean {mean} != marginal {target_mean}"
        scaled_errors.append((var - target_var) / h**2)
    for h, scaled in zip((0.02, 0.01), scaled_errors[1:], strict=True):
        assert torch.allclose(scaled, scaled_errors[0], rtol=1e-6, atol=1e-8), (
            f"{kind} a={noise_level} sigma={sigma}: variance error / h^2 = {scaled.tolist()} at h={h} vs "
            f"{scaled_errors[0].tolist()} at h=0.04: a first-order term is left"
        )
    assert scaled_errors[0].abs().max() < 5, (
        f"second-order coefficient {scaled_errors[0].tolist()} is implausibly big"
    )


@pytest.mark.parametrize(
    "kind,noise_level", [("flow_grpo", 0.7), ("flow_grpo", 0.3), ("dance_grpo", 0.7), ("dance_grpo", 0.3)]
)
def test_sde_one_step_marginal_monte_carlo(kind, noise_level):
    """Draw x ~ p_sigma exactly, take one SDE and one ODE step, compare moments with p_{sigma_next}."""
    num_samples, sigma, s = 400_000, 0.8, 0.75
    g = torch.Generator().manual_seed(0)
    x0 = TOY_M + TOY_TAU * torch.randn(num_samples, 1, 2, generator=g, dtype=F64)  # [N, S=1, C=2]
    x = (1 - sigma) * x0 + sigma * torch.randn(num_samples, 1, 2, generator=g, dtype=F64)
    v = _toy_velocity(x, sigma)
    sde = sde_step(
        kind, x, v, _scalar(sigma), _scalar(s), noise_level, generator=torch.Generator().manual_seed(1)
    )
    ode = euler_step(x, v, _scalar(sigma), _scalar(s))
    target_mean, target_var = _toy_marginal(s)
    # Tolerances: 5 standard errors of a Gaussian sample mean (sqrt(V / N)) and variance (V sqrt(2 / N)),
    # plus the step's exact discretisation error (the affine law above), which is c h^2 with |c| < 5.
    se_mean, se_var = (target_var / num_samples).sqrt(), target_var * math.sqrt(2 / num_samples)
    _, sde_law_var = _exact_step_law(kind, noise_level, sigma, s)
    _, ode_law_var = _exact_step_law(kind, 0.0, sigma, s)
    for name, sample, law_var in (("sde", sde.prev_sample, sde_law_var), ("ode", ode, ode_law_var)):
        mean, var = sample.mean(dim=(0, 1)), sample.var(dim=(0, 1))
        mean_tol, var_tol = 5 * se_mean, 5 * se_var + (law_var - target_var).abs()
        assert ((mean - target_mean).abs() <= mean_tol).all(), (
            f"{kind} a={noise_level} {name}: mean {mean.tolist()} vs marginal {target_mean.tolist()} (tol {mean_tol.tolist()})"
        )
        assert ((var - target_var).abs() <= var_tol).all(), (
            f"{kind} a={noise_level} {name}: variance {var.tolist()} vs marginal {target_var.tolist()} (tol {var_tol.tolist()})"
        )
    sde_var, ode_var = sde.prev_sample.var(dim=(0, 1)), ode.var(dim=(0, 1))
    gap_tol = 10 * se_var + (sde_law_var - target_var).abs() + (ode_law_var - target_var).abs()
    assert ((sde_var - ode_var).abs() <= gap_tol).all(), (
        f"{kind} a={noise_level}: SDE variance {sde_var.tolist()} vs ODE {ode_var.tolist()} (tol {gap_tol.tolist()})"
    )
    # the test has teeth: the injected noise alone (std^2) moves the variance by many tolerances
    if noise_level == 0.7 and kind == "flow_grpo":
        assert (sde.std**2 > 5 * var_tol).all(), f"noise variance {sde.std.item() ** 2:.3e} too small to test"


def test_cps_preserves_the_marginal_when_x_hat_0_is_exact():
    """Point-mass data (tau = 0): x_hat_0 = x_0 and x_hat_1 = x_1 exactly, so even a big CPS step keeps
    x_next ~ N((1 - s) m, s^2): the coefficients (1 - s) on x_0 and s^2 = (s cos)^2 + (s sin)^2 on noise."""
    tau = torch.zeros(2, dtype=F64)
    for a in (0.3, 0.7, 1.0):
        mean, var = _exact_step_law("cps", a, 0.8, 0.3, tau=tau)
        target_mean, target_var = _toy_marginal(0.3, tau=tau)
        assert torch.allclose(mean, target_mean, atol=1e-14), f"cps a={a}: mean {mean} != {target_mean}"
        assert torch.allclose(var, target_var, atol=1e-14), f"cps a={a}: variance {var} != s^2 = {target_var}"
    num_samples = 200_000
    x = 0.2 * TOY_M + 0.8 * torch.randn(
        num_samples, 1, 2, generator=torch.Generator().manual_seed(2), dtype=F64
    )
    step = sde_step("cps", x, _toy_velocity(x, 0.8, tau=tau), _scalar(0.8), _scalar(0.3), 0.7,
                    generator=torch.Generator().manual_seed(3))  # fmt: skip
    var = step.prev_sample.var(dim=(0, 1))
    tol = 5 * 0.3**2 * math.sqrt(2 / num_samples)  # 5 standard errors of a sample variance
    assert ((var - 0.3**2).abs() < tol).all(), (
        f"cps Monte Carlo variance {var.tolist()} vs s^2 = 0.09 (tol {tol:.1e})"
    )


def test_cps_variance_deficit_does_not_vanish_with_the_step():
    """With a spread posterior CPS keeps the mean but not the variance, however small the step.

    At h -> 0 its variance is (A + sigma^2 cos)^2 / V + sigma^2 sin^2 with A = (1 - sigma)^2 tau^2,
    V = A + sigma^2, theta = a pi / 2, which is V - A sigma^2 (1 - cos theta)^2 / V: CPS replaces a fixed
    share of the noise each step and relies on x_hat_0 being right (the test above)."""
    sigma, a = 0.5, 0.7
    mean, var = _exact_step_law("cps", a, sigma, sigma - 1e-7)
    target_mean, target_var = _toy_marginal(sigma - 1e-7)
    big_a = (1 - sigma) ** 2 * TOY_TAU**2
    deficit = big_a * sigma**2 * (1 - math.cos(a * math.pi / 2)) ** 2 / (big_a + sigma**2)
    assert torch.allclose(mean, target_mean, atol=1e-14), f"cps mean {mean} != marginal {target_mean}"
    assert torch.allclose(target_var - var, deficit, rtol=1e-4), (
        f"cps variance deficit {(target_var - var).tolist()} != A sigma^2 (1 - cos)^2 / V = {deficit.tolist()}"
    )


# ----------------------------------------------------------------------------- 5. PPO clipped loss


def test_ppo_at_ratio_one_is_the_policy_gradient():
    log_prob = torch.tensor([-1.2, 0.3, -0.7, 2.1], dtype=F64, requires_grad=True)
    advantages = torch.tensor([1.0, -0.5, 2.0, -1.5], dtype=F64)
    loss, metrics = ppo_clipped_loss(log_prob, log_prob.detach(), advantages, clip_range=1e-4)
    assert metrics == {"grpo/ratio_mean": 1.0, "grpo/clip_frac": 0.0, "grpo/approx_kl": 0.0}, (
        f"metrics {metrics}"
    )
    assert loss.item() == -advantages.mean().item(), f"loss {loss.item()} != -mean(A) at ratio 1"
    (grad,) = torch.autograd.grad(loss, log_prob)
    (pg_grad,) = torch.autograd.grad(-(advantages * log_prob).mean(), log_prob)
    assert torch.equal(grad, pg_grad), f"gradient {grad.tolist()} != policy gradient {pg_grad.tolist()}"


def test_ppo_gradient_vanishes_where_the_clip_binds():
    old = torch.tensor([-1.0, -1.0, -1.0, -1.0], dtype=F64)
    log_prob = (old + torch.tensor([0.5, -0.5, 0.5, -0.5], dtype=F64)).requires_grad_(True)
    advantages = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=F64)
    up, down = math.exp(0.5), math.exp(-0.5)  # ratios, both outside [0.8, 1.2]
    loss, metrics = ppo_clipped_loss(log_prob, old, advantages, clip_range=0.2)
    # sample 0: A > 0, ratio 1.65 > 1.2 -> clipped -1.2; sample 1: A < 0, ratio 0.61 < 0.8 -> clipped 0.8;
    # samples 2 and 3: the unclipped term is the max (1.65 and -0.61), so their gradient survives.
    expected_loss = (-1.2 + 0.8 + up - down) / 4
    assert abs(loss.item() - expected_loss) < 1e-12, f"loss {loss.item()} != {expected_loss}"
    (grad,) = torch.autograd.grad(loss, log_prob)
    expected_grad = torch.tensor([0.0, 0.0, up / 4, -down / 4], dtype=F64)  # d(-A r)/dlogp = -A r
    assert torch.allclose(grad, expected_grad, atol=1e-12), (
        f"gradient {grad.tolist()} != {expected_grad.tolist()}"
    )
    assert metrics["grpo/clip_frac"] == 1.0, f"all four ratios are outside the clip range: {metrics}"
    assert abs(metrics["grpo/ratio_mean"] - (up + down) / 2) < 1e-12, f"ratio_mean {metrics}"
    assert abs(metrics["grpo/approx_kl"] - 0.125) < 1e-12, f"approx_kl = 0.5 * 0.25, got {metrics}"


# ----------------------------------------------------------------------------- 6. KL to the reference


def test_kl_to_reference():
    mean = torch.randn(2, 3, 2, dtype=F64, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    std = torch.tensor(0.5, dtype=F64)
    zero = kl_to_reference(mean, mean.detach().clone(), std)
    assert torch.equal(zero, torch.zeros(2, dtype=F64)), f"equal means must give KL 0, got {zero.tolist()}"
    diff = torch.zeros(2, 3, 2, dtype=F64)
    diff[0] = 0.3  # (0.3^2) / (2 * 0.25) = 0.18
    diff[1, 0, 0] = 1.2  # 1.44 / 0.5 / 6 dims = 0.48
    ref = (mean - diff).detach()
    kl = kl_to_reference(mean, ref, std)
    assert torch.allclose(kl, torch.tensor([0.18, 0.48], dtype=F64), atol=1e-12), (
        f"KL {kl.tolist()} != [0.18, 0.48]"
    )
    exact = kl_divergence(Normal(mean, std), Normal(ref, std)).mean(dim=(1, 2))
    assert torch.allclose(kl, exact, atol=1e-12), f"KL {kl.tolist()} != torch's Gaussian KL {exact.tolist()}"
    (grad,) = torch.autograd.grad(kl.sum(), mean)
    assert torch.allclose(grad, diff / (0.25 * 6), atol=1e-12), (
        "dKL/dmean must be (mean - ref) / (std^2 * dims)"
    )


# ----------------------------------------------------------------------------- 7. step plans


def _plan(variant, num_steps=6, batch_size=3, *, iteration=0, seed=0, train_fraction=0.99, window_size=2,
          window_shift_every=25, window_shift=1):  # fmt: skip
    return plan_steps(
        variant, num_steps, batch_size, iteration=iteration, generator=torch.Generator().manual_seed(seed),
        train_fraction=train_fraction, window_size=window_size, window_shift_every=window_shift_every,
        window_shift=window_shift,
    )  # fmt: skip


def _check_plan(plan, num_steps, batch_size, label):
    assert plan.sde.shape == (num_steps,) and plan.sde.dtype == torch.bool, f"{label}: sde mask {plan.sde}"
    assert plan.train.shape == (batch_size, num_steps) and plan.train.dtype == torch.bool, (
        f"{label}: train mask"
    )
    assert not (plan.train & ~plan.sde).any(), f"{label}: a trained step is not an SDE step"
    assert plan.train.any(dim=1).all(), f"{label}: a sample has no trained step"


def test_plan_flow_grpo_trains_the_first_steps():
    plan = _plan("flow_grpo", train_fraction=0.99)
    _check_plan(plan, 6, 3, "flow_grpo")
    assert plan.sde.all(), "flow_grpo: every step is an SDE step"
    expected = torch.tensor([[True] * 5 + [False]] * 3)  # int(0.99 * 6) = 5: steps 0..4
    assert torch.equal(plan.train, expected), f"flow_grpo train mask {plan.train.int().tolist()}"


def test_plan_mixgrpo_window_slides_and_stops():
    starts = []
    for iteration in range(12):
        plan = _plan("mixgrpo", iteration=iteration, window_size=3, window_shift_every=2)
        _check_plan(plan, 6, 3, f"mixgrpo it {iteration}")
        window = plan.sde.nonzero().flatten().tolist()
        assert window == list(range(window[0], window[0] + 3)), f"window {window} is not 3 consecutive steps"
        assert torch.equal(plan.train, plan.sde.expand(3, 6)), "mixgrpo trains exactly its window"
        starts.append(window[0])
    # one step later every 2 iterations, stopping at N - 2 - window_size = 1: MixGRPO's max_timesteps = N - 2,
    # the window never covers the last two steps
    assert starts == [0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], f"window starts {starts}"
    shifted = _plan("mixgrpo", iteration=1, window_size=2, window_shift_every=1, window_shift=2)
    assert shifted.sde.nonzero().flatten().tolist() == [2, 3], "window_shift=2 at iteration 1 starts at 2"
    late = _plan("mixgrpo", num_steps=25, iteration=10_000, window_size=4, window_shift_every=25)
    assert late.sde.nonzero().flatten().tolist() == [19, 20, 21, 22], (
        "MixGRPO's 25 steps: the window ends at 22"
    )


def test_plan_dance_grpo_random_subsets():
    plan = _plan("dance_grpo", batch_size=8, train_fraction=0.6, seed=3)
    _check_plan(plan, 6, 8, "dance_grpo")
    assert plan.sde.all(), "dance_grpo: every step is an SDE step"
    assert (plan.train.sum(dim=1) == 3).all(), (
        f"int(0.6 * (6 - 1)) = 3 steps each (DanceGRPO's int, over N - 1), got {plan.train.sum(1).tolist()}"
    )
    assert not plan.train[:, -1].any(), "DanceGRPO never trains its last step"
    assert len({tuple(row) for row in plan.train.tolist()}) > 1, "samples must draw their own subsets"
    again = _plan("dance_grpo", batch_size=8, train_fraction=0.6, seed=3)
    assert torch.equal(plan.train, again.train), "same seed must give the same subsets"
    other = _plan("dance_grpo", batch_size=8, train_fraction=0.6, seed=4)
    assert not torch.equal(plan.train, other.train), "another seed must give other subsets"
    # uniform over the first 5 steps: each trained with probability 3 / 5 (5 standard errors over 20k rows)
    freq = _plan("dance_grpo", batch_size=20_000, train_fraction=0.6).train.double().mean(dim=0)
    tol = 5 * math.sqrt((3 / 5) * (2 / 5) / 20_000)
    assert ((freq[:-1] - 3 / 5).abs() < tol).all() and freq[-1] == 0, (
        f"per-step training frequency {freq.tolist()} != 3/5 on steps 0-4, 0 on the last (tol {tol:.3f})"
    )


@pytest.mark.parametrize("num_steps,window_size", [(6, 2), (6, 3), (10, 3), (10, 2)])
def test_plan_fast_window_lies_in_the_first_half(num_steps, window_size):
    starts = set()
    for seed in range(60):
        plan = _plan("fast", num_steps=num_steps, window_size=window_size, seed=seed)
        _check_plan(plan, num_steps, 3, f"fast seed {seed}")
        window = plan.sde.nonzero().flatten().tolist()
        assert window == list(range(window[0], window[0] + window_size)), f"window {window} not consecutive"
        assert window[-1] < num_steps // 2, f"window {window} leaves the first half of {num_steps} steps"
        assert torch.equal(plan.train, plan.sde.expand(3, num_steps)), "fast trains exactly its window"
        starts.add(window[0])
    assert starts == set(range(num_steps // 2 - window_size + 1)), (
        f"starts drawn {sorted(starts)}: not every start"
    )


@pytest.mark.parametrize(
    "variant,kwargs,match",
    [
        ("grpo", {}, "unknown GRPO variant"),
        ("flow_grpo", {"train_fraction": 0.0}, "train_fraction"),
        ("dance_grpo", {"train_fraction": 1.5}, "train_fraction"),
        ("mixgrpo", {"window_size": 5}, "never covers the last two steps"),
        ("mixgrpo", {"window_size": 2, "window_shift_every": 0}, "window_shift_every"),
        ("fast", {"window_size": 4}, "first half"),
        ("flow_grpo", {"num_steps": 0}, "num_steps"),
        ("mixgrpo", {"iteration": -1}, "iteration"),
    ],
)
def test_plan_rejects_bad_inputs(variant, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _plan(variant, **kwargs)


# ----------------------------------------------------------------------------- 8. the reference codes' details


def test_dance_grpo_std_is_bessel_corrected():
    rewards = torch.tensor([1.0, 3.0, 0.0, 0.0], dtype=F64)  # two groups of 2
    population = group_advantages(rewards, 2, std_scope="group", correction=0)
    bessel = group_advantages(rewards, 2, std_scope="group", correction=1)
    # group 1: deviations -1, +1; population std 1, Bessel std sqrt(2); group 2 all equal: exactly 0
    assert torch.allclose(population, torch.tensor([-1 / 1.0001, 1 / 1.0001, 0, 0], dtype=F64)), population
    root2 = math.sqrt(2) + 1e-4
    assert torch.allclose(bessel, torch.tensor([-1 / root2, 1 / root2, 0, 0], dtype=F64)), bessel


def test_guard_log_ratio_is_the_noise_projection():
    g = torch.Generator().manual_seed(0)
    old_mean = torch.randn(3, 5, 2, dtype=F64, generator=g)
    mean = (old_mean + 0.01 * torch.randn(3, 5, 2, dtype=F64, generator=g)).requires_grad_(True)
    std = torch.tensor(0.05, dtype=F64)
    eps = torch.randn(3, 5, 2, dtype=F64, generator=g)
    x_next = old_mean + std * eps

    def log_prob(m):  # the Gaussian log-density averaged over dims, as sde_step computes it
        return (
            (-((x_next - m) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi))
            .flatten(1)
            .mean(1)
        )

    ratio = guard_log_ratio(log_prob(mean), log_prob(old_mean), mean, old_mean, std)
    by_hand = (eps * (mean - old_mean)).flatten(1).mean(1)  # (lp - lp_old) s + mse / 2s, expanded
    assert torch.allclose(ratio, by_hand, atol=1e-12), f"{ratio.tolist()} vs {by_hand.tolist()}"
    assert torch.equal(guard_log_ratio(log_prob(old_mean), log_prob(old_mean), old_mean, old_mean, std),
                       torch.zeros(3, dtype=F64)), "the rollout policy itself: ratio 1"  # fmt: skip


@pytest.mark.parametrize("kind,noise_level", [("flow_grpo", 0.7), ("dance_grpo", 0.3)])
def test_diffusion_coefficient_is_flow_grpos_kl_scale(kind, noise_level):
    x = torch.randn(2, 4, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    v = torch.randn(2, 4, 2, dtype=F64, generator=torch.Generator().manual_seed(2))
    sigma, s = _scalar(0.6), _scalar(0.45)
    step = sde_step(kind, x, v, sigma, s, noise_level, generator=torch.Generator().manual_seed(3))
    g = diffusion_coefficient(step, sigma, s)
    want = noise_level * math.sqrt(0.6 / 0.4) if kind == "flow_grpo" else noise_level
    assert float(g) == pytest.approx(want, rel=1e-12), f"{kind}: g {float(g)} vs {want}"
