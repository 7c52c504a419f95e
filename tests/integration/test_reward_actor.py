"""Rewards served by Ray actors on a real local cluster (127.0.0.1, 2 CPUs): exact gradients, batching,
restarts, and clear errors. 30-55 s on two busy cores, most of it starting Ray and the actor processes."""

from __future__ import annotations

import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from torch import nn

from leapalign.config import ConfigError, RewardConfig
from leapalign.distributed.reward_actor import (
    ActorReward,
    RewardActorError,
    launch_reward_actor,
    make_reward_fn,
)
from leapalign.rewards import build_reward
from leapalign.rewards.base import RewardError
from tests.conftest import local_ray

REPO = Path(__file__).resolve().parents[2]
NAMESPACE = "leapalign-test"
PROMPTS = ["a red cube", "a blue ball", "green grass", "a yellow sun"]
ACTOR_CPUS = 0.25  # three actors and the driver share the cluster's 2 CPUs


@pytest.fixture(scope="module")
def ray_cluster():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        with local_ray(namespace=NAMESPACE, log_to_driver=False) as context:
            yield context


@pytest.fixture(scope="module")
def color_match_actor(ray_cluster):
    """One shared actor; a generous max_wait_ms so concurrent test requests surely meet in a batch."""
    return launch_reward_actor(
        "color_match", "color_match", namespace=NAMESPACE, num_cpus=ACTOR_CPUS, max_wait_ms=300
    )


class TinyGenerator(nn.Module):
    """z [B, 4] -> images [B, 3, 8, 8] in (0, 1): a stand-in policy with a few float64 weights."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3 * 8 * 8)
        self.conv = nn.Conv2d(3, 3, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.conv(self.linear(z).view(-1, 3, 8, 8)))


def generator_grads(reward_fn, generator: TinyGenerator, z: torch.Tensor) -> tuple[torch.Tensor, list]:
    generator.zero_grad()
    rewards = reward_fn(generator(z), PROMPTS)  # [B]
    weight = torch.arange(1.0, len(PROMPTS) + 1, dtype=torch.float64)  # distinct d loss / d r[b]
    loss = (weight * (1.0 - rewards) ** 2).sum()
    loss.backward()
    return rewards.detach(), [p.grad.clone() for p in generator.parameters()]


def test_gradients_through_actor_equal_in_process(color_match_actor):
    torch.manual_seed(0)
    generator = TinyGenerator().double()
    z = torch.randn(len(PROMPTS), 4, dtype=torch.float64)
    # The run config selects the actor; a pickled copy (as shipped to a Train worker) must work too.
    cfg = RewardConfig(name="color_match", actor="color_match", namespace=NAMESPACE)
    actor_reward = pickle.loads(pickle.dumps(make_reward_fn(cfg)))
    assert isinstance(actor_reward, ActorReward), f"reward.actor set, got {type(actor_reward).__name__}"
    assert not isinstance(make_reward_fn(RewardConfig()), ActorReward), (
        "reward.actor unset must stay in process"
    )

    local_rewards, local_grads = generator_grads(build_reward("color_match"), generator, z)
    remote_rewards, remote_grads = generator_grads(actor_reward, generator, z)

    assert remote_rewards.dtype == torch.float64, (
        f"float64 images must stay float64, got {remote_rewards.dtype}"
    )
    reward_err = (remote_rewards - local_rewards).abs().max().item()
    assert reward_err < 1e-12, f"rewards differ by {reward_err:.3g}"
    scale = max(g.abs().max().item() for g in local_grads)
    assert scale > 1e-3, f"the test needs non-trivial gradients, got max |grad| = {scale:.3g}"
    grad_err = max((a - b).abs().max().item() for a, b in zip(local_grads, remote_grads, strict=True))
    assert grad_err < 1e-8, f"parameter gradients via the actor differ from in-process by {grad_err:.3g}"


def test_concurrent_calls_are_batched(color_match_actor):
    reward_fn = ActorReward("color_match", NAMESPACE)
    before = reward_fn.stats()
    num_callers = 6
    generator = torch.Generator().manual_seed(1)
    images = [torch.rand(2, 3, 16, 16, generator=generator) for _ in range(num_callers)]
    prompts = [[PROMPTS[i % 4], PROMPTS[(i + 1) % 4]] for i in range(num_callers)]
    results: list[torch.Tensor | None] = [None] * num_callers
    start = threading.Barrier(num_callers)

    def caller(i: int) -> None:
        start.wait(timeout=30)
        results[i] = reward_fn.score(images[i], prompts[i])

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(num_callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    after = reward_fn.stats()

    calls, batches = after["calls"] - before["calls"], after["batches"] - before["batches"]
    assert calls == num_callers, f"the actor saw {calls} calls, expected {num_callers}"
    assert batches < calls, f"{calls} concurrent calls took {batches} forward passes: no batching"
    local = build_reward("color_match")
    for i, got in enumerate(results):
        assert got is not None, f"caller {i} got no answer"
        err = (got - local(images[i], prompts[i])).abs().max().item()
        assert err < 1e-6, f"caller {i} got someone else's rewards (max error {err:.3g})"


def test_killed_actor_restarts_and_call_is_retried(ray_cluster):
    # A slow batch window keeps a request inside the actor long enough to kill the actor under it.
    actor = launch_reward_actor(
        "restart_test",
        "color_match",
        namespace=NAMESPACE,
        num_cpus=ACTOR_CPUS,
        max_wait_ms=1500,
        max_restarts=3,
    )
    try:
        reward_fn = ActorReward("restart_test", NAMESPACE, backoff_s=0.2, max_wait_s=60)
        images = torch.rand(4, 3, 8, 8, dtype=torch.float64, requires_grad=True)
        expected = build_reward("color_match")(images.detach(), PROMPTS)
        first = reward_fn(images, PROMPTS)
        pid_before = reward_fn.stats()["pid"]

        result: dict[str, torch.Tensor] = {}
        worker = threading.Thread(target=lambda: result.update(rewards=reward_fn(images, PROMPTS)))
        worker.start()
        deadline = time.monotonic() + 30
        while reward_fn.stats()["calls"] < 2:  # the second request is inside the actor now
            assert time.monotonic() < deadline, "the in-flight request never reached the actor"
            time.sleep(0.05)
        ray.kill(actor, no_restart=False)
        worker.join(timeout=90)

        assert "rewards" in result, "the call in flight during the kill did not succeed after retrying"
        assert reward_fn.retries >= 1, f"expected at least one retry, got {reward_fn.retries}"
        after = reward_fn.stats()
        assert after["pid"] != pid_before, "the actor process was not restarted"
        assert after["calls"] == 1, (
            f"the restarted actor should have served only the retry, got {after['calls']}"
        )
        for name, got in (("before the kill", first), ("after the kill", result["rewards"])):
            err = (got.detach() - expected).abs().max().item()
            assert err < 1e-12, f"rewards {name} differ from in-process by {err:.3g}"
        (grad,) = torch.autograd.grad(result["rewards"].sum(), images)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, "the retried call lost its gradient"
    finally:
        ray.kill(actor, no_restart=True)


def test_missing_and_mismatched_actors_give_clear_errors(color_match_actor):
    images = torch.rand(4, 3, 8, 8)
    missing = ActorReward("no_such_reward", NAMESPACE)
    with pytest.raises(RewardActorError, match="no reward actor named 'no_such_reward' in namespace") as err:
        missing(images, PROMPTS)
    assert "reward_servers.serve" in str(err.value), f"the error should say how to start it: {err.value}"
    assert missing.retries == 0, f"a wrong name must fail at once, not after {missing.retries} retries"
    # The config says brightness, the actor serves color_match: refuse rather than log a false config.
    wrong = make_reward_fn(RewardConfig(name="brightness", actor="color_match", namespace=NAMESPACE))
    with pytest.raises(RewardActorError, match="serves 'color_match'.*reward.name='brightness'"):
        wrong(images, PROMPTS)
    with pytest.raises(RewardActorError, match="already serves reward 'color_match'"):
        launch_reward_actor("color_match", "brightness", namespace=NAMESPACE, num_cpus=ACTOR_CPUS)
    with pytest.raises(RewardActorError, match="failed to build reward 'no_such'.*unknown reward 'no_such'"):
        launch_reward_actor("typo", "no_such", namespace=NAMESPACE, num_cpus=ACTOR_CPUS)
    with pytest.raises(ConfigError, match="reward.actor is empty"):
        RewardConfig(actor=" ")


def test_broken_reward_errors_reach_the_caller(ray_cluster):
    # "test_broken" is registered only inside the actor: setup_modules imports its module there, and the
    # runtime_env puts the repository on the actor's path whatever directory pytest runs from.
    actor = launch_reward_actor(
        "broken",
        "test_broken",
        namespace=NAMESPACE,
        num_cpus=ACTOR_CPUS,
        max_wait_ms=1000,
        setup_modules=("tests.integration.broken_rewards",),
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}},
    )
    try:
        reward_fn = ActorReward("broken", NAMESPACE)
        # Both need gradients: requests of one kind (score_and_grad) and image shape share a batch.
        good_images, bad_images = (torch.rand(2, 3, 8, 8, requires_grad=True) for _ in range(2))
        good_prompts, bad_prompts = ["a red cube", "a blue ball"], ["a red cube", "a poison apple"]
        outcome: dict[str, object] = {}
        start = threading.Barrier(2)

        def call(key: str, images: torch.Tensor, prompts: list[str]) -> None:
            start.wait(timeout=30)
            try:
                outcome[key] = reward_fn(images, prompts)
            except Exception as err:  # noqa: BLE001 (the test inspects it)
                outcome[key] = err

        threads = [
            threading.Thread(target=call, args=("good", good_images, good_prompts)),
            threading.Thread(target=call, args=("bad", bad_images, bad_prompts)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)

        stats = reward_fn.stats()
        assert stats["batches"] == 1, f"both requests should share one forward pass, took {stats['batches']}"
        bad = outcome.get("bad")
        assert isinstance(bad, RewardError), f"a NaN reward must raise RewardError, got {bad!r}"
        assert "non-finite values at batch index [1]" in str(bad) and "'broken'" in str(bad), str(bad)
        good = outcome.get("good")
        assert isinstance(good, torch.Tensor), (
            f"a clean request batched with a NaN one must succeed: {good!r}"
        )
        err = (
            (good.detach() - build_reward("color_match")(good_images.detach(), good_prompts))
            .abs()
            .max()
            .item()
        )
        assert err < 1e-6, f"the clean request's rewards are off by {err:.3g}"

        with pytest.raises(RewardError, match=r"returned shape \(2, 1\), expected \[2\]"):
            reward_fn(bad_images, ["a red cube", "wrong-shape"])
    finally:
        ray.kill(actor, no_restart=True)


def test_serve_cli_starts_a_detached_actor(ray_cluster):
    """`python -m reward_servers.serve` in its own process: the actor outlives it and serves this driver."""
    from reward_servers.serve import resolve_settings

    settings = resolve_settings("clip_score", ["options.scale=2.0", "num_gpus=0.5"])
    assert settings["options"] == {"scale": 2.0} and settings["num_gpus"] == 0.5, (
        f"overrides lost: {settings}"
    )
    with pytest.raises(ConfigError, match="unknown key 'num_gpu'"):
        resolve_settings("clip_score", ["num_gpu=1"])

    gcs = ray_cluster.address_info["gcs_address"]
    overrides = ["actor_name=cli_served", f"namespace={NAMESPACE}", f"num_cpus={ACTOR_CPUS}"]
    command = [sys.executable, "-m", "reward_servers.serve", "color_match", *overrides, "--address", gcs]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"serve exited with {done.returncode}:\n{done.stderr[-2000:]}"
    assert "reward.actor=cli_served" in done.stdout, f"serve should say how to use it: {done.stdout!r}"
    actor = ray.get_actor("cli_served", namespace=NAMESPACE)
    try:
        rewards = ray.get(actor.score.remote(np.ones((1, 3, 4, 4), np.float32), ["a red cube"]), timeout=60)
        assert rewards.shape == (1,) and abs(rewards[0] - 1.0 / 3.0) < 1e-6, (
            f"white vs red is 1 - 2/3: {rewards}"
        )
    finally:
        ray.kill(actor, no_restart=True)


def test_training_finishes_when_the_reward_actor_is_killed_mid_run(ray_cluster, tiny_flux_dir, tmp_path):
    """The real training loop on the tiny Flux, its reward served by an actor that is killed while a
    request is inside it (a slow batch window holds it there): the actor restarts, the call is
    retried, and every step is applied."""
    from leapalign.config import load_config
    from leapalign.train import train
    from tests.conftest import TINY_CONFIG, tiny_overrides

    actor = launch_reward_actor(
        "midrun_test",
        "color_match",
        namespace=NAMESPACE,
        num_cpus=ACTOR_CPUS,
        max_wait_ms=1500,
        max_restarts=3,
    )
    try:
        pid_before = ray.get(actor.stats.remote())["pid"]
        cfg = load_config(
            TINY_CONFIG, tiny_overrides(tiny_flux_dir, tmp_path / "run", **{"train.iterations": 5})
        )
        reward_fn = ActorReward("midrun_test", NAMESPACE, backoff_s=0.2, max_wait_s=60)
        killed = threading.Event()

        def kill_during_second_request() -> None:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if ray.get(actor.stats.remote())["calls"] >= 2:
                    ray.kill(actor, no_restart=False)
                    killed.set()
                    return
                time.sleep(0.02)

        killer = threading.Thread(target=kill_during_second_request)
        killer.start()
        result = train(cfg, reward_fn=reward_fn, progress=False)
        killer.join(timeout=30)

        assert killed.is_set(), "the actor was never killed: the test proved nothing"
        skipped = [m["skipped"] for m in result.history]
        assert skipped == [0.0] * 5, f"every step must be applied despite the kill, got skipped={skipped}"
        assert all(np.isfinite(m["loss"]) for m in result.history), "losses must stay finite"
        assert reward_fn.retries >= 1, (
            f"the in-flight call should have been retried, retries={reward_fn.retries}"
        )
        assert reward_fn.stats()["pid"] != pid_before, "the reward actor process was not restarted"
    finally:
        ray.kill(actor, no_restart=True)
