"""The reward protocol, a registry of in-process rewards, and the checks every reward output gets.

A RewardFn must be differentiable with respect to the images for the direct-gradient methods
(LeapAlign, ReFL, DRaFT); GRPO only needs values. Rewards are per image: r[b] depends on image b
and prompt b only, which is what lets a remote reward return d r[b] / d image[b] per image.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class RewardFn(Protocol):
    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """images [B, 3, H, W] in [0, 1], B prompts -> rewards [B] (higher is better)."""
        ...


# The registry: reward name -> "module:attribute" of its factory (a class or function whose keyword
# arguments are reward.options). Imported on first use, so `import leapalign.rewards` costs no
# transformers import and adding a reward is one line here. A bare "module" names a module that
# registers its reward itself with @register_reward(name) when imported.
REWARD_PATHS: dict[str, str] = {
    "color_match": "leapalign.rewards.simple:ColorMatch",
    "brightness": "leapalign.rewards.simple:Brightness",
    "clip_score": "leapalign.rewards.clip_score:ClipScore",
    "pickscore": "leapalign.rewards.clip_score:PickScore",
    "hpsv2.1": "leapalign.rewards.clip_score:HPSv21",
    "aesthetic": "leapalign.rewards.aesthetic:AestheticScore",
    "world_layout": "leapalign.world.layout_reward",
    "weighted_sum": "leapalign.rewards.configured:WeightedSum",  # options: {label: {name, weight, options}}
}
# Factories registered at run time with @register_reward (tests, modules a plugin path imports, and
# the bare-module entries above once imported); they take precedence over REWARD_PATHS.
REWARDS: dict[str, Callable[..., RewardFn]] = {}


def register_reward(name: str):
    """Decorator: make `factory` available as reward.name=`name` in this process."""

    def wrap(factory: Callable[..., RewardFn]) -> Callable[..., RewardFn]:
        REWARDS[name] = factory
        return factory

    return wrap


def available_rewards() -> list[str]:
    """Every name build_reward accepts without a plugin path."""
    return sorted(set(REWARD_PATHS) | set(REWARDS))


def resolve_reward(name: str) -> Callable[..., RewardFn]:
    """The factory of a registered name, or of a plugin given as "package.module:Factory"."""
    if name in REWARDS:
        return REWARDS[name]
    target = REWARD_PATHS.get(name, name if ":" in name else None)
    if target is None:
        raise ValueError(
            f"unknown reward {name!r}: choose one of {', '.join(available_rewards())}, "
            "or name your own as 'package.module:Factory'"
        )
    module_name, _, attribute = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(
            f"reward {name!r} lives in module {module_name!r}, which could not be imported ({err}); "
            "install what it needs or fix the module path"
        ) from err
    if not attribute:
        if name not in REWARDS:
            raise ValueError(
                f"module {module_name!r} was imported but did not register reward {name!r} "
                f"(expected @register_reward({name!r}) in it)"
            )
        return REWARDS[name]
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ValueError(f"reward {name!r}: module {module_name!r} has no callable {attribute!r}")
    return factory


def check_options(name: str, factory: Callable[..., Any], options: dict[str, Any]) -> None:
    """The options must fit the factory's keyword arguments (in process and on Ray Serve: one message)."""
    try:
        inspect.signature(factory).bind(**options)
    except TypeError as err:
        raise ValueError(f"reward {name!r}: bad reward.options {options!r} ({err})") from None
    except ValueError:  # no signature to inspect (a builtin): let the call report it
        pass


def build_reward(name: str, options: dict[str, Any] | None = None) -> RewardFn:
    """A reward by registry name or plugin path; its options are the factory's keyword arguments."""
    factory = resolve_reward(name)
    options = dict(options or {})
    check_options(name, factory, options)
    return factory(**options)


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
