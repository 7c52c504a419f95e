"""Hand-derived checks of DiffusionNFT's and AWM's math (methods/nft.py, methods/awm.py,
methods/forward_process.py): closed forms of the losses, their on-policy gradients on a linear velocity
field, the timestep plans, the weight copy's ramped decay, and the config errors."""

from __future__ import annotations

import pytest
import torch

from leapalign.config import ConfigError, load_config
from leapalign.finetune import EMA
from leapalign.methods.awm import awm_log_prob, awm_loss
from leapalign.methods.forward_process import copy_decay, noise_latents, plan_timesteps
from leapalign.methods.nft import nft_loss
from tests.conftest import TINY_CONFIG

F64 = torch.float64


def linear_field(dim=6, seed=0):
    """v(x, sigma) = W x + sigma c in float64, W and c trainable."""
    g = torch.Generator().manual_seed(seed)
    weight = (0.3 * torch.randn(dim, dim, generator=g, dtype=F64)).requires_grad_()
    bias = torch.randn(dim, generator=g, dtype=F64).requires_grad_()
    return (lambda x, sigma: x @ weight.T + sigma.view(-1, 1) * bias), weight, bias


def pairs(batch=4, dim=6, seed=1):
    """x_0, eps, per-sample sigma t, x_t = (1 - t) x_0 + t eps."""
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(batch, dim, generator=g, dtype=F64), torch.randn(batch, dim, generator=g, dtype=F64)
    t = torch.tensor([0.9, 0.6, 0.35, 0.8], dtype=F64)[:batch]
    return x0, eps, t, noise_latents(x0, eps, t)


# ----------------------------------------------------------------------------- DiffusionNFT


def test_nft_loss_closed_forms_at_the_extreme_advantages():
    """beta = 1, A = +A_max (r = 1): x0+ - x_0 = t (eps - x_0 - v) = -t d with d = v - (eps - x_0), so
    loss = A_max t mean(d^2) / mean|d|, whatever v_old. A = -A_max (r = 0): v- = 2 v_old - v, the same with
    d- = 2 v_old - v - (eps - x_0)."""
    x0, eps, t, x_t = pairs(batch=1)
    g = torch.Generator().manual_seed(5)
    v, v_old = torch.randn(1, 6, generator=g, dtype=F64), torch.randn(1, 6, generator=g, dtype=F64)
    for advantage, d in ((5.0, v - (eps - x0)), (-5.0, 2 * v_old - v - (eps - x0))):
        loss, _ = nft_loss(v, v_old, x_t, x0, t, torch.tensor([advantage], dtype=F64), beta=1.0, adv_clip=5.0)
        expected = 5.0 * t[0] * (d**2).mean() / d.abs().mean()
        assert torch.allclose(loss, expected, rtol=1e-12, atol=0), f"A={advantage}: {loss} != {expected}"
    # A beyond A_max is clipped: the same loss as A = A_max.
    big, _ = nft_loss(v, v_old, x_t, x0, t, torch.tensor([40.0], dtype=F64), beta=1.0, adv_clip=5.0)
    assert torch.allclose(big, 5.0 * t[0] * ((v - eps + x0) ** 2).mean() / (v - eps + x0).abs().mean()), (
        "advantages are clipped to +-A_max"
    )


def test_nft_on_policy_gradient_is_advantage_weighted_flow_matching():
    """v = v_old in value: d loss / d v_b = -(2 t_b A'_b / (B D w_b)) (x_hat_b - x_0,b), x_hat = x_t - t v,
    w = mean|x_hat - x_0|, A' = clip(A, +-A_max), for every beta and A_max; through v = W x_t + t c that is
    dL/dW = sum_b g_b x_t,b^T and dL/dc = sum_b t_b g_b."""
    velocity_fn, weight, bias = linear_field()
    x0, eps, t, x_t = pairs()
    advantages = torch.tensor([1.3, -0.4, 7.0, -2.2], dtype=F64)  # 7.0 is clipped to A_max = 5
    batch, dim = x0.shape
    with torch.no_grad():
        v_old = velocity_fn(x_t, t)
        x_hat = x_t - t[:, None] * v_old
        w = (x_hat - x0).abs().mean(dim=1, keepdim=True)
        clipped = advantages.clamp(-5.0, 5.0)[:, None]
        g_v = -(2 * t[:, None] * clipped / (batch * dim * w)) * (x_hat - x0)  # [B, D]
    for beta in (1.0, 0.1):
        v = v_old.clone().requires_grad_()
        loss, _ = nft_loss(v, v_old, x_t, x0, t, advantages, beta=beta, adv_clip=5.0)
        (grad,) = torch.autograd.grad(loss, v)
        assert torch.allclose(grad, g_v, rtol=1e-10, atol=1e-14), (
            f"beta={beta}: dL/dv off the closed form by {(grad - g_v).abs().max():.2e}"
        )
    loss, _ = nft_loss(velocity_fn(x_t, t), v_old, x_t, x0, t, advantages, beta=1.0, adv_clip=5.0)
    grad_w, grad_c = torch.autograd.grad(loss, (weight, bias))
    assert torch.allclose(grad_w, g_v.T @ x_t, atol=1e-13), "dL/dW = sum_b g_b x_t,b^T"
    assert torch.allclose(grad_c, (t[:, None] * g_v).sum(dim=0), atol=1e-13), "dL/dc = sum_b t_b g_b"
    # Gradient descent moves the good sample's x_0 prediction toward x_0, the bad one's away.
    step = x_hat + t[:, None] * 1e-3 * g_v  # x_hat(v - lr g) = x_hat + t lr g
    closer = (step - x0).norm(dim=1) < (x_hat - x0).norm(dim=1)
    assert closer.tolist() == [True, False, True, False], f"toward x_0 exactly where A > 0: {closer.tolist()}"


def test_nft_kl_term_is_the_v_space_mse_to_the_reference():
    x0, eps, t, x_t = pairs()
    g = torch.Generator().manual_seed(2)
    v, v_ref = torch.randn(4, 6, generator=g, dtype=F64), torch.randn(4, 6, generator=g, dtype=F64)
    advantages = torch.zeros(4, dtype=F64)
    plain, _ = nft_loss(v, v, x_t, x0, t, advantages, beta=1.0, adv_clip=5.0)
    with_kl, metrics = nft_loss(
        v, v, x_t, x0, t, advantages, beta=1.0, adv_clip=5.0, ref_velocity=v_ref, kl_beta=0.25
    )
    kl = ((v - v_ref) ** 2).mean()
    assert torch.allclose(with_kl - plain, 0.25 * kl, atol=1e-13), "loss + kl_beta mean (v - v_ref)^2"
    assert torch.allclose(metrics["nft/kl"], kl), "the logged KL"
    with pytest.raises(ValueError, match="ref_velocity"):
        nft_loss(v, v, x_t, x0, t, advantages, beta=1.0, adv_clip=5.0, kl_beta=0.1)
    with pytest.raises(ValueError, match="beta"):
        nft_loss(v, v, x_t, x0, t, advantages, beta=0.0, adv_clip=5.0)


# ----------------------------------------------------------------------------- AWM


def test_awm_log_prob_weightings_by_hand():
    x0, eps, t, x_t = pairs()
    g = torch.Generator().manual_seed(3)
    v = torch.randn(4, 6, generator=g, dtype=F64)
    m = ((v - (eps - x0)) ** 2).mean(dim=1)
    expected = {
        "uniform": -m,
        "t": -m * t,
        "t2": -m * t**2,
        "huber": -(torch.sqrt(m + 1e-10) - 1e-5) * t,
        "ghuber": -((m + 1e-10) ** 0.25 - 1e-10**0.25) * t / 0.25,
    }
    for weighting, want in expected.items():
        got = awm_log_prob(v, x0, eps, t, weighting, 0.25)
        assert torch.allclose(got, want, rtol=1e-12, atol=0), f"{weighting}: {got} != {want}"
    with pytest.raises(ValueError, match="weighting"):
        awm_log_prob(v, x0, eps, t, "elbo")


@pytest.mark.parametrize("weighting", ["uniform", "ghuber"])
def test_awm_on_policy_gradient_is_advantage_weighted_flow_matching(weighting):
    """ratio = 1: d loss / d v_b = (A_b / B) w'(m_b) (2 / D) (v_b - (eps_b - x_0,b)), w'(m) = 1 (uniform) or
    t (m + 1e-10)^(q - 1) (ghuber); through the linear field dL/dW = sum_b g_b x_t,b^T."""
    velocity_fn, weight, _ = linear_field(seed=4)
    x0, eps, t, x_t = pairs()
    advantages = torch.tensor([0.7, -1.0, 0.2, -0.3], dtype=F64)
    batch, dim = x0.shape
    v = velocity_fn(x_t, t)
    log_prob = awm_log_prob(v, x0, eps, t, weighting, 0.25)
    loss, metrics = awm_loss(log_prob, log_prob.detach(), advantages, v, clip_range=1.0)
    assert metrics["awm/ratio_mean"] == 1.0 and metrics["awm/clip_frac"] == 0.0, "on-policy: ratio exactly 1"
    with torch.no_grad():
        d = v - (eps - x0)
        m = (d**2).mean(dim=1)
        slope = torch.ones_like(m) if weighting == "uniform" else t * (m + 1e-10) ** (0.25 - 1)
        g_v = (advantages * slope / batch)[:, None] * (2 / dim) * d  # [B, D]
    (grad_w,) = torch.autograd.grad(loss, weight)
    assert torch.allclose(grad_w, g_v.T @ x_t, rtol=1e-10, atol=1e-13), (
        f"{weighting}: dL/dW off the closed form by {(grad_w - g_v.T @ x_t).abs().max():.2e}"
    )


def test_awm_clipped_ratio_stops_the_gradient_and_kl_terms_add():
    x0, eps, t, x_t = pairs()
    g = torch.Generator().manual_seed(6)
    v = torch.randn(4, 6, generator=g, dtype=F64).requires_grad_()
    log_prob = awm_log_prob(v, x0, eps, t, "uniform")
    advantages = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=F64)
    # samples 0 and 2 far outside [1 - eps, 1 + eps] on the side their advantage pushes: no gradient.
    old = log_prob.detach() - torch.tensor([0.5, 0.0, -0.5, 0.0], dtype=F64)
    loss, metrics = awm_loss(log_prob, old, advantages, v, clip_range=0.1)
    (grad,) = torch.autograd.grad(loss, v)
    assert grad[0].abs().max() == 0 and grad[2].abs().max() == 0, "clipped samples get no gradient"
    assert grad[1].abs().max() > 0 and grad[3].abs().max() > 0, "in-range samples do"
    assert metrics["awm/clip_frac"] == 0.5, f"two of four ratios clipped: {metrics}"
    v_ref, v_ema = torch.zeros(4, 6, dtype=F64), torch.ones(4, 6, dtype=F64)
    plain, _ = awm_loss(log_prob, log_prob.detach(), advantages, v, clip_range=1.0)
    full, _ = awm_loss(log_prob, log_prob.detach(), advantages, v, clip_range=1.0, ref_velocity=v_ref,
                       kl_beta=0.5, ema_velocity=v_ema, ema_kl_beta=2.0)  # fmt: skip
    expected = 0.5 * (v**2).mean() + 2.0 * ((v - 1) ** 2).mean()
    assert torch.allclose(full - plain, expected, atol=1e-12), (
        "kl_beta mse(v, v_ref) + ema_kl_beta mse(v, v_ema)"
    )


# ----------------------------------------------------------------------------- plans and the weight copy


@pytest.mark.parametrize("sampling", ["random", "stratified"])
def test_timestep_plans_train_k_eligible_steps_per_sample(sampling):
    plan = plan_timesteps(sampling, 10, 64, 3, 0.7, torch.Generator().manual_seed(0))
    assert plan.shape == (64, 10) and plan.sum(dim=1).tolist() == [3] * 64, "exactly K = 3 per sample"
    assert not plan[:, 7:].any(), "only the first int(0.7 x 10) = 7 steps are eligible"
    if sampling == "stratified":  # strata [0, 2), [2, 4), [4, 7): one step each
        for lo, hi in ((0, 2), (2, 4), (4, 7)):
            assert plan[:, lo:hi].sum(dim=1).eq(1).all(), f"one step in stratum [{lo}, {hi})"
    assert plan[:, :7].any(dim=0).all(), f"{sampling}: every eligible step drawn by some of 64 samples"
    again = plan_timesteps(sampling, 10, 64, 3, 0.7, torch.Generator().manual_seed(0))
    assert torch.equal(plan, again), "one generator state, one plan"
    whole = plan_timesteps(sampling, 10, 5, 10, 0.5, torch.Generator().manual_seed(1))
    assert whole.all(), "K = N trains every step (E = max(K, int(f N)))"


def test_copy_decay_schedule_and_the_ema_it_gives():
    """d_k = min(rate k, cap) (DiffusionNFT: 0.001, 0.5); k updates of a weight w_1, w_2, w_3 from s_0:
    s_k = d_k s_{k-1} + (1 - d_k) w_k."""
    assert [copy_decay(k, 0.001, 0.5) for k in (0, 1, 300, 500, 10_000)] == [0.0, 0.001, 0.3, 0.5, 0.5]
    param = torch.nn.Parameter(torch.tensor([0.0, 2.0]))
    copy = EMA([param], 0.0)
    hand = torch.tensor([0.0, 2.0])
    for k, value in enumerate(([1.0, 1.0], [2.0, -2.0], [3.0, 0.5]), start=1):
        with torch.no_grad():
            param.copy_(torch.tensor(value))
        d = copy_decay(k, 0.2, 0.5)  # 0.2, 0.4, 0.5
        copy.update(d)
        hand = d * hand + (1 - d) * torch.tensor(value)
    # s_1 = (0.8, 1.2), s_2 = (1.52, -0.72), s_3 = (2.26, -0.11)
    assert torch.allclose(hand, torch.tensor([2.26, -0.11]), atol=1e-6), f"hand values {hand}"
    assert torch.allclose(copy.shadow[0], hand, atol=1e-6), f"copy {copy.shadow[0]} != {hand}"
    with pytest.raises(ValueError, match="cap"):
        copy_decay(1, 0.1, 1.0)


# ----------------------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["method.name=nft", "method.nft.beta=0"], "method.nft.beta=0.0"),
        (["method.name=nft", "method.nft.decay_cap=1.0"], "method.nft.decay_cap=1.0"),
        (["method.name=nft", "method.nft.group_size=1"], "group needs >= 2"),
        (["method.name=nft", "method.nft.timestep_sampling=uniform"], "timestep_sampling='uniform'"),
        (["method.name=nft", "method.nft.train_timesteps=11"], "exceeds sampler.num_steps=10"),
        (["method.name=nft", "method.nft.kl_beta=0.1", "finetune.mode=full"], "needs finetune.mode=lora"),
        (["method.name=awm", "method.awm.weighting=elbo"], "method.awm.weighting='elbo'"),
        (["method.name=awm", "method.awm.clip_range=0"], "method.awm.clip_range=0.0"),
        (["method.name=awm", "method.awm.timestep_range=0"], "method.awm.timestep_range=0.0"),
        (["method.name=awm", "method.awm.updates_per_rollout=100"], "exceeds the 16 images"),
    ],
)
def test_bad_nft_and_awm_values_fail_clearly(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("+", r"\+")):
        load_config(TINY_CONFIG, overrides)
