"""Rewards: anything that maps images [B, 3, H, W] in [0, 1] and prompts to rewards [B].

Importing this package imports torch only; a reward's module (and transformers) loads when
build_reward first asks for it by name (base.REWARD_PATHS).
"""

from leapalign.rewards.base import (
    REWARD_PATHS,
    REWARDS,
    RewardError,
    RewardFn,
    available_rewards,
    build_reward,
    check_rewards,
    register_reward,
)

__all__ = [
    "REWARDS",
    "REWARD_PATHS",
    "RewardError",
    "RewardFn",
    "available_rewards",
    "build_reward",
    "check_rewards",
    "register_reward",
]
