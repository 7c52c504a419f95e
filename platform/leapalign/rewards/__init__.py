"""Rewards: anything that maps images [B, 3, H, W] in [0, 1] and prompts to rewards [B]."""

from leapalign.rewards.base import REWARDS, RewardFn, build_reward, check_rewards, register_reward

__all__ = ["REWARDS", "RewardFn", "build_reward", "check_rewards", "register_reward"]
