"""The run's reward built in this process: inputs and outputs checked, and weighted sums of rewards.

    reward: {name: clip_score, options: {path: assets/mini-scorer}}      # one registered reward
    reward:                                                             # DanceGRPO's HPS 0.7 + CLIP 1.4
      name: weighted_sum
      options:
        hps: {name: hpsv2.1, weight: 0.7, options: {path: /models/hpsv2.1}}
        clip: {name: clip_score, weight: 1.4}

A weighted sum r = sum_i w_i r_i is a reward like any other (registered as "weighted_sum"), so the trainer,
evaluation and `leapalign eval` use it unchanged. It keeps each component's values from its last call
(`last_components`: the trainer logs their means as reward/<label>) and gives them on request
(`score_components`: a GRPO variant that normalises advantages per component, as MixGRPO does, needs
them). Served components (leapalign.distributed.reward_service) plug in the same way; the sum starts
every component's request before it waits on any, so the reward models run at the same time.

Never a silent wrong reward: images that are not [B, 3, H, W] floats or do not pair with the prompts are
a caller's bug (ValueError, the run stops); content that a model can produce (NaN pixels, pixels outside
[0, 1], an empty prompt, a NaN reward) raises RewardError, which makes the trainer skip the step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from leapalign.config import RewardConfig
from leapalign.rewards.base import RewardError, RewardFn, build_reward, check_rewards


def check_reward_inputs(images: Tensor, prompts: Sequence[str], source: str) -> None:
    """ValueError for a malformed call, RewardError for content no reward should score (one CPU-GPU sync)."""
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{source}: images must be a tensor [B, 3, H, W], got {got}")
    if not images.is_floating_point():
        raise ValueError(f"{source}: images must be floating point in [0, 1], got {images.dtype}")
    if len(prompts) != images.shape[0] or images.shape[0] == 0:
        raise ValueError(
            f"{source}: got {images.shape[0]} images and {len(prompts)} prompts; they must pair up (B >= 1)"
        )
    empty = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p.strip()]
    if empty:
        raise RewardError(f"{source}: empty prompt at batch index {empty}; a reward of no text means nothing")
    low, high = torch.stack(torch.aminmax(images.detach())).tolist()  # one sync; NaN anywhere makes both NaN
    if not (low >= 0.0 and high <= 1.0):  # also true for NaN
        per_image = images.detach().flatten(1)
        bad = (~torch.isfinite(per_image) | (per_image < 0) | (per_image > 1)).any(dim=1)
        raise RewardError(
            f"{source}: images must lie in [0, 1] and be finite; batch index {bad.nonzero().flatten().tolist()} "
            f"do not (min {low:.4g}, max {high:.4g})"
        )


def wire_dtype(dtype: torch.dtype) -> torch.dtype:
    """What a reward computes in: float64 stays float64, everything else (bf16 pixels too) is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rewards_and_gradients(
    reward: RewardFn, pixels: Tensor, prompts: list[str], source: str
) -> tuple[Tensor, Tensor]:
    """r [B] and grad [B, 3, H, W] with grad[b] = d r[b] / d pixels[b], from one backward of r.sum() (exact
    because r[b] depends on image b only). The same function runs in a Serve replica and in process.
    Shape errors raise RewardError; finiteness is the caller's to check (a replica checks per request)."""
    pixels = pixels.detach().requires_grad_(True)
    with torch.enable_grad():
        rewards = reward(pixels, prompts)  # [B]
        if not isinstance(rewards, Tensor) or rewards.shape != (len(prompts),):
            check_rewards(rewards, len(prompts), source=source)
        grads = None
        if rewards.requires_grad:
            (grads,) = torch.autograd.grad(rewards.sum(), pixels, allow_unused=True)
    if grads is None:  # a reward that ignores the pixels
        grads = torch.zeros_like(pixels)
    return rewards.detach(), grads


def check_gradients(grads: Tensor, source: str) -> None:
    """grad [B, 3, H, W] finite, or a RewardError naming the images whose gradient is not."""
    finite = torch.isfinite(grads.flatten(1)).all(dim=1)  # [B]
    if not bool(finite.all()):
        raise RewardError(
            f"{source} gave a non-finite gradient at batch index {(~finite).nonzero().flatten().tolist()}"
        )


class PixelGradients(torch.autograd.Function):
    """rewards [B] whose backward is the exact chain rule through per-image reward gradients:
    d loss / d image[b] = (d loss / d r[b]) * grad[b]. The reward's own graph is gone by then."""

    @staticmethod
    def forward(ctx, images: Tensor, rewards: Tensor, grad_images: Tensor) -> Tensor:
        ctx.save_for_backward(grad_images)
        ctx.images_dtype = images.dtype
        return rewards.clone()

    @staticmethod
    def backward(ctx, grad_rewards: Tensor):
        (grad_images,) = ctx.saved_tensors  # [B, 3, H, W] = d r[b] / d image[b]
        grad = grad_rewards.to(grad_images.dtype)[:, None, None, None] * grad_images
        return grad.to(ctx.images_dtype), None, None


class CheckedReward:
    """A reward built in process, with its inputs and outputs checked on every call.

    Gradients take the route a served reward's take (rewards_and_gradients, then PixelGradients), so a
    run's numbers do not depend on where its reward runs: the same values bit for bit, and the same
    gradients bit for bit when both sides use the same torch threads. (Autograd through the reward would
    seed its backward with d loss / d r instead of multiplying by it after: equal up to rounding, which
    200 chaotic training steps amplify into a different run.)
    """

    def __init__(self, reward: RewardFn, source: str):
        if isinstance(reward, torch.nn.Module):  # rewards are frozen: no weight gradients, no dropout
            reward.eval().requires_grad_(False)
        self.reward, self.source = reward, source

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """images [B, 3, H, W] in [0, 1], B prompts -> rewards [B] (a graph to the images when they need one)."""
        check_reward_inputs(images, prompts, self.source)
        pixels = images.detach().to(wire_dtype(images.dtype))
        if not (torch.is_grad_enabled() and images.requires_grad):
            with torch.no_grad():
                rewards = self.reward(pixels, list(prompts))  # [B]
            check_rewards(rewards, len(prompts), source=self.source)
            return rewards.to(images.dtype)
        rewards, grads = rewards_and_gradients(self.reward, pixels, list(prompts), self.source)
        check_rewards(rewards, len(prompts), source=self.source)
        check_gradients(grads, self.source)
        return PixelGradients.apply(images, rewards.to(images.dtype), grads)

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Values only (GRPO, evaluation)."""
        with torch.no_grad():
            return self(images, prompts)

    def flops(self, images: Tensor, prompts: Sequence[str]) -> tuple[float, float]:
        """(forward, backward) FLOPs per image (leapalign.costs)."""
        from leapalign.costs import reward_flops

        return reward_flops(self.reward, images.detach().to(wire_dtype(images.dtype)), list(prompts))


class WeightedSum:
    """r = sum_i w_i r_i over labelled rewards; `last_components` holds the last call's r_i (detached)."""

    def __init__(self, **components: Any):
        """components: reward.options of reward.name=weighted_sum (RewardConfig.parse_components)."""
        specs = RewardConfig.parse_components(components)
        self.components: dict[str, tuple[float, RewardFn]] = {
            label: (
                spec["weight"],
                CheckedReward(
                    build_reward(spec["name"], spec["options"]), f"reward {label!r} ({spec['name']})"
                ),
            )
            for label, spec in specs.items()
        }
        self.last_components: dict[str, Tensor] = {}

    @classmethod
    def of(cls, components: dict[str, tuple[float, RewardFn]]) -> WeightedSum:
        """A sum of rewards built elsewhere (served ones): label -> (weight, reward)."""
        summed = cls.__new__(cls)
        summed.components, summed.last_components = dict(components), {}
        return summed

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """images [B, 3, H, W] in [0, 1] -> sum_i w_i r_i [B]; gradients flow through every component."""
        return self._combine(self._evaluate(images, prompts, values_only=False))

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Values only, no graph."""
        with torch.no_grad():
            return self._combine(self._evaluate(images, prompts, values_only=True))

    def flops(self, images: Tensor, prompts: Sequence[str]) -> tuple[float, float]:
        """(forward, backward) FLOPs per image: every component's (each measures its own model)."""
        from leapalign.costs import reward_flops

        costs = [reward_flops(reward, images, list(prompts)) for _, reward in self.components.values()]
        return sum(c[0] for c in costs), sum(c[1] for c in costs)

    def score_components(self, images: Tensor, prompts: Sequence[str]) -> dict[str, Tensor]:
        """label -> r_i [B], values only: for advantages normalised per component."""
        with torch.no_grad():
            values = self._evaluate(images, prompts, values_only=True)
        self.last_components = values
        return dict(values)

    def _evaluate(self, images: Tensor, prompts: Sequence[str], values_only: bool) -> dict[str, Tensor]:
        check_reward_inputs(images, prompts, "reward 'weighted_sum'")
        # Served components send their requests first and are waited on after, so they run at once.
        waits: dict[str, Callable[[], Tensor]] = {}
        for label, (_, reward) in self.components.items():
            start = getattr(reward, "start", None)
            if start is not None:
                waits[label] = start(images, prompts, values_only=values_only)
            else:
                call = getattr(reward, "score", reward) if values_only else reward
                waits[label] = lambda call=call: call(images, list(prompts))
        return {label: wait() for label, wait in waits.items()}

    def _combine(self, values: dict[str, Tensor]) -> Tensor:
        self.last_components = {label: r.detach() for label, r in values.items()}
        total = None
        for label, (weight, _) in self.components.items():  # a fixed order: the same sum every call
            term = weight * values[label]
            total = term if total is None else total + term
        return total


def build_configured_reward(reward_cfg: RewardConfig) -> RewardFn:
    """The reward the config names, built in this process, with checked inputs and outputs."""
    reward = build_reward(reward_cfg.name, reward_cfg.options)
    if isinstance(reward, WeightedSum):  # checks its inputs and each component itself
        return reward
    return CheckedReward(reward, f"reward {reward_cfg.name!r}")
