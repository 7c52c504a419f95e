"""Serve ClipScore (leapalign.rewards.clip_score): a frozen CLIPModel, the code path of PickScore / HPS.

    python -m reward_servers.serve clip_score                                   # the shipped mini-scorer
    python -m reward_servers.serve clip_score options.path=yuvalkirstain/PickScore_v1 num_gpus=0.25
    leapalign train ... reward.name=clip_score reward.actor=clip_score

One actor per cluster holds the scorer's weights once, instead of once per training worker, and
batches the workers' requests into one forward (+ backward) pass.

Scorers whose code is not transformers' CLIPModel (HPSv2 is an open_clip ViT-H-14) need open-clip-torch
and timm, which pull a CUDA build of torch into any environment that installs them. Give them to the
actor alone through its runtime_env, never to the trainers, e.g. for a reward registered by a module
`my_rewards.hpsv2` shipped with the job's working_dir:

    serve(actor_name="hpsv2", reward_name="hpsv2", setup_modules=("my_rewards.hpsv2",), num_gpus=0.25,
          runtime_env={"pip": ["open-clip-torch==2.24.0", "timm==1.0.9"],
                       "env_vars": {"HF_HOME": "/mnt/models/hf"}})
"""

from __future__ import annotations

from typing import Any

from leapalign.distributed.reward_actor import DEFAULT_NAMESPACE, launch_reward_actor

DEFAULTS: dict[str, Any] = {
    "actor_name": "clip_score",  # what reward.actor names in a run config
    "reward_name": "clip_score",  # the registered reward the actor builds
    "options": {},  # ClipScore(path=<shipped mini-scorer>, scale=None (logit_scale.exp()), device=None (auto))
    "namespace": DEFAULT_NAMESPACE,
    "num_cpus": 1.0,  # CPU clusters: raise it (the forward pass uses num_cpus threads)
    "num_gpus": 0.0,  # GPU clusters: 0.25 lets four scorers share one GPU (ViT-L/H at batch 32 fits in ~10 GB)
    "runtime_env": None,  # transformers is already in the image; see the docstring for open_clip scorers
    "setup_modules": ("leapalign.rewards.clip_score",),  # registers "clip_score" in the actor's process
    "max_batch": 32,  # images per forward pass (memory of the backward through the ViT)
    "max_wait_ms": 10.0,  # small next to a ViT forward + backward; lets workers' requests meet
    "max_restarts": 3,
}


def serve(**overrides: Any):
    """Start (or find) the actor; returns its handle. Keep the handle unless detached=True."""
    return launch_reward_actor(**{**DEFAULTS, **overrides})
