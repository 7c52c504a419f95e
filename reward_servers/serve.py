"""Serve any registered reward on a running Ray cluster with Ray Serve; inspect or stop it.

    ray start --head ...                                          # once (or a cluster from cluster.yaml)
    python -m reward_servers.serve clip_score                     # the shipped mini-scorer, 1 replica
    python -m reward_servers.serve pickscore options.path=/models/pickscore gpus_per_replica=0.25 replicas=4
    python -m reward_servers.serve hpsv2.1 options.path=/models/hpsv2.1 max_replicas=8 --app hps
    python -m reward_servers.serve my_rewards.ocr:OcrScore runtime_env='{pip: [easyocr==1.7.2]}'
    python -m reward_servers.serve clip_score --status            # what it serves, one replica's counters
    python -m reward_servers.serve clip_score --stop

NAME is a registered reward (leapalign.rewards.base.REWARD_PATHS) or a plugin "package.module:Factory",
built in each replica exactly as `build_reward(NAME, options)` builds it in process. key=value overrides
(values are YAML) are the reward.* keys of a run config: options.KEY, replicas, max_replicas (autoscaling),
cpus_per_replica, gpus_per_replica (fractional), max_batch, batch_wait_ms, runtime_env (the replicas' own
environment: scorers that need open-clip-torch/timm get them here, never the trainers).

Without --app the application is named from the reward and these settings, the name `leapalign train`
computes from the same reward.* settings: such a run finds it without being told. With --app NAME, runs
name it with reward.app=NAME. It outlives this command and serves every run until --stop or `ray stop`.
"""

from __future__ import annotations

import argparse
import json
import sys

import ray
from ray import serve

from leapalign.config import ConfigError, RewardConfig, load_config, parse_overrides
from leapalign.distributed.reward_service import deploy_reward
from leapalign.rewards.serving import ServingSpec, check_served_reward

SETTINGS = ("options", *(k for k in RewardConfig.SERVING_KEYS if k != "app"))


def resolve_settings(name: str, overrides: list[str]) -> RewardConfig:
    """reward.* defaults <- key=value overrides, checked like a run config (unknown keys are errors)."""
    unknown = sorted(set(parse_overrides(overrides)) - set(SETTINGS))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(unknown)}: valid keys are {', '.join(SETTINGS)}")
    if name == RewardConfig.WEIGHTED_SUM:
        raise ConfigError(
            "serve each component of a weighted_sum on its own; the sum is taken by the trainer"
        )
    return load_config(None, [f"reward.name={name}", *(f"reward.{item}" for item in overrides)]).reward


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m reward_servers.serve", description=__doc__.split("\n")[0]
    )
    parser.add_argument("reward", help="registered reward name or package.module:Factory")
    parser.add_argument(
        "overrides", nargs="*", help="key=value: options.KEY, replicas, gpus_per_replica, ..."
    )
    parser.add_argument("--app", help="application name (default: named from the reward and its settings)")
    parser.add_argument(
        "--address", default="auto", help="Ray cluster address (default: auto, the running one)"
    )
    action = parser.add_mutually_exclusive_group()
    action.add_argument(
        "--status", action="store_true", help="print what it serves and one replica's counters"
    )
    action.add_argument("--stop", action="store_true", help="delete the application")
    args = parser.parse_args(argv)
    try:
        reward_cfg = resolve_settings(args.reward, args.overrides)
    except ConfigError as err:
        parser.error(str(err))
    spec = ServingSpec.from_config(reward_cfg, reward_cfg.name, reward_cfg.options)
    app = args.app or spec.auto_app
    if not (args.status or args.stop):
        try:
            check_served_reward(spec)  # an unknown name or bad options: before touching the cluster
        except ValueError as err:
            parser.error(str(err))
    ray.init(address=args.address, logging_level="WARNING")
    if args.status or args.stop:
        if app not in serve.status().applications:
            print(f"no Serve application {app!r} on this cluster", file=sys.stderr)
            return 1
        if args.stop:
            serve.delete(app)
            print(f"deleted Serve application {app!r}")
        else:
            handle = serve.get_app_handle(app)
            served = handle.describe.remote().result(timeout_s=60)
            status = serve.status().applications[app]
            replicas = {
                str(getattr(k, "value", k)): v
                for d in status.deployments.values()
                for k, v in d.replica_states.items()
            }
            stats = handle.stats.remote().result(timeout_s=60)
            print(json.dumps({"app": app, "status": str(status.status.value), "replicas": replicas, **served,
                              "one_replica": stats}, indent=2, default=str))  # fmt: skip
        return 0
    try:
        deploy_reward(app, spec)
    except ValueError as err:  # RewardServiceError: it could not build the reward, or found no room
        print(err, file=sys.stderr)
        return 2
    # The keys a run config needs to find this application: its reward, and (for the name computed from
    # them) every serving setting that is not the default.
    defaults = RewardConfig()
    use = [
        f"reward.name={reward_cfg.name}",
        *(f"reward.options.{k}={v}" for k, v in reward_cfg.options.items()),
    ]
    if args.app:
        use.append(f"reward.app={app}")
    else:
        use += [
            f"reward.{k}={getattr(reward_cfg, k)}"
            for k in SETTINGS[1:]
            if getattr(reward_cfg, k) != getattr(defaults, k)
        ]
    print(f"Serve application {app!r} serves reward {reward_cfg.name!r}; train with {' '.join(use)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
