"""Every method on the real tiny Flux: which steps it touches, what it costs, and the GRPO invariants.

`ComputeMeter(trace=True)` records each transformer call (its sigma, whether it built a graph, the
gradient norm that reached its output in backward), so "ReFL only trains its step t" is checked on the
model, not assumed. Hand-derived checks on a linear velocity field cover DRTune's stop-gradient and
the several-pairs-per-rollout estimator.
"""

from __future__ import annotations

import pytest
import torch

from leapalign.compute import ComputeMeter
from leapalign.config import load_config
from leapalign.finetune import setup_policy
from leapalign.methods import DIRECT_METHODS, update_nfe_range
from leapalign.methods.common import StepRandomness
from leapalign.methods.drtune import drtune_rollout, sample_grad_steps
from leapalign.methods.leapalign import leaps_from_trajectory, rollout_with_leaps
from leapalign.rewards.simple import ColorMatch
from leapalign.sampling import rollout
from tests.conftest import TINY_CONFIG, tiny_overrides

PROMPTS = ["a red square", "a blue circle"]


def tiny_cfg(tiny_flux_dir, tmp_path, **extra):
    values = {"train.batch_size": 2, **extra}
    return load_config(TINY_CONFIG, tiny_overrides(tiny_flux_dir, tmp_path / "run", **values))


def traced_update(cfg, seed=0):
    """One micro-batch of cfg's method with every call traced; returns (records, metrics, nfe, sigmas)."""
    torch.manual_seed(0)
    policy = setup_policy(cfg, "cpu")
    policy.meter = ComputeMeter(checkpointing=cfg.finetune.gradient_checkpointing, trace=True)
    sigmas = policy.sigmas(cfg.sampler.num_steps, cfg.sampler.height, cfg.sampler.width)
    loss, metrics = DIRECT_METHODS[cfg.method.name](
        policy, PROMPTS, ColorMatch(), cfg, sigmas, StepRandomness.seeded(seed)
    )
    loss.backward()
    return policy.meter.records, metrics, policy.meter.nfe, sigmas


def step_index(sigmas, record) -> int:
    return int(torch.argmin((sigmas[:-1] - record.sigma).abs()))


def trained_steps(records, sigmas) -> list[int]:
    """Steps whose call received a non-zero gradient in backward."""
    return [step_index(sigmas, r) for r in records if r.grad_norm is not None and r.grad_norm > 0]


def test_leapalign_trains_exactly_steps_k_and_j(tiny_flux_dir, tmp_path):
    cfg = tiny_cfg(tiny_flux_dir, tmp_path)
    records, metrics, nfe, sigmas = traced_update(cfg)
    k, j = int(metrics["leap/k"]), int(metrics["leap/j"])
    assert [step_index(sigmas, r) for r in records] == list(range(10)), "one call per rollout step, in order"
    assert [step_index(sigmas, r) for r in records if r.graph] == [k, j], f"graphs only at k={k}, j={j}"
    assert trained_steps(records, sigmas) == [k, j], f"gradients must reach steps k={k} and j={j} only"
    assert nfe == 2 * (10 + 2 * 2), f"N + 2 leaps x (1 backward = 2 forwards) per image, got {nfe}"


def test_refl_trains_only_its_late_step(tiny_flux_dir, tmp_path):
    cfg = tiny_cfg(tiny_flux_dir, tmp_path, **{"method.name": "refl", "method.refl.last_steps": 4})
    for seed in range(3):
        records, metrics, nfe, sigmas = traced_update(cfg, seed)
        t = int(metrics["refl/t"])
        assert 6 <= t <= 9, f"t={t} must be among the last 4 of 10 steps"
        assert [step_index(sigmas, r) for r in records] == list(range(t + 1)), "roll out to t, then stop"
        assert trained_steps(records, sigmas) == [t], f"ReFL trains step t={t} only"
        assert nfe == 2 * (t + 1 + 2), f"t + 1 forwards and one backward per image, got {nfe}"


def test_draft_lv_trains_only_the_last_step(tiny_flux_dir, tmp_path):
    cfg = tiny_cfg(tiny_flux_dir, tmp_path, **{"method.name": "draft_lv", "method.draft_lv.extra_samples": 2})
    records, _, nfe, sigmas = traced_update(cfg)
    assert [step_index(sigmas, r) for r in records] == list(range(10)) + [9, 9], "the last step three times"
    assert trained_steps(records, sigmas) == [9, 9, 9], "only the last step's three calls get gradients"
    assert nfe == 2 * (9 + 3 * 3), f"9 no-grad steps + 3 x (forward + backward) per image, got {nfe}"


def test_full_backprop_trains_every_step(tiny_flux_dir, tmp_path):
    cfg = tiny_cfg(tiny_flux_dir, tmp_path, **{"method.name": "full_backprop"})
    records, _, nfe, sigmas = traced_update(cfg)
    assert trained_steps(records, sigmas) == list(range(10)), "full backprop reaches every step"
    assert nfe == 2 * 10 * 3, f"N forwards + N backwards per image, got {nfe}"


def test_drtune_trains_its_k_evenly_spaced_calls(tiny_flux_dir, tmp_path):
    cfg = tiny_cfg(tiny_flux_dir, tmp_path, **{"method.name": "drtune", "method.drtune.grad_steps": 2})
    records, metrics, nfe, sigmas = traced_update(cfg)
    t = int(metrics["drtune/t"])
    graphs = [step_index(sigmas, r) for r in records if r.graph]
    assert len(records) == t + 1 and len(graphs) == 2, f"t + 1 calls, 2 with a graph: {graphs}"
    assert trained_steps(records, sigmas) == graphs, "exactly the graph calls receive gradients"
    assert nfe == 2 * (t + 1 + 2 * 2), f"t + 1 forwards and 2 backwards per image, got {nfe}"


def test_measured_cost_lies_in_the_predicted_range(tiny_flux_dir, tmp_path):
    for name, extra in [
        ("leapalign", {}),
        ("leapalign", {"method.leapalign.pairs_per_rollout": 3}),
        ("refl", {}),
        ("draft_lv", {}),
        ("drtune", {}),
        ("full_backprop", {"finetune.gradient_checkpointing": "true"}),
    ]:
        cfg = tiny_cfg(tiny_flux_dir, tmp_path, **{"method.name": name, **extra})
        lo, hi = update_nfe_range(cfg)
        for seed in range(2):
            nfe = traced_update(cfg, seed)[2]
            assert lo <= nfe <= hi, f"{name} {extra}: measured {nfe} outside the predicted [{lo}, {hi}]"


# ----------------------------------------------------------------------------- hand-derived, linear field


def linear_field(dim=6, seed=0):
    """v(x, sigma) = W x + sigma c in float64, W and c trainable."""
    g = torch.Generator().manual_seed(seed)
    weight = (0.3 * torch.randn(dim, dim, generator=g, dtype=torch.float64)).requires_grad_()
    bias = torch.randn(dim, generator=g, dtype=torch.float64).requires_grad_()
    return (lambda x, sigma: x @ weight.T + sigma * bias), weight, bias


def test_drtune_has_no_gradient_through_model_inputs():
    velocity, weight, bias = linear_field()
    sigmas = torch.linspace(1, 0, 9, dtype=torch.float64)
    latents = torch.randn(1, 6, dtype=torch.float64)
    t, grad_calls = 6, [1, 4]
    x0_hat = drtune_rollout(velocity, latents, sigmas, t, grad_calls)
    direction = torch.randn(1, 6, dtype=torch.float64)
    (x0_hat * direction).sum().backward()
    # Hand value without any input-Jacobian term: dL/dW = sum_{i in K} dt_i g sg(x_i)^T and
    # dL/dc = sum_{i in K} dt_i sigma_i g, with dt the step (or the leap, -sigma_t, at i = t). Were the
    # inputs not detached, products of W with these terms would appear (full backprop's chain).
    with torch.no_grad():
        xs, x = [], latents.detach()
        for i in range(t + 1):
            xs.append(x)
            next_sigma = sigmas[i + 1] if i < t else torch.zeros(())
            x = x + (next_sigma - sigmas[i]) * velocity(x, sigmas[i])
        expected = sum(
            ((sigmas[i + 1] if i < t else 0.0) - sigmas[i]) * direction.T @ xs[i] for i in grad_calls
        )
        expected_c = sum(
            ((sigmas[i + 1] if i < t else 0.0) - sigmas[i]) * sigmas[i] * direction[0] for i in grad_calls
        )
    assert torch.allclose(weight.grad, expected, atol=1e-12), (
        f"dL/dW differs from the hand value by {(weight.grad - expected).abs().max():.2e}"
    )
    assert torch.allclose(bias.grad, expected_c, atol=1e-12), "dL/dc differs from the hand value"


def test_drtune_grad_calls_are_evenly_spaced():
    for seed in range(20):
        calls = sample_grad_steps(12, 3, torch.Generator().manual_seed(seed))
        gaps = [b - a for a, b in zip(calls, calls[1:], strict=False)]
        assert len(calls) == 3 and all(g in (3, 4, 5) for g in gaps), f"calls {calls}: spacing 12/3 = 4"
        assert 0 <= calls[0] < 4, f"first call {calls[0]} must lie within one spacing of 0"


def test_several_pairs_give_the_mean_of_the_single_pair_gradients():
    velocity, weight, bias = linear_field(seed=1)
    sigmas = torch.linspace(1, 0, 9, dtype=torch.float64)
    latents = torch.randn(3, 6, dtype=torch.float64)
    target = torch.randn(3, 6, dtype=torch.float64)

    def per_sample_loss(x0):  # a smooth "reward" loss per sample
        return ((x0 - target) ** 2).mean(dim=1)

    pairs = [(0, 5), (2, 3), (4, 7)]
    weights_fn = lambda d_j, d_0: 1.0 / (d_j.clamp_min(0.1) + d_0.clamp_min(0.1))  # noqa: E731
    # P single-pair LeapAlign losses (weighted), averaged: the reference.
    grads = []
    for k, j in pairs:
        leap = rollout_with_leaps(velocity, latents, sigmas, k, j, alpha=0.3)
        w = weights_fn(leap.d_j, leap.d_0)
        grads.append(torch.autograd.grad((w * per_sample_loss(leap.x0)).mean(), (weight, bias)))
    reference = [sum(g[i] for g in grads) / len(pairs) for i in range(2)]
    # One rollout, all pairs through one straight-through x_0.
    trajectory = rollout(velocity, latents, sigmas, keep_trajectory=True)
    x0, mean_weight, _ = leaps_from_trajectory(velocity, trajectory, sigmas, pairs, 0.3, weights_fn)
    assert torch.equal(x0.detach(), trajectory[-1]), "the reward still sees the real x_0"
    combined = torch.autograd.grad((mean_weight * per_sample_loss(x0)).mean(), (weight, bias))
    for name, got, want in zip(("W", "c"), combined, reference, strict=True):
        assert torch.allclose(got, want, atol=1e-12), (
            f"d/d{name}: {(got - want).abs().max():.2e} off the mean"
        )


# ----------------------------------------------------------------------------- GRPO on the tiny model


def grpo_cfg(tiny_flux_dir, tmp_path, **extra):
    values = {
        "method.name": "grpo",
        "method.grpo.group_size": 4,
        "method.grpo.clip_range": 1e-4,
        "train.iterations": 1,
        "sampler.eval_num_steps": 2,
        "train.num_samples": 1,
        **extra,
    }
    return tiny_cfg(tiny_flux_dir, tmp_path, **values)


def test_grpo_first_update_has_ratio_one_and_zero_kl(tiny_flux_dir, tmp_path):
    from leapalign.train import train

    cfg = grpo_cfg(tiny_flux_dir, tmp_path, **{"method.grpo.kl_beta": 0.5})
    metrics = train(cfg, reward_fn=ColorMatch(), progress=False).history[0]
    assert metrics["skipped"] == 0.0, f"the update must apply: {metrics}"
    assert metrics["grpo/ratio_mean"] == 1.0 and metrics["grpo/clip_frac"] == 0.0, (
        f"first update: the policy is the rollout policy, ratio exactly 1: {metrics}"
    )
    assert metrics["grpo/kl"] == 0.0, (
        f"KL to the adapter-off reference with the LoRA at zero: {metrics['grpo/kl']}"
    )
    images, trained = 2 * 4, 9
    assert metrics["compute/nfe"] == images * (10 + trained * (1 + 2 + 1)), (
        f"N sampling calls + per trained step forward, backward (2) and the reference forward: {metrics}"
    )
    assert metrics["compute/nfe"] == update_nfe_range(cfg)[0], "the predicted cost matches"


@pytest.mark.parametrize("variant", ["flow_grpo", "dance_grpo", "mixgrpo", "fast"])
def test_grpo_variants_update_and_move_the_weights(tiny_flux_dir, tmp_path, variant):
    from safetensors.torch import load_file

    from leapalign.train import train

    extra = {
        "method.grpo.variant": variant,
        "method.grpo.window_size": 2,
        "method.grpo.updates_per_rollout": 2,
    }
    if variant == "dance_grpo":
        extra |= {
            "method.grpo.sde": "dance_grpo",
            "method.grpo.noise_level": 0.3,
            "method.grpo.shared_noise": "true",
        }
    cfg = grpo_cfg(tiny_flux_dir, tmp_path / variant, **extra)
    history = train(cfg, reward_fn=ColorMatch(), progress=False).history
    assert history[0]["skipped"] == 0.0 and history[0]["grad_norm"] > 0, f"{variant}: {history[0]}"
    # int(.99 N), int(.99 (N - 1)) (DanceGRPO never trains its last step), W, W
    expected = {"flow_grpo": 9, "dance_grpo": 8, "mixgrpo": 2, "fast": 2}[variant]
    assert history[0]["grpo/trained_steps"] == expected, (
        f"{variant}: trained steps {history[0]['grpo/trained_steps']}"
    )
    lora = load_file(tmp_path / variant / "run" / "lora" / "pytorch_lora_weights.safetensors")
    moved = max(v.abs().max().item() for k, v in lora.items() if "lora.up" in k)
    assert moved > 0, f"{variant}: LoRA up (B) starts at zero; two PPO steps must move it"


@pytest.mark.parametrize(
    "method", ["leapalign", "refl", "draft_lv", "drtune", "full_backprop", "grpo", "nft", "awm"]
)
def test_every_method_reruns_bit_for_bit(tiny_flux_dir, tmp_path, method):
    """Same seed, same process settings: every logged number of a two-update run is identical (==, not
    approx), for every method; the Ray and served-reward paths are held to the same numbers in
    tests/integration (test_ray_train, test_quickstart)."""
    from leapalign.train import train

    extra = {
        "method.name": method,
        "train.iterations": 2,
        "train.num_samples": 1,
        "sampler.eval_num_steps": 2,
    }
    if method in ("grpo", "nft", "awm"):
        extra |= {f"method.{method}.group_size": 2, f"method.{method}.updates_per_rollout": 2}
    runs = []
    for name in ("a", "b"):
        cfg = tiny_cfg(tiny_flux_dir, tmp_path / name, **extra)
        history = train(cfg, reward_fn=ColorMatch(), progress=False).history
        runs.append([{k: v for k, v in m.items() if not k.startswith("time/")} for m in history])
    assert len(runs[0]) == 2 and all(m["skipped"] == 0.0 for m in runs[0]), f"{method}: {runs[0]}"
    assert runs[0] == runs[1], f"{method}: two runs with one seed differ:\n{runs[0]}\n{runs[1]}"


# ----------------------------------------------------------------------------- DiffusionNFT and AWM


def forward_cfg(tiny_flux_dir, tmp_path, method, **extra):
    values = {
        "method.name": method,
        f"method.{method}.group_size": 4,
        "train.iterations": 1,
        "sampler.eval_num_steps": 2,
        "train.num_samples": 1,
        **extra,
    }
    return tiny_cfg(tiny_flux_dir, tmp_path, **values)


@pytest.mark.parametrize(
    "method,extra",
    [
        ("nft", {}),
        ("nft", {"method.nft.kl_beta": 0.01, "method.nft.timestep_sampling": "random",
                 "finetune.gradient_checkpointing": "true", "method.nft.micro_batch": 3}),
        ("awm", {"method.awm.updates_per_rollout": 3}),
        ("awm", {"method.awm.kl_beta": 0.01, "method.awm.ema_kl_beta": 0.0, "method.awm.weighting": "t"}),
    ],
)  # fmt: skip
def test_forward_methods_update_within_their_predicted_cost(tiny_flux_dir, tmp_path, method, extra):
    """One rollout and its updates: finite loss, a non-zero gradient, LoRA moved, and the measured
    transformer cost equal to update_nfe_range's formula (N rollout calls + K pairs x (forward, backward,
    the copy's forward, the reference's), plus AWM's later-share log p forwards)."""
    from leapalign.train import train

    cfg = forward_cfg(tiny_flux_dir, tmp_path, method, **extra)
    metrics = train(cfg, reward_fn=ColorMatch(), progress=False).history[0]
    assert metrics["skipped"] == 0.0 and torch.isfinite(torch.tensor(metrics["loss"])), f"{method}: {metrics}"
    assert metrics["grad_norm"] > 0 and torch.isfinite(torch.tensor(metrics["grad_norm"])), f"{metrics}"
    lo, hi = update_nfe_range(cfg)
    assert lo <= metrics["compute/nfe"] <= hi, (
        f"{method} {extra}: {metrics['compute/nfe']} not in [{lo}, {hi}]"
    )
    if method == "awm" and "method.awm.updates_per_rollout" not in extra:
        assert metrics["awm/ratio_mean"] == 1.0, f"on-policy single update: ratio exactly 1, {metrics}"


@pytest.mark.parametrize("method,lr", [("nft", 0.1), ("awm", 0.03)])
def test_forward_methods_raise_a_trivial_reward(tiny_flux_dir, tmp_path, method, lr):
    """Brightness (ignores the prompt) on the tiny Flux, 6 steps, 12 rollouts of 2 x 4 images: the last three
    rollouts' mean reward beats the first three's by a margin well above their spread (seen: +0.016 for
    both; rollout-to-rollout noise ~0.002)."""
    from leapalign.rewards.simple import Brightness
    from leapalign.train import train

    cfg = forward_cfg(tiny_flux_dir, tmp_path, method, **{"train.iterations": 12, "optim.lr": lr,
                                                          "sampler.num_steps": 6})  # fmt: skip
    rewards = [m["reward/mean"] for m in train(cfg, reward_fn=Brightness(), progress=False).history]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.008, f"{method}: reward {first:.4f} -> {last:.4f} over 12 rollouts: {rewards}"


@pytest.mark.parametrize("method", ["nft", "awm"])
def test_the_weight_copy_follows_the_trained_weights_by_its_schedule(tiny_flux_dir, tmp_path, method):
    """After rollout k (one optimizer step each) the copy is s_k = d_k s_{k-1} + (1 - d_k) w_k with
    d_k = min(rate k, cap), s_0 the initial weights and w_k the weights after update k."""
    from leapalign.recipes.forward import train_forward
    from leapalign.run import TrainingRun

    cfg = forward_cfg(tiny_flux_dir, tmp_path, method, **{"train.iterations": 3,
                      f"method.{method}.decay_rate": 0.2, f"method.{method}.decay_cap": 0.5})  # fmt: skip
    run = TrainingRun(cfg, reward_fn=ColorMatch(), progress=False)
    hand = [p.detach().clone() for p in run.params]
    after = []
    run.on_step_end = lambda end: after.append([p.detach().clone() for p in run.params])
    run.begin(None)
    train_forward(run)
    assert len(after) == 3 and run.result.history[-1][f"{method}/copy_decay"] == 0.5, "d = 0.2, 0.4, 0.5"
    for k, weights in enumerate(after, start=1):
        d = min(0.2 * k, 0.5)
        hand = [d * s + (1 - d) * w for s, w in zip(hand, weights, strict=True)]
    moved = max((w - s).abs().max().item() for w, s in zip(after[-1], hand, strict=True))
    assert moved > 0, "the copy lags the trained weights"
    diff = max((c - s).abs().max().item() for c, s in zip(run.policy_copy.shadow, hand, strict=True))
    assert diff < 1e-6, f"{method}: the copy is {diff:.2e} off the hand-computed EMA"


def test_forward_noise_is_drawn_for_the_global_batch():
    """Rank r of 2 with B images keeps exactly rows r B .. (r + 1) B - 1 of what one worker with 2B draws."""
    from leapalign.methods.forward_process import plan_timesteps
    from leapalign.recipes.forward import draw_forward_noise

    plan = plan_timesteps("random", 5, 6, 2, 1.0, torch.Generator().manual_seed(0))  # [2 x 3 global, N]
    whole = draw_forward_noise(plan, torch.Size([6, 4, 2]), StepRandomness.seeded(7))
    parts = [
        draw_forward_noise(plan, torch.Size([3, 4, 2]), StepRandomness.seeded(7, rank, 2)) for rank in (0, 1)
    ]
    assert torch.equal(torch.cat(parts, dim=1), whole), "two ranks' noise is the one worker's, split by rows"
    assert torch.equal(whole.abs().sum(dim=(2, 3)) > 0, plan.T), (
        "noise exactly at the trained (step, image) pairs"
    )
