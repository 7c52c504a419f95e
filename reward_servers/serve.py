"""Start, inspect or stop a served reward on a running Ray cluster.

    ray start --head                                     # once (or a cluster from cluster.yaml)
    python -m reward_servers.serve clip_score            # detached actor "clip_score", namespace leapalign
    python -m reward_servers.serve clip_score num_gpus=0.25 options.path=/models/pickscore actor_name=pick
    python -m reward_servers.serve clip_score --status   # what it serves, its call/batch counters
    python -m reward_servers.serve clip_score --stop

key=value overrides use the keys of the module's DEFAULTS (values are YAML; options.KEY sets one reward
option). Run from the repository root. The actor is detached: it outlives this command and serves
every run whose config says reward.actor=<actor_name>, until --stop or `ray stop`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

import ray

from leapalign.config import ConfigError, parse_overrides
from reward_servers import SERVERS


def resolve_settings(server: str, overrides: list[str]) -> dict:
    """The module's DEFAULTS <- key=value overrides; options merge key by key. Unknown keys are errors."""
    if server not in SERVERS:
        raise ConfigError(f"unknown reward server {server!r}: choose one of {', '.join(SERVERS)}")
    defaults = importlib.import_module(f"reward_servers.{server}").DEFAULTS
    settings = {**defaults, "detached": True}
    for key, value in parse_overrides(overrides).items():
        if key not in settings:
            raise ConfigError(
                f"unknown key {key!r} for {server}: valid keys are {', '.join(sorted(settings))}"
            )
        if key == "options":
            value = {**settings["options"], **value}
        settings[key] = value
    return settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m reward_servers.serve", description=__doc__.split("\n")[0]
    )
    parser.add_argument("server", help=f"one of {', '.join(SERVERS)}")
    parser.add_argument("overrides", nargs="*", help="key=value (keys of the module's DEFAULTS)")
    parser.add_argument(
        "--address", default="auto", help="Ray cluster address (default: auto, the running one)"
    )
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--status", action="store_true", help="print what the actor serves and its counters")
    action.add_argument("--stop", action="store_true", help="kill the actor")
    args = parser.parse_args(argv)
    try:
        settings = resolve_settings(args.server, args.overrides)
    except ConfigError as err:
        parser.error(str(err))
    name, namespace = settings["actor_name"], settings["namespace"]
    ray.init(address=args.address, namespace=namespace)
    if args.status or args.stop:
        try:
            actor = ray.get_actor(name, namespace=namespace)
        except ValueError:
            print(f"no reward actor named {name!r} in namespace {namespace!r}", file=sys.stderr)
            return 1
        if args.stop:
            ray.kill(actor, no_restart=True)
            print(f"stopped reward actor {name!r} (namespace {namespace!r})")
        else:
            served = ray.get(actor.describe.remote(), timeout=60)
            print(json.dumps({**served, **ray.get(actor.stats.remote(), timeout=60)}, indent=2))
        return 0
    server = importlib.import_module(f"reward_servers.{args.server}")
    server.serve(**settings)
    print(
        f"reward actor {name!r} (namespace {namespace!r}) serves {settings['reward_name']!r}; "
        f"use it with reward.actor={name} reward.name={settings['reward_name']}"
        + (f" reward.namespace={namespace}" if namespace != "leapalign" else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
