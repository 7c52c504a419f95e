"""Reward models served as Ray actors: one module per served reward, each with its defaults and `serve()`.

A module here states how one reward is served: the registered reward it builds (leapalign.rewards),
the actor name trainers look up (reward.actor in the run config), resources, and the runtime_env the
scorer needs on a cluster. `python -m reward_servers.serve NAME` starts one as a detached actor.

Not an installed package: run from the repository root (the directory holding reward_servers/), as Ray
jobs and the tests do.
"""

SERVERS = ("color_match", "clip_score")  # module names under reward_servers/
