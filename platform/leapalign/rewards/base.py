"""The reward protocol, a registry of in-process rewards, and the checks every reward output gets.

A RewardFn must be differentiable with respect to the images for the direct-gradient methods
(LeapAlign, ReFL, DRaFT); GRPO only needs values. Rewards are per image: r[b] depends on image b
and prompt b only, which is what lets a remote reward return d r[b] / d image[b] per image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class RewardFn(Protocol):
    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """images [B, 3, H, W] in [0, 1], B prompts -> rewards [B] (higher is better)."""
        ...


REWARDS: dict[str, Callable[..., RewardFn]] = {}


def register_reward(name: str):
    def wrap(factory: Callable[..., RewardFn]) -> Callable[..., RewardFn]:
        REWARDS[name] = factory
        return factory

    return wrap


def build_reward(name: str, options: dict[str, Any] | None = None) -> RewardFn:
    """A reward from the registry by name; its options are the factory's keyword arguments."""
    import leapalign.rewards.clip_score  # noqa: F401
    import leapalign.rewards.simple  # noqa: F401  (registers the built-in rewards)

    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}: choose one of {', '.join(sorted(REWARDS))}")
    try:
        return REWARDS[name](**(options or {}))
    except TypeError as err:
        raise ValueError(f"reward {name!r}: bad reward.options {options!r} ({err})") from None


class RewardError(ValueError):
    """A reward output that must not reach the optimizer (wrong shape, NaN, inf)."""


def check_rewards(rewards: Tensor, batch_size: int, source: str = "reward") -> None:
    """Shape [B] and finite, or a RewardError that says what came back."""
    if not isinstance(rewards, Tensor):
        raise RewardError(
            f"{source} returned {type(rewards).__name__}, expected a tensor of shape [{batch_size}]"
        )
    if rewards.shape != (batch_size,):
        raise RewardError(
            f"{source} returned shape {tuple(rewards.shape)}, expected [{batch_size}] (one per image)"
        )
    bad = ~torch.isfinite(rewards.detach())
    if bad.any():
        raise RewardError(
            f"{source} returned non-finite values at batch index {bad.nonzero().flatten().tolist()}: "
            f"{rewards.detach().tolist()}"
        )
