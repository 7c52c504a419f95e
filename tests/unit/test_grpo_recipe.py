"""The GRPO recipe on the tiny Flux: every variant trains with every SDE kind, CPS's deterministic last
step included (it has no log-density: it is never trained)."""

from __future__ import annotations

import math

import pytest

from leapalign.config import load_config
from leapalign.recipes.grpo import train_grpo
from leapalign.run import TrainingRun
from tests.conftest import TINY_CONFIG, tiny_overrides


def grpo_cfg(tiny_flux_dir, tmp_path, **extra):
    values = {
        "method.name": "grpo", "method.grpo.group_size": 2, "train.batch_size": 1, "train.iterations": 1,
        "sampler.num_steps": 4, "reward.serve": False, **extra,
    }  # fmt: skip
    return load_config(TINY_CONFIG, tiny_overrides(tiny_flux_dir, tmp_path / "run", **values))


def one_iteration(cfg) -> dict:
    run = TrainingRun(cfg, progress=False)
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
    from leapalign.finetune import setup_policy
    from leapalign.methods.common import StepRandomness
    from leapalign.methods.grpo import plan_steps
    from leapalign.recipes.grpo import group_rollout

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
    from leapalign.parallel import LocalContext
    from leapalign.recipes.grpo import grpo_advantages
    from leapalign.rewards.configured import WeightedSum

    summed = WeightedSum.of({"a": (0.7, None), "b": (0.3, None)})
    components = {"a": torch.tensor([1.0, 3.0]), "b": torch.tensor([10.0, 10.0])}  # one group of 2
    opts = GRPOConfig(group_size=2, std_scope="group", advantages="per_component")
    adv = grpo_advantages(LocalContext(), None, components, opts, summed)
    # a: deviations -1, +1 over std 1 (+1e-4); b: equal rewards give exactly 0: 0.7 x (-1, +1) / 1.0001
    assert torch.allclose(adv, torch.tensor([-0.7, 0.7]) / 1.0001, atol=1e-7), f"advantages {adv.tolist()}"
    total = grpo_advantages(LocalContext(), 0.7 * components["a"] + 0.3 * components["b"], None, opts, summed)
    # the sum 0.7 a + 0.3 b = (3.7, 5.1): deviations -0.7, +0.7 over its std 0.7 (+1e-4)
    assert torch.allclose(total, torch.tensor([-0.7, 0.7]) / 0.7001, atol=1e-7), f"summed: {total.tolist()}"


def test_ppo_work_pairs_every_ranks_calls_and_weighs_the_share_whole():
    """Two ranks of B = 2 samples each, N = 3 steps, a hand-made global plan: both ranks call the model at
    the same steps the same number of times (collectives pair up), a rank with no sample at a step takes a
    call of 0 pairs, and the pairs of all ranks add up to the share's."""
    import torch

    from leapalign.methods.grpo import StepPlan
    from leapalign.recipes.grpo import ppo_work

    train = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 1, 0], [0, 1, 1]], dtype=torch.bool)  # [4 global, N]
    plan = StepPlan(sde=torch.ones(3, dtype=torch.bool), train=train)
    share = torch.tensor([3, 0, 1])  # sample 2 (rank 1) is in another share
    work = {rank: ppo_work(plan, share, 2, rank, 2, micro_batch=1) for rank in (0, 1)}
    (w0, total0), (w1, total1) = work[0], work[1]
    assert total0 == total1 == 5, "pairs of samples 3, 0, 1: 2 + 2 + 1"
    assert [t for t, _, _ in w0] == [t for t, _, _ in w1] == [0, 0, 1, 2], f"same calls: {w0} / {w1}"
    # Rank 0 owns samples 0, 1 (both trained at step 0; sample 0 at step 1); rank 1 owns sample 3 (local 1).
    assert [(t, i.tolist(), n) for t, i, n in w0] == [(0, [0], 1), (0, [1], 1), (1, [0], 1), (2, [0], 0)]
    assert [(t, i.tolist(), n) for t, i, n in w1] == [(0, [0], 0), (0, [0], 0), (1, [1], 1), (2, [1], 1)]
    assert sum(n for *_, n in w0) + sum(n for *_, n in w1) == 5, "every pair once"
    whole, _ = ppo_work(plan, share, 2, 0, 2, micro_batch=0)
    assert [(t, i.tolist(), n) for t, i, n in whole] == [(0, [0, 1], 2), (1, [0], 1), (2, [0], 0)], f"{whole}"


def test_micro_batches_do_not_change_the_numbers(tiny_flux_dir, tmp_path):
    """The SDE noise is drawn for the whole batch before any model call: method.grpo.micro_batch only
    changes how many images a call takes (rows of a batch are computed alike: MKL_CBWR=...,STRICT)."""
    extra = {"method.grpo.variant": "dance_grpo", "method.grpo.sde": "dance_grpo", "method.grpo.noise_level": 0.3,
             "train.batch_size": 2, "method.grpo.updates_per_rollout": 2}  # fmt: skip
    whole = one_iteration(grpo_cfg(tiny_flux_dir, tmp_path / "whole", **extra))
    split = one_iteration(
        grpo_cfg(tiny_flux_dir, tmp_path / "split", **extra, **{"method.grpo.micro_batch": 1})
    )
    for key in ("reward/mean", "loss", "grad_norm", "grpo/ratio_mean"):
        assert split[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-9), (
            f"{key}: micro_batch 1 gives {split[key]}, the whole batch {whole[key]}"
        )
