"""A deliberately broken reward for test_reward_serving.py, served by its plugin path.

The replica under test builds it as "tests.integration.broken_rewards:BrokenReward" (a plugin path, looked
up lazily like any registered name), so no real run's registry ever holds it. A NaN reward must be stopped
where it is produced (the replica) and reported where it matters (the trainer).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from leapalign.rewards.base import register_reward
from leapalign.rewards.simple import ColorMatch


@register_reward("test_broken")
class BrokenReward:
    """ColorMatch, except: NaN for prompts containing "poison"; shape [B, 1] if any prompt says "wrong-shape"."""

    def __init__(self) -> None:
        self.color_match = ColorMatch()

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        rewards = self.color_match(images, prompts)  # [B]
        poisoned = torch.tensor(["poison" in p for p in prompts], device=images.device)
        rewards = torch.where(poisoned, torch.full_like(rewards, float("nan")), rewards)
        if any("wrong-shape" in p for p in prompts):
            return rewards[:, None]  # [B, 1]
        return rewards
