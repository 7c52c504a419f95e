"""Reward models served on Ray Serve: `python -m reward_servers.serve NAME [key=value ...]`.

Any reward the registry knows (leapalign.rewards.base.REWARD_PATHS) or any plugin given as
"package.module:Factory" is served the same way it is built in process: the replica calls
build_reward(NAME, options). There is no list of servable rewards here; adding a reward to the registry
(one line) makes it servable. The deployment itself is leapalign.distributed.reward_service.RewardModel.

Not an installed package: run from the repository root (the directory holding reward_servers/), as Ray
jobs and the tests do.
"""
