"""Leap-pair laws: exact probabilities, empirical frequencies, ranges, and bad settings."""

from __future__ import annotations

import math

import pytest
import torch

from leapalign.config import ConfigError, LeapConfig
from leapalign.methods.leapalign import leap_pair_probabilities, sample_leap_pair
from leapalign.sampling import flux_sigmas

SIGMAS = flux_sigmas(6, image_seq_len=4096)  # N = 6 steps -> 15 pairs


def _draw(cfg: LeapConfig, n: int, seed: int = 0) -> torch.Tensor:
    probs = leap_pair_probabilities(SIGMAS, cfg)
    g = torch.Generator().manual_seed(seed)
    counts = torch.zeros(6, 6)
    for _ in range(n):
        k, j = sample_leap_pair(probs, g)
        counts[k, j] += 1
    return counts


def test_uniform_every_pair_equally_likely():
    probs = leap_pair_probabilities(SIGMAS, LeapConfig())
    upper = torch.ones(6, 6).triu(1).bool()
    assert torch.allclose(probs[upper], torch.full((15,), 1 / 15, dtype=torch.float64)), (
        "uniform: each pair 1/15"
    )
    assert probs[~upper].abs().sum() == 0, "no mass on k >= j"
    counts = _draw(LeapConfig(), 15_000)
    assert counts[~upper].sum() == 0, "sampled a pair with k >= j"
    freq = counts[upper] / 15_000
    # binomial sd of a frequency near 1/15 over 15k draws is 0.002: allow 5 sd
    assert (freq - 1 / 15).abs().max() < 0.0102, f"pair frequencies {freq.tolist()} are not uniform"
    chi2 = (((counts[upper] - 1000) ** 2) / 1000).sum().item()
    assert chi2 < 36.1, f"chi-square {chi2:.1f} over 14 dof rejects uniformity at p=0.001"


def test_sigma_range_is_respected():
    cfg = LeapConfig(distribution="sigma_range", sigma_min=0.3, sigma_max=0.95)
    inside = [i for i, s in enumerate(SIGMAS[:-1].tolist()) if 0.3 <= s <= 0.95]
    assert len(inside) >= 2, f"test grid {SIGMAS.tolist()} should have two steps in range"
    probs = leap_pair_probabilities(SIGMAS, cfg)
    expected_pairs = math.comb(len(inside), 2)
    nonzero = probs.nonzero().tolist()
    assert len(nonzero) == expected_pairs, f"{len(nonzero)} pairs carry mass, expected {expected_pairs}"
    assert all(k in inside and j in inside for k, j in nonzero), f"pairs {nonzero} leave the sigma range"
    assert torch.allclose(
        probs[probs > 0], torch.full((expected_pairs,), 1 / expected_pairs, dtype=torch.float64)
    )
    counts = _draw(cfg, 3000)
    drawn = {tuple(p) for p in counts.nonzero().tolist()}
    assert drawn <= {tuple(p) for p in nonzero}, "sampled outside the sigma range"


def test_fixed_gap():
    probs = leap_pair_probabilities(SIGMAS, LeapConfig(distribution="fixed_gap", gap=2))
    pairs = probs.nonzero().tolist()
    assert pairs == [[0, 2], [1, 3], [2, 4], [3, 5]], f"fixed gap 2 pairs: {pairs}"
    assert torch.allclose(probs[probs > 0], torch.full((4,), 0.25, dtype=torch.float64)), "k uniform"


def test_beta_mass_matches_hand_computation():
    cfg = LeapConfig(distribution="beta", beta_a=2.0, beta_b=5.0)
    probs = leap_pair_probabilities(SIGMAS, cfg)
    s = SIGMAS.double()
    mid = (s[:-1] + s[1:]) / 2
    pdf = 30.0 * mid * (1 - mid) ** 4  # Beta(2, 5) density: x (1-x)^4 / B(2, 5), B = 1/30
    mass = pdf * (s[:-1] - s[1:])
    expected = torch.outer(mass, mass).triu(1)
    expected /= expected.sum()
    assert torch.allclose(probs, expected, atol=1e-12), "Beta pair law differs from m_k m_j / Z"
    assert probs.sum().item() == pytest.approx(1.0), "probabilities must sum to 1"
    # Beta(2, 5) puts its mass at low sigma: the late steps carry more than the early ones.
    assert probs[3:, :].sum() + probs[:, 3:].sum() > probs[:3, :3].sum(), "Beta(2,5) should favour low sigma"


def test_bad_leap_settings_are_explained():
    with pytest.raises(ValueError, match="widen the range"):
        leap_pair_probabilities(SIGMAS, LeapConfig(distribution="sigma_range", sigma_min=0.0, sigma_max=0.01))
    with pytest.raises(ValueError, match="leap.gap"):
        leap_pair_probabilities(SIGMAS, LeapConfig(distribution="fixed_gap", gap=6))
    with pytest.raises(ConfigError, match="choose one of"):
        LeapConfig(distribution="lognormal")
    with pytest.raises(ConfigError, match="Beta shape"):
        LeapConfig(distribution="beta", beta_a=0.0)
