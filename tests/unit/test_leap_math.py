"""Hand-derived checks of the LeapAlign math: gradients (Eq. 8/10), connectors, weights, hinge."""

from __future__ import annotations

import pytest
import torch

from leapalign.methods.leapalign import hinge_loss, rollout_with_leaps, similarity_weight
from leapalign.sampling import flux_sigmas, rollout


class LinearField(torch.nn.Module):
    """v_theta(x, sigma) = x W^T + sigma c: dv/dx = W, dv/dW_ab = e_a x_b, dv/dc = sigma I."""

    def __init__(self, dim: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = torch.nn.Parameter(0.3 * torch.randn(dim, dim, generator=g, dtype=torch.float64))
        self.c = torch.nn.Parameter(torch.randn(dim, generator=g, dtype=torch.float64))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return x @ self.W.T + sigma * self.c


def _setup(num_steps=8, batch=3, dim=5):
    field = LinearField(dim)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(batch, 1, dim, generator=g, dtype=torch.float64)  # [B, S=1, C]
    reward_dir = torch.randn(batch, 1, dim, generator=g, dtype=torch.float64)  # r_b = <g_b, x0_b>
    sigmas = flux_sigmas(num_steps, image_seq_len=1024).double()
    return field, latents, reward_dir, sigmas


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("k,j", [(0, 1), (0, 7), (2, 5), (6, 7)])
def test_gradient_equals_eq8_decomposition(alpha, k, j):
    field, latents, reward_dir, sigmas = _setup()
    traj = rollout(field, latents, sigmas, keep_trajectory=True)
    x_k, x_j = traj[k], traj[j]
    leap = rollout_with_leaps(field, latents, sigmas, k, j, alpha=alpha)
    (reward_dir * leap.x0).sum().backward()

    # Eq. 8/10: dx0/dtheta = -s_j dv(x_j)/dtheta - (s_k - s_j) dv(x_k)/dtheta
    #                        + alpha s_j (s_k - s_j) W dv(x_k)/dtheta, contracted with g = dr/dx0.
    s_k, s_j = sigmas[k], sigmas[j]
    W = field.W.detach()
    g = reward_dir[:, 0]  # [B, C]
    gW = g @ W  # [B, C] = (W^T g)
    nested = alpha * s_j * (s_k - s_j)
    expected_W = (
        -s_j * g.T @ x_j[:, 0] - (s_k - s_j) * g.T @ x_k[:, 0] + nested * gW.T @ x_k[:, 0]
    )  # sum over batch of outer products
    expected_c = (-s_j * s_j * g - (s_k - s_j) * s_k * g + nested * s_k * gW).sum(0)
    assert torch.allclose(field.W.grad, expected_W, atol=1e-10, rtol=0), (
        f"dL/dW differs from Eq. 8/10 by {(field.W.grad - expected_W).abs().max():.3e} (alpha={alpha}, k={k}, j={j})"
    )
    assert torch.allclose(field.c.grad, expected_c, atol=1e-10, rtol=0), (
        f"dL/dc differs from Eq. 8/10 by {(field.c.grad - expected_c).abs().max():.3e} (alpha={alpha}, k={k}, j={j})"
    )


def test_alpha_only_scales_the_nested_term():
    """The gradient is affine in alpha: g(0.3) = g(0) + 0.3 (g(1) - g(0)), and g(1) != g(0)."""
    grads = {}
    for alpha in (0.0, 0.3, 1.0):
        field, latents, reward_dir, sigmas = _setup()
        (reward_dir * rollout_with_leaps(field, latents, sigmas, 1, 6, alpha=alpha).x0).sum().backward()
        grads[alpha] = field.W.grad.clone()
    assert (grads[1.0] - grads[0.0]).abs().max() > 1e-3, "alpha had no effect: the nested term is missing"
    interpolated = grads[0.0] + 0.3 * (grads[1.0] - grads[0.0])
    assert torch.allclose(grads[0.3], interpolated, atol=1e-12), "gradient is not affine in alpha"


def test_connectors_keep_rollout_values_and_distances():
    field, latents, _, sigmas = _setup()
    traj = rollout(field, latents, sigmas, keep_trajectory=True)
    leap = rollout_with_leaps(field, latents, sigmas, 2, 5, alpha=0.3, keep_trajectory=True)
    for i, (a, b) in enumerate(zip(traj, leap.trajectory, strict=True)):
        assert torch.equal(a, b), f"rollout latent {i} differs from the plain no-grad rollout"
    assert torch.equal(leap.x0.detach(), traj[-1]), "connector 2 must give the real x_0 value exactly"
    with torch.no_grad():
        x_hat_j = traj[2] - (sigmas[2] - sigmas[5]) * field(traj[2], sigmas[2])
        x_hat_0 = traj[5] - sigmas[5] * field(traj[5], sigmas[5])
    expected_dj = (traj[5] - x_hat_j).abs().mean(dim=(1, 2))
    expected_d0 = (traj[-1] - x_hat_0).abs().mean(dim=(1, 2))
    assert torch.allclose(leap.d_j, expected_dj, atol=1e-14), f"d_j {leap.d_j} != {expected_dj}"
    assert torch.allclose(leap.d_0, expected_d0, atol=1e-14), f"d_0 {leap.d_0} != {expected_d0}"
    adjacent = rollout_with_leaps(field, latents, sigmas, 3, 4, alpha=0.3)
    assert adjacent.d_j.abs().max() < 1e-15, "a leap over one step is that Euler step: d_j must be 0"


def test_invalid_pair_is_rejected():
    field, latents, _, sigmas = _setup(num_steps=4)
    for k, j in [(2, 2), (3, 1), (0, 4), (-1, 2)]:
        with pytest.raises(ValueError, match="0 <= k < j"):
            rollout_with_leaps(field, latents, sigmas, k, j, alpha=0.3)


def test_similarity_weight_hand_values():
    d_j = torch.tensor([0.02, 0.5, 0.3, 0.0])
    d_0 = torch.tensor([0.05, 0.1, 1.0, 0.7])
    tau = 0.1
    # both: 1 / (max(d_j, .1) + max(d_0, .1))
    assert torch.allclose(similarity_weight(d_j, d_0, tau), torch.tensor([5.0, 1 / 0.6, 1 / 1.3, 1 / 0.8])), (
        "both"
    )
    assert torch.allclose(
        similarity_weight(d_j, d_0, tau, "d_j"), torch.tensor([10.0, 2.0, 1 / 0.3, 10.0])
    ), "d_j"
    assert torch.allclose(
        similarity_weight(d_j, d_0, tau, "d_0"), torch.tensor([10.0, 10.0, 1.0, 1 / 0.7])
    ), "d_0"
    assert torch.equal(similarity_weight(d_j, d_0, tau, "none"), torch.ones(4)), "none must give 1"
    assert similarity_weight(torch.zeros(3), torch.zeros(3), 0.1).max() == pytest.approx(5.0), (
        "w <= 1/(2 tau) = 5"
    )
    with pytest.raises(ValueError, match="unknown weighting"):
        similarity_weight(d_j, d_0, tau, "both_distances")


def test_hinge_loss_hand_values_and_gradient():
    rewards = torch.tensor([0.2, 0.6, 0.5], requires_grad=True)
    weight = torch.tensor([2.0, 3.0, 4.0])
    loss = hinge_loss(rewards, weight, hinge=0.55)
    # (2 * 0.35 + 3 * 0 + 4 * 0.05) / 3 = 0.3
    assert loss.item() == pytest.approx(0.3), f"hinge loss {loss.item()} != 0.3"
    loss.backward()
    expected = torch.tensor([-2 / 3, 0.0, -4 / 3])
    assert torch.allclose(rewards.grad, expected), f"d loss / d r = {rewards.grad}, expected {expected}"
