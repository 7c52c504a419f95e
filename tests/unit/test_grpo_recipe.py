"""The GRPO recipe on the tiny Flux: every variant trains with every SDE kind, CPS's deterministic last
step included (it has no log-density: it is never trained)."""

from __future__ import annotations

import math

import pytest

from leapalign.config import load_config
from leapalign.recipes.grpo import train_grpo
from leapalign.training import make_run
from tests.conftest import TINY_CONFIG, tiny_overrides


def grpo_cfg(tiny_flux_dir, tmp_path, **extra):
    values = {
        "method.name": "grpo", "method.grpo.group_size": 2, "train.batch_size": 1, "train.iterations": 1,
        "sampler.num_steps": 4, "reward.serve": False, **extra,
    }  # fmt: skip
    return load_config(TINY_CONFIG, tiny_overrides(tiny_flux_dir, tmp_path / "run", **values))


def one_iteration(cfg) -> dict:
    run = make_run(cfg, progress=False)
    run.begin(None)
    train_grpo(run)
    return run.result.history[-1]


@pytest.mark.parametrize(
    "case,extra",
    [
        ("mixgrpo's widest window", {"method.grpo.variant": "mixgrpo", "method.grpo.window_size": 2}),
        ("dance_grpo every step", {"method.grpo.variant": "dance_grpo", "method.grpo.train_fraction": 1.0}),
        ("flow_grpo every step", {"method.grpo.variant": "flow_grpo", "method.grpo.train_fraction": 1.0}),
    ],
)
def test_cps_never_trains_its_deterministic_last_step(tiny_flux_dir, tmp_path, case, extra):
    metrics = one_iteration(grpo_cfg(tiny_flux_dir, tmp_path, **{"method.grpo.sde": "cps", **extra}))
    assert math.isfinite(metrics["loss"]) and metrics["skipped"] == 0.0, f"{case}: {metrics}"
    assert metrics["grpo/trained_steps"] <= 3, f"{case}: step 4 of 4 (sigma_next = 0) is not trained"


def test_dance_grpo_decodes_the_last_steps_x0_prediction(tiny_flux_dir, tmp_path):
    from leapalign.methods.common import StepRandomness
    from leapalign.methods.grpo import plan_steps
    from leapalign.recipes.grpo import group_rollout
    from leapalign.training import setup_policy

    cfg = grpo_cfg(tiny_flux_dir, tmp_path, **{"method.grpo.variant": "dance_grpo", "method.grpo.sde": "dance_grpo",
                                               "method.grpo.noise_level": 0.3})  # fmt: skip
    policy = setup_policy(cfg, "cpu")
    sigmas = policy.sigmas(4, 32, 32)
    plan = plan_steps("dance_grpo", 4, 2, iteration=0, generator=__import__("torch").Generator().manual_seed(0),
                      train_fraction=0.6, window_size=2, window_shift_every=1)  # fmt: skip
    rollout = group_rollout(policy, ["a red square"], cfg, sigmas, StepRandomness.seeded(0), plan)
    last = rollout.latents[-2]
    velocity = policy.velocity_fn(rollout.cond, rollout.image_ids, cfg.sampler.guidance_scale)(
        last, sigmas[-2]
    )
    import torch

    assert torch.allclose(rollout.x0_hat, last - sigmas[-2] * velocity, atol=1e-6), "x_hat_0 of the last step"
    assert not torch.allclose(rollout.x0_hat, rollout.latents[-1], atol=1e-3), (
        "DanceGRPO's last SDE step adds noise: its final sample is not the prediction it decodes"
    )


@pytest.mark.parametrize(
    "case,extra",
    [
        ("GRPO-Guard", {"method.grpo.ratio": "guard", "method.grpo.updates_per_rollout": 2}),
        ("per-component advantages", {
            "method.grpo.advantages": "per_component", "reward.name": "weighted_sum",
            "reward.options": "{a: {name: color_match, weight: 0.7}, b: {name: color_match, weight: 0.3}}",
        }),
        ("Flow-GRPO's KL", {"method.grpo.kl_beta": 0.04}),
    ],
)  # fmt: skip
def test_grpo_options_train(tiny_flux_dir, tmp_path, case, extra):
    metrics = one_iteration(grpo_cfg(tiny_flux_dir, tmp_path, **extra))
    assert math.isfinite(metrics["loss"]) and metrics["skipped"] == 0.0 and metrics["grad_norm"] > 0, (
        f"{case}: {metrics}"
    )
    if "kl" in case.lower():
        assert math.isfinite(metrics["grpo/kl"]) and metrics["grpo/kl"] >= 0, f"{case}: {metrics}"


def test_per_component_advantages_by_hand():
    import torch

    from leapalign.config import GRPOConfig
    from leapalign.recipes.grpo import grpo_advantages
    from leapalign.rewards.configured import WeightedSum
    from leapalign.training import LocalContext

    summed = WeightedSum.of({"a": (0.7, None), "b": (0.3, None)})
    components = {"a": torch.tensor([1.0, 3.0]), "b": torch.tensor([10.0, 10.0])}  # one group of 2
    opts = GRPOConfig(group_size=2, std_scope="group", advantages="per_component")
    adv = grpo_advantages(LocalContext(), None, components, opts, summed)
    # a: deviations -1, +1 over std 1 (+1e-4); b: equal rewards give exactly 0: 0.7 x (-1, +1) / 1.0001
    assert torch.allclose(adv, torch.tensor([-0.7, 0.7]) / 1.0001, atol=1e-7), f"advantages {adv.tolist()}"
    total = grpo_advantages(LocalContext(), 0.7 * components["a"] + 0.3 * components["b"], None, opts, summed)
    # the sum 0.7 a + 0.3 b = (3.7, 5.1): deviations -0.7, +0.7 over its std 0.7 (+1e-4)
    assert torch.allclose(total, torch.tensor([-0.7, 0.7]) / 0.7001, atol=1e-7), f"summed: {total.tolist()}"
