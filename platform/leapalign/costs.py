"""What one image costs in each model of an update, measured once per run on the run's own shapes.

One image goes through the transformer (forward, then the backward that reaches the trained weights and
the input), the VAE decoder (forward, then the pixels' gradient with respect to the latents) and the reward
(forward, then its gradient with respect to the pixels) under torch.utils.flop_counter; nothing is counted
by the run's meter and no gradient is left on the weights. A served reward measures itself in its replica
(its FLOPs run there). Costs scale linearly with the batch for these models, so the meter multiplies them
by the images it counted (leapalign.compute).
"""

from __future__ import annotations

import torch

from leapalign.compute import UnitCosts, count_flops
from leapalign.config import Config
from leapalign.models.flux import FluxPolicy
from leapalign.rewards.base import RewardFn


def reward_flops(reward: RewardFn, pixels: torch.Tensor, prompts: list[str]) -> tuple[float, float]:
    """(forward, backward) FLOPs per image of a reward on these images; the backward is d r / d pixels."""
    batch = len(prompts)
    measure = getattr(reward, "flops", None)
    if measure is not None:  # served rewards and weighted sums measure their own models
        forward, backward = measure(pixels, prompts)
        return forward, backward
    pixels = pixels.detach().float()
    with torch.no_grad():
        forward = count_flops(lambda: reward(pixels, prompts))
    with torch.enable_grad():
        leaf = pixels.clone().requires_grad_(True)
        rewards = reward(leaf, prompts)
        backward = 0.0
        if isinstance(rewards, torch.Tensor) and rewards.requires_grad:
            backward = count_flops(lambda: torch.autograd.grad(rewards.sum(), leaf, allow_unused=True))
    return forward / batch, backward / batch


def measure_unit_costs(policy: FluxPolicy, reward_fn: RewardFn, cfg: Config, prompt: str) -> UnitCosts:
    """FLOPs per image of each model's forward and backward at the training resolution (one image)."""
    meter, policy.meter = policy.meter, None  # the measurement is not the run's compute
    try:
        height, width = cfg.sampler.height, cfg.sampler.width
        cond = policy.encode_prompts([prompt], cfg.model.max_sequence_length)
        latents, image_ids = policy.prepare_latents(1, height, width, torch.Generator().manual_seed(0))
        sigmas = policy.sigmas(cfg.sampler.num_steps, height, width)
        velocity = policy.velocity_fn(cond, image_ids, cfg.sampler.guidance_scale)
        trained = [p for p in policy.transformer.parameters() if p.requires_grad]
        with torch.enable_grad():
            x = latents.detach().requires_grad_(True)  # LeapAlign's second call also needs d v / d x
            held = {}
            transformer_forward = count_flops(lambda: held.update(v=velocity(x, sigmas[len(sigmas) // 2])))
            transformer_backward = count_flops(
                lambda: torch.autograd.grad(held["v"].sum(), [x, *trained], allow_unused=True)
            )
            z = latents.detach().requires_grad_(True)
            decoder_forward = count_flops(lambda: held.update(images=policy.decode(z, height, width)))
            decoder_backward = count_flops(lambda: torch.autograd.grad(held["images"].sum(), z))
        reward_forward, reward_backward = reward_flops(reward_fn, held["images"].detach(), [prompt])
        return UnitCosts(
            transformer_forward=transformer_forward,
            transformer_backward=transformer_backward,
            decoder_forward=decoder_forward,
            decoder_backward=decoder_backward,
            reward_forward=reward_forward,
            reward_backward=reward_backward,
        )
    finally:
        policy.meter = meter
