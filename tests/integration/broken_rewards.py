"""Deliberately broken rewards for test_reward_serving.py, served by their plugin paths.

The replica under test builds it as "tests.integration.broken_rewards:BrokenReward" (a plugin path, looked
up lazily like any registered name), so no real run's registry ever holds it. A NaN reward must be stopped
where it is produced (the replica) and reported where it matters (the trainer).
"""

from __future__ import annotations

import os
import time
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


class HoldOnce:
    """ColorMatch, except that once the test has armed it (created `marker` + ".armed"), the next call in
    any replica claims `marker` (created exclusively), writes its replica id there and holds its request
    until the replica is killed (at most `hold_s`): a request certainly in flight on a known replica, for
    the replica-failure test. Every other call is plain ColorMatch."""

    def __init__(self, marker: str, hold_s: float = 120.0) -> None:
        self.color_match = ColorMatch()
        self.marker, self.hold_s = marker, hold_s

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        if os.path.exists(self.marker + ".armed"):
            try:
                fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass  # another call holds (or held) its request
            else:
                from ray import serve

                os.write(fd, serve.get_replica_context().replica_id.unique_id.encode())
                os.close(fd)
                deadline = time.monotonic() + self.hold_s
                while time.monotonic() < deadline:  # killed long before, unless the test failed to
                    time.sleep(0.05)
        return self.color_match(images, prompts)
