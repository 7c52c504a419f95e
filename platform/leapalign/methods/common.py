"""What every method's micro-step does the same way: random streams, the batch's conditioning and noise,
decoding and scoring the final images, the hinge loss.

A direct-gradient method is a function

    loss_fn(policy, prompts, reward_fn, cfg, sigmas, rng) -> (loss, metrics)

that builds the graph of one micro-batch and returns a scalar loss; the training recipe runs backward
(after every data-parallel rank has agreed the rewards were valid). `rng` holds the method's random
streams; every draw a method makes comes from them, so one seed gives one run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from leapalign.compute import backward_nfe
from leapalign.config import Config
from leapalign.models.flux import FluxPolicy
from leapalign.rewards.base import RewardFn, check_rewards
from leapalign.sampling import VelocityFn
from leapalign.streams import stream


@dataclass
class StepRandomness:
    """A method's random streams (leapalign.streams): changing one choice (e.g. the pair law) keeps the
    others' draws, and no stream of one seed shares bits with any stream of another.

    noise: initial latents (and any re-noising); steps: which steps a method trains (leap pairs, ReFL's
    t, DRTune's offsets, GRPO's timestep subsets and PPO shuffles, NFT / AWM timestep plans and shuffles);
    sde: GRPO's SDE noise, NFT / AWM forward-process noise.

    Global streams: every data-parallel rank holds the same streams (same seed) and draws for the GLOBAL
    batch (world_size x its own); `local` keeps this rank's rows. Step choices (leap pair, t) are one draw
    for the whole global batch. So 2 workers with batch B draw exactly what 1 worker with batch 2B draws,
    and a checkpoint's streams fit any number of workers.
    """

    noise: torch.Generator
    steps: torch.Generator
    sde: torch.Generator
    rank: int = 0
    world_size: int = 1

    @classmethod
    def seeded(cls, seed: int, rank: int = 0, world_size: int = 1) -> StepRandomness:
        return cls(stream(seed, "noise"), stream(seed, "steps"), stream(seed, "sde"), rank, world_size)

    def local(self, global_batch: Tensor) -> Tensor:
        """This rank's rows of a tensor drawn for the global batch: [world_size * B, ...] -> [B, ...]."""
        size = global_batch.shape[0] // self.world_size
        return global_batch[self.rank * size : (self.rank + 1) * size]

    def randn_local(self, shape: Sequence[int], generator: torch.Generator) -> Tensor:
        """Standard normal fp32 noise of this rank's `shape` [B, ...], drawn (on CPU) for the global batch."""
        draw = torch.randn((shape[0] * self.world_size, *shape[1:]), generator=generator, dtype=torch.float32)
        return self.local(draw)

    def state_dict(self) -> dict[str, Tensor]:
        return {"noise": self.noise.get_state(), "steps": self.steps.get_state(), "sde": self.sde.get_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.noise.set_state(state["noise"])
        self.steps.set_state(state["steps"])
        self.sde.set_state(state["sde"])


@dataclass
class Batch:
    """One micro-batch ready to roll out: its velocity field and initial noise."""

    velocity: VelocityFn  # v_theta(latents [B, S, C], sigma) for these prompts
    latents: Tensor  # [B, S, C] initial noise, fp32
    image_ids: Tensor  # [S, 3]


def prepare_batch(policy: FluxPolicy, prompts: Sequence[str], cfg: Config, rng: StepRandomness) -> Batch:
    """Frozen text conditioning (no graph) and the initial noise, drawn from rng.noise for the global batch."""
    cond = policy.encode_prompts(list(prompts), cfg.model.max_sequence_length)
    latents, image_ids = policy.prepare_latents(
        len(prompts) * rng.world_size, cfg.sampler.height, cfg.sampler.width, rng.noise
    )
    latents = rng.local(latents)  # [B, S, C] this rank's rows
    return Batch(policy.velocity_fn(cond, image_ids, cfg.sampler.guidance_scale), latents, image_ids)


def decode_and_score(
    policy: FluxPolicy, latents: Tensor, prompts: Sequence[str], reward_fn: RewardFn, cfg: Config
) -> Tensor:
    """Rewards [B] of the decoded latents; gradients flow to the pixels (and on to the latents).

    Raises RewardError (before any backward) when the reward is non-finite or mis-shaped.
    """
    images = policy.decode(latents, cfg.sampler.height, cfg.sampler.width)  # [B, 3, H, W] in [0, 1]
    rewards = reward_fn(images, list(prompts))  # [B]
    if policy.meter is not None:  # the reward's backward (d r / d pixels) runs inside the call above
        policy.meter.count_reward(len(prompts), backward=images.requires_grad and torch.is_grad_enabled())
    check_rewards(rewards, len(prompts), source=f"reward {cfg.reward.name!r}")
    rewards = rewards.float()
    # A weighted sum of rewards (rewards/configured.py) keeps each component's values; they ride on the
    # tensor to reward_metrics, which every method calls with it, and are logged as reward/<label>.
    rewards.reward_components = dict(getattr(reward_fn, "last_components", None) or {})
    return rewards


def hinge_loss(rewards: Tensor, weight: Tensor | None, hinge: float) -> Tensor:
    """L = mean_b sg(w_b) max(0, lambda - r_b) (LeapAlign Eq. 13; w = 1 for the baselines)."""
    per_sample = torch.relu(hinge - rewards)
    if weight is not None:
        per_sample = weight.detach() * per_sample
    return per_sample.mean()


def reward_metrics(rewards: Tensor) -> dict[str, Tensor]:
    """Metric tensors (turned into floats once per step by the recipe: one GPU sync, not one per value)."""
    detached = rewards.detach()
    std = detached.std() if detached.numel() > 1 else torch.zeros((), device=detached.device)
    components = getattr(rewards, "reward_components", {})  # set by decode_and_score for a weighted sum
    return {
        "reward/mean": detached.mean(),
        "reward/std": std,
        **{f"reward/{label}": values.float().mean() for label, values in components.items()},
    }


def direct_update_nfe(cfg: Config, fewest: int, most: int) -> tuple[int, int]:
    """A direct method's cost per image -> per update on one worker: every image of every micro-batch."""
    images = cfg.train.batch_size * cfg.train.grad_accum
    return fewest * images, most * images


def backward_cost(cfg: Config) -> int:
    """Forward-equivalents of one backward through a transformer call under this config."""
    return backward_nfe(cfg.finetune.gradient_checkpointing)
