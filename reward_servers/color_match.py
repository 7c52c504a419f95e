"""Serve ColorMatch (leapalign.rewards.simple): a cheap differentiable reward for demos and tests.

python -m reward_servers.serve color_match            # detached actor "color_match"
leapalign train ... reward.name=color_match reward.actor=color_match
"""

from __future__ import annotations

from typing import Any

from leapalign.distributed.reward_actor import DEFAULT_NAMESPACE, launch_reward_actor

DEFAULTS: dict[str, Any] = {
    "actor_name": "color_match",  # what reward.actor names in a run config
    "reward_name": "color_match",  # the registered reward the actor builds
    "options": {},  # ColorMatch(color=None, from_prompt=True, default="red"): colour word from each prompt
    "namespace": DEFAULT_NAMESPACE,
    "num_cpus": 1.0,  # pure tensor arithmetic: one core is plenty
    "num_gpus": 0.0,  # never worth a GPU
    "runtime_env": None,  # needs nothing beyond leapalign
    "max_batch": 64,  # images per forward pass
    "max_wait_ms": 2.0,  # a forward pass costs less than waiting for company
    "max_restarts": 3,
}


def serve(**overrides: Any):
    """Start (or find) the actor; returns its handle. Keep the handle unless detached=True."""
    return launch_reward_actor(**{**DEFAULTS, **overrides})
