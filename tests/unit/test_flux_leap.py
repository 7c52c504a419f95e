"""LeapAlign on the real (tiny) diffusers Flux: rollout identity, LoRA round trip, NaN rewards."""

from __future__ import annotations

import logging

import pytest
import torch

from leapalign.config import load_config
from leapalign.finetune import setup_policy, trainable_parameters
from leapalign.methods.leapalign import rollout_with_leaps
from leapalign.run_folder import save_trained_weights
from leapalign.sampling import rollout
from leapalign.train import train
from tests.conftest import TINY_CONFIG, tiny_overrides


@pytest.fixture()
def policy_cfg(tiny_flux_dir, tmp_path):
    cfg = load_config(
        TINY_CONFIG,
        tiny_overrides(tiny_flux_dir, tmp_path / "run", **{"finetune.gradient_checkpointing": "true"}),
    )
    return setup_policy(cfg, "cpu"), cfg


@pytest.mark.parametrize("k,j,alpha", [(0, 9, 0.3), (3, 4, 1.0), (5, 8, 0.0)])
def test_leap_rollout_is_bit_identical_to_plain_rollout(policy_cfg, k, j, alpha):
    policy, cfg = policy_cfg
    with torch.no_grad():  # make the adapter non-trivial so the graph matters
        for p in trainable_parameters(policy.transformer):
            p.add_(0.05 * torch.randn_like(p))
    prompts = ["a red square", "three green circles"]
    cond = policy.encode_prompts(prompts, cfg.model.max_sequence_length)
    sigmas = policy.sigmas(cfg.sampler.num_steps, 32, 32)
    latents, ids = policy.prepare_latents(2, 32, 32, torch.Generator().manual_seed(7))
    velocity = policy.velocity_fn(cond, ids, cfg.sampler.guidance_scale)
    plain = rollout(velocity, latents, sigmas, keep_trajectory=True)
    leap = rollout_with_leaps(velocity, latents, sigmas, k, j, alpha, keep_trajectory=True)
    for i, (a, b) in enumerate(zip(plain, leap.trajectory, strict=True)):
        assert torch.equal(a, b), f"latent {i} differs by {(a - b).abs().max():.3e} from the no-grad rollout"
    assert torch.equal(leap.x0.detach(), plain[-1]), "x_0 fed to the reward must be the real rollout latent"
    leap.x0.sum().backward()
    grads = [p.grad for p in trainable_parameters(policy.transformer)]
    assert any(g is not None and g.abs().sum() > 0 for g in grads), "no gradient reached the LoRA weights"


def test_lora_round_trip_through_fresh_flux_pipeline(policy_cfg, tiny_flux_dir, tmp_path):
    from diffusers import FluxPipeline

    policy, cfg = policy_cfg
    with torch.no_grad():
        for p in trainable_parameters(policy.transformer):
            p.add_(0.2 * torch.randn_like(p))
    prompts = ["a blue circle", "a yellow triangle above a red square"]
    kwargs = dict(num_inference_steps=6, height=32, width=32, guidance_scale=3.5, max_sequence_length=16)
    ours = policy.generate(prompts, num_steps=6, height=32, width=32, guidance_scale=3.5,
                           generator=torch.Generator().manual_seed(5), max_sequence_length=16)  # fmt: skip
    save_trained_weights(policy, cfg, tmp_path / "lora")
    fresh = FluxPipeline.from_pretrained(str(tiny_flux_dir))
    base = fresh(prompts, generator=torch.Generator().manual_seed(5), output_type="pt", **kwargs).images
    fresh.load_lora_weights(str(tmp_path / "lora"))
    loaded = fresh(prompts, generator=torch.Generator().manual_seed(5), output_type="pt", **kwargs).images
    diff = (loaded - ours).abs().max().item()
    assert diff < 1e-5, f"FluxPipeline with the saved LoRA differs from our samples by {diff:.2e}"
    assert (base - ours).abs().max() > 1e-3, (
        "the LoRA should change the samples (else the test proves nothing)"
    )


class FlakyReward:
    """A real colour reward that returns NaN on chosen calls."""

    def __init__(self, bad_calls):
        from leapalign.rewards.simple import ColorMatch

        self.inner, self.bad_calls, self.calls = ColorMatch(), set(bad_calls), 0

    def __call__(self, images, prompts):
        self.calls += 1
        rewards = self.inner(images, prompts)
        return rewards * float("nan") if self.calls in self.bad_calls else rewards


def test_nan_reward_skips_step_and_leaves_weights_untouched(tiny_flux_dir, tmp_path, caplog):
    cfg = load_config(TINY_CONFIG, tiny_overrides(tiny_flux_dir, tmp_path / "run", **{"train.iterations": 3}))

    def checkpoint_every_step(end):
        end.save(tmp_path / f"step{end.step}.pt")

    with caplog.at_level(logging.WARNING, logger="leapalign"):
        result = train(
            # calls 1-2 measure the reward's FLOPs (leapalign.costs); calls 3, 4, 5 are the three updates
            cfg,
            reward_fn=FlakyReward(bad_calls={4}),
            on_step_end=checkpoint_every_step,
            progress=False,
        )
    skipped = [m["skipped"] for m in result.history]
    assert skipped == [0.0, 1.0, 0.0], f"step 2 (NaN reward) should be skipped, got {skipped}"
    assert any("step 2 skipped" in r.message and "non-finite" in r.message for r in caplog.records), (
        "the skip must be reported with its reason"
    )
    after_1, after_2, after_3 = (torch.load(tmp_path / f"step{i}.pt")["params"] for i in (1, 2, 3))
    assert all(torch.equal(a, b) for a, b in zip(after_1, after_2, strict=True)), (
        "weights changed on a skipped step"
    )
    assert any(not torch.equal(a, b) for a, b in zip(after_2, after_3, strict=True)), (
        "step 3 should update weights"
    )
