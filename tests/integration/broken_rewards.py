"""A deliberately broken reward for test_reward_actor.py, registered only where this module is imported.

The reward actors under test import it in their own process (launch_reward_actor(setup_modules=...)),
so neither the test process's registry nor any real run's ever holds "test_broken". A NaN reward
must be stopped where it is produced (the actor) and reported where it matters (the trainer).
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
