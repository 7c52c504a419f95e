"""What a reward config serves, in plain Python (no Ray): the deployments it needs and their checks.

    ServingSpec      one reward model as a Ray Serve deployment: what it builds and how it is served; its
                     hash names the application (leapalign-reward-<name>-<hash>)
    serving_plan     a reward config -> its deployments (one, or one per weighted_sum component)
    check_reward     the preflight's reward check: a served reward's names and options resolve (no weights
                     loaded), a reward built in process is built once, as the run will build it

leapalign.distributed.reward_service deploys and calls what is planned here.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from leapalign.config import RewardConfig
from leapalign.numerics import process_env
from leapalign.rewards.base import REWARD_PATHS, REWARDS, check_options, resolve_reward
from leapalign.rewards.configured import build_configured_reward

if TYPE_CHECKING:
    from leapalign.config import Config

AUTO_APP_PREFIX = "leapalign-reward-"  # applications named from their spec; any other name is the user's


@dataclass(frozen=True)
class ServingSpec:
    """One reward model as a deployment: what it builds and how it is served. Its hash names the app."""

    reward: str  # registered name or "pkg.module:Factory"
    options: dict[str, Any]  # the factory's keyword arguments
    replicas: int
    max_replicas: int  # > replicas: autoscaling
    cpus_per_replica: float
    gpus_per_replica: float
    max_batch: int  # images per batched forward
    batch_wait_ms: float
    runtime_env: dict[str, Any]

    @classmethod
    def from_config(cls, reward_cfg: RewardConfig, name: str, options: dict, **overrides: Any) -> ServingSpec:
        fields = {key: getattr(reward_cfg, key) for key in RewardConfig.SERVING_KEYS if key != "app"}
        return cls(reward=name, options=dict(options), **{**fields, **overrides})

    @property
    def version(self) -> str:
        """Hash of everything that changes what a replica computes or holds."""
        blob = json.dumps(asdict(self), sort_keys=True, default=str).encode()
        return hashlib.sha1(blob).hexdigest()[:10]

    @property
    def auto_app(self) -> str:
        slug = re.sub(r"[^A-Za-z0-9_.]+", "_", self.reward.rsplit(":", 1)[-1].rsplit(".", 1)[-1])[:40]
        return f"{AUTO_APP_PREFIX}{slug}-{self.version}"

    @property
    def torch_threads(self) -> int:
        return max(1, int(self.cpus_per_replica))


@dataclass(frozen=True)
class ServedPart:
    label: str | None  # weighted_sum component label; None for a single reward
    weight: float
    spec: ServingSpec
    app: str | None  # the configured application; None = the spec's auto name


def serving_plan(reward_cfg: RewardConfig, cpu_isa: str = "native") -> list[ServedPart]:
    """The deployments a reward config needs: one, or one per weighted_sum component.

    cpu_isa (train.cpu_isa): the replicas' kernels are pinned like the workers' (their runtime_env), so a
    served reward gives the same numbers on every CPU; it is part of the spec, hence of the app's name. The
    replicas get the driver's OpenMP thread settings, as the workers do (leapalign.numerics.THREAD_KEYS)."""
    pins = process_env(cpu_isa)

    def pinned(spec: ServingSpec) -> ServingSpec:
        if not pins:
            return spec
        runtime_env = dict(spec.runtime_env)
        runtime_env["env_vars"] = {**pins, **runtime_env.get("env_vars", {})}
        return replace(spec, runtime_env=runtime_env)

    if reward_cfg.name != RewardConfig.WEIGHTED_SUM:
        spec = ServingSpec.from_config(reward_cfg, reward_cfg.name, reward_cfg.options)
        return [ServedPart(None, 1.0, pinned(spec), reward_cfg.app)]
    parts = []
    for label, component in reward_cfg.components().items():
        overrides = {k: v for k, v in component.items() if k in RewardConfig.SERVING_KEYS and k != "app"}
        spec = ServingSpec.from_config(reward_cfg, component["name"], component["options"], **overrides)
        parts.append(ServedPart(label, component["weight"], pinned(spec), component.get("app")))
    return parts


def serves_reward(cfg: Config) -> bool:
    """The Ray path serves the reward unless reward.serve=false; ray.enabled=false never does."""
    return cfg.ray.enabled and cfg.reward.serve


def check_reward(cfg: Config) -> None:
    """Before any work: a served reward's names and options resolve (no weights loaded in the driver);
    a reward built in each worker is built here once, as the workers will."""
    if not serves_reward(cfg):
        build_configured_reward(cfg.reward)
        return
    for part in serving_plan(cfg.reward, cfg.train.cpu_isa):
        check_served_reward(part.spec)


def check_served_reward(spec: ServingSpec) -> None:
    """An unknown name fails at once; a known one's options must fit its factory. A reward whose module
    needs packages only the replicas' runtime_env installs is left for the replica to check."""
    if spec.reward not in REWARD_PATHS and spec.reward not in REWARDS and ":" not in spec.reward:
        resolve_reward(spec.reward)  # raises ValueError naming the choices
    try:
        factory = resolve_reward(spec.reward)
    except ValueError:
        if spec.runtime_env:
            return
        raise
    check_options(spec.reward, factory, spec.options)
