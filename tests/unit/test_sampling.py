"""Our sampler against diffusers: the sigma grid, and FluxPipeline's own output latents."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from leapalign.models.flux import FluxPolicy
from leapalign.sampling import calculate_shift_mu, flux_sigmas, rollout


@pytest.mark.parametrize("num_steps,seq_len", [(25, 2025), (10, 64), (50, 4096), (1, 256)])
def test_sigmas_match_flow_match_scheduler(num_steps, seq_len):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )  # fmt: skip
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=calculate_shift_mu(seq_len))
    ours = flux_sigmas(num_steps, seq_len)
    assert ours.shape == (num_steps + 1,), f"grid has {ours.shape[0]} entries, expected N + 1"
    assert torch.allclose(ours, scheduler.sigmas, atol=1e-6), (
        f"max diff {(ours - scheduler.sigmas).abs().max()}"
    )
    assert ours[0] == 1.0 and ours[-1] == 0.0, "grid runs from 1 to 0"


def test_rollout_reproduces_flux_pipeline_latents(tiny_flux_dir):
    policy = FluxPolicy.from_pretrained(str(tiny_flux_dir), device="cpu")
    prompts = ["a red square", "two blue circles to the left of a cyan triangle"]
    out = policy.pipe(
        prompts, num_inference_steps=7, height=32, width=48, guidance_scale=3.5,
        generator=torch.Generator().manual_seed(3), max_sequence_length=16, output_type="latent",
    ).images  # fmt: skip
    cond = policy.encode_prompts(prompts, 16)
    latents, image_ids = policy.prepare_latents(2, 32, 48, torch.Generator().manual_seed(3))
    ours = rollout(policy.velocity_fn(cond, image_ids, 3.5), latents, policy.sigmas(7, 32, 48))
    assert ours.shape == out.shape, f"shape {ours.shape} != FluxPipeline {out.shape}"
    diff = (ours - out).abs().max().item()
    assert diff < 1e-5, f"our rollout differs from FluxPipeline by {diff:.2e}"
    assert out.abs().mean() > 0.1, "latents should not be trivially zero"
