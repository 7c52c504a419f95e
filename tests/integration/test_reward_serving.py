"""Rewards served by Ray Serve on a real local cluster (127.0.0.1, 2 CPUs): exact gradients, batching,
replicas replaced under a training run, deployments shared across runs, weighted sums, clear errors.

About 2-3 minutes on two busy cores, most of it starting Ray and replica processes (torch imports).
"""

from __future__ import annotations

import json
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
from ray import serve
from torch import nn

from leapalign.config import ConfigError, load_config, with_overrides
from leapalign.distributed.reward_service import (
    RewardServiceError,
    ServedReward,
    ensure_reward_service,
    make_reward_fn,
    start_serve,
)
from leapalign.rewards import build_reward
from leapalign.rewards.base import RewardError
from leapalign.rewards.configured import CheckedReward, WeightedSum, build_configured_reward
from tests.conftest import TINY_CONFIG, local_ray, tiny_overrides

# One test process for the whole module: its Ray cluster is module-scoped (scripts/test.sh: --dist loadgroup).
pytestmark = pytest.mark.xdist_group("test_reward_serving")

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["a red cube", "a blue ball", "green grass", "a yellow sun"]
# Replicas take a quarter CPU each: several deployments and a training worker share the 2 CPUs. A long
# batch window makes concurrent test requests surely meet (and keeps a request in flight for the kill).
SERVING = {"reward.cpus_per_replica": 0.25, "reward.batch_wait_ms": 300}
WEIGHTED = {
    "reward.name": "weighted_sum",
    "reward.options": {
        "color": {"name": "color_match", "weight": 0.7},
        "bright": {"name": "brightness", "weight": 1.4},
    },
}


@pytest.fixture(scope="module")
def serving_cluster():
    with local_ray(log_to_driver=False) as context:
        start_serve()
        try:
            yield context
        finally:
            serve.shutdown()


def reward_cfg(**values):
    """A run config whose reward is served (the Ray path's default), with the test's small replicas."""
    return load_config(None, [f"{k}={v}" for k, v in {**SERVING, **values}.items()])


def apps() -> dict[str, str]:
    return {name: str(app.status.value) for name, app in serve.status().applications.items()}


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


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def test_gradients_through_a_deployment_equal_in_process(serving_cluster):
    cfg = ensure_reward_service(reward_cfg())
    assert cfg.reward.app and apps().get(cfg.reward.app) == "RUNNING", f"not deployed: {apps()}"
    assert serve.status().proxies == {}, "no HTTP proxy: rewards are called through handles only"
    # A pickled copy, as shipped to a Train worker, finds the application again.
    served = pickle.loads(pickle.dumps(make_reward_fn(cfg.reward)))
    assert isinstance(served, ServedReward), f"reward.serve on the Ray path, got {type(served).__name__}"
    local = make_reward_fn(with_overrides(cfg, {"reward.serve": False}).reward)
    assert isinstance(local, CheckedReward), (
        f"reward.serve=false builds in process, got {type(local).__name__}"
    )

    torch.manual_seed(0)
    generator = TinyGenerator().double()
    z = torch.randn(len(PROMPTS), 4, dtype=torch.float64)
    local_rewards, local_grads = generator_grads(local, generator, z)
    served_rewards, served_grads = generator_grads(served, generator, z)

    assert served_rewards.dtype == torch.float64, f"float64 images stay float64, got {served_rewards.dtype}"
    reward_err = (served_rewards - local_rewards).abs().max().item()
    assert reward_err < 1e-12, f"rewards differ by {reward_err:.3g}"
    scale = max(g.abs().max().item() for g in local_grads)
    assert scale > 1e-3, f"the test needs non-trivial gradients, got max |grad| = {scale:.3g}"
    grad_err = max_diff(local_grads, served_grads)
    assert grad_err <= 1e-8, (
        f"parameter gradients through the deployment differ from in process by {grad_err:.3g}"
    )
    values = served.score(z[:, :1, None, None].expand(-1, 3, 8, 8).sigmoid(), PROMPTS)
    assert values.requires_grad is False and values.shape == (4,), "score: values only, one per image"


def test_concurrent_callers_are_batched(serving_cluster):
    cfg = ensure_reward_service(reward_cfg())  # the same settings: the deployment of the test above
    callers = [make_reward_fn(cfg.reward) for _ in range(6)]  # one client per caller, like 6 workers
    generator = torch.Generator().manual_seed(1)
    images = [torch.rand(2, 3, 16, 16, generator=generator) for _ in callers]
    prompts = [[PROMPTS[i % 4], PROMPTS[(i + 1) % 4]] for i in range(len(callers))]
    results: list[torch.Tensor | None] = [None] * len(callers)
    start = threading.Barrier(len(callers))

    def call(i: int) -> None:
        start.wait(timeout=30)
        results[i] = callers[i].score(images[i], prompts[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(callers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)

    largest = max(c.largest_batch for c in callers)
    assert largest > 2, f"6 concurrent callers of 2 images each: the largest batch held {largest} images"
    local = build_reward("color_match")
    for i, got in enumerate(results):
        assert got is not None, f"caller {i} got no answer"
        err = (got - local(images[i], prompts[i])).abs().max().item()
        assert err < 1e-6, f"caller {i} got someone else's rewards (max error {err:.3g})"


def test_weighted_sum_of_served_rewards_logs_each_component(serving_cluster, tiny_flux_dir, tmp_path):
    # Deployed here: the test needs no other test.
    color_alone = ensure_reward_service(reward_cfg()).reward.app
    before = set(apps())
    cfg = ensure_reward_service(reward_cfg(**WEIGHTED))
    served_apps = {label: spec["app"] for label, spec in cfg.reward.options.items()}
    assert set(served_apps) == {"color", "bright"} and len(set(served_apps.values())) == 2, f"{served_apps}"
    assert served_apps["color"] == color_alone, "a component with the same settings shares the deployment"
    assert set(apps()) - before <= {served_apps["bright"]}, f"only brightness is new: {set(apps()) - before}"

    served = make_reward_fn(cfg.reward)
    local = build_configured_reward(with_overrides(cfg, {"reward.serve": False}).reward)
    assert isinstance(served, WeightedSum) and isinstance(local, WeightedSum), "a weighted sum either way"
    torch.manual_seed(0)
    generator = TinyGenerator().double()
    z = torch.randn(len(PROMPTS), 4, dtype=torch.float64)
    local_rewards, local_grads = generator_grads(local, generator, z)
    served_rewards, served_grads = generator_grads(served, generator, z)
    images = generator(z).detach()
    expected = 0.7 * build_reward("color_match")(images, PROMPTS) + 1.4 * build_reward("brightness")(
        images, PROMPTS
    )
    assert (served_rewards - expected).abs().max().item() < 1e-12, "reward = 0.7 color + 1.4 bright"
    assert (local_rewards - expected).abs().max().item() < 1e-12, "in process too"
    grad_err = max_diff(local_grads, served_grads)
    assert grad_err <= 1e-8, f"weighted-sum gradients differ from in process by {grad_err:.3g}"
    assert set(served.last_components) == {"color", "bright"}, f"components: {set(served.last_components)}"
    recombined = 0.7 * served.last_components["color"] + 1.4 * served.last_components["bright"]
    assert (recombined - served_rewards).abs().max().item() < 1e-12, "last_components are the summed values"

    # The trainer logs each component as its own metric.
    train_cfg = load_config(
        TINY_CONFIG,
        tiny_overrides(tiny_flux_dir, tmp_path / "run", **{"train.iterations": 2, "train.num_samples": 1}),
    )
    from leapalign.train import train

    history = train(train_cfg, reward_fn=served, progress=False).history
    for m in history:
        assert {"reward/color", "reward/bright"} <= set(m), f"component metrics missing: {sorted(m)}"
        mixed = 0.7 * m["reward/color"] + 1.4 * m["reward/bright"]
        assert abs(mixed - m["reward/mean"]) < 1e-5, (
            f"reward/mean {m['reward/mean']} != 0.7 c + 1.4 b = {mixed}"
        )
        assert m["skipped"] == 0.0, "every step applied"


def replica_actors(app: str) -> dict[str, object]:
    """Replica id -> its Ray actor, for the application's live replicas."""
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    prefix = f"SERVE_REPLICA::{app}#"  # SERVE_REPLICA::<app>#<deployment>#<replica id>
    return {n.rsplit("#", 1)[1]: ray.get_actor(n, namespace="serve") for n in names if n.startswith(prefix)}


def test_killed_replica_is_replaced_and_training_continues_on_two_replicas(
    serving_cluster, tiny_flux_dir, tmp_path
):
    """The real training loop on the tiny Flux, its reward served by two replicas; after the first step a
    request is held by its replica (tests.integration.broken_rewards.HoldOnce) and that replica is killed:
    Serve replaces it, the request is sent again, every step is applied, and two replicas served the run
    (the killed one held one of its requests)."""
    from leapalign.train import train

    marker = tmp_path / "held"
    hold = {
        "reward.name": "tests.integration.broken_rewards:HoldOnce",
        "reward.options": {"marker": str(marker)},
    }
    cfg = ensure_reward_service(reward_cfg(**{"reward.replicas": 2, **hold}))
    app = cfg.reward.app
    try:
        assert len(replica_actors(app)) == 2, f"two replicas of {app}"
        reward_fn = make_reward_fn(cfg.reward)
        killed: list[str] = []

        def kill_the_holding_replica() -> None:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not reward_fn.replicas_seen:  # the first step's answers
                time.sleep(0.02)
            Path(f"{marker}.armed").touch()  # the next request is held where it lands
            while time.monotonic() < deadline and not killed:
                holder = marker.read_text() if marker.is_file() else ""
                if holder:
                    ray.kill(replica_actors(app)[holder], no_restart=True)
                    killed.append(holder)
                time.sleep(0.02)

        killer = threading.Thread(target=kill_the_holding_replica)
        killer.start()
        train_cfg = load_config(
            TINY_CONFIG,
            tiny_overrides(
                tiny_flux_dir, tmp_path / "run", **{"train.iterations": 4, "train.num_samples": 1}
            ),
        )
        history = train(train_cfg, reward_fn=reward_fn, progress=False).history
        killer.join(timeout=30)

        assert killed, "no replica was killed while it held a request: the test proved nothing"
        skipped = [m["skipped"] for m in history]
        assert skipped == [0.0] * 4, f"every step must be applied despite the kill, got skipped={skipped}"
        assert all(np.isfinite(m["loss"]) for m in history), "losses must stay finite"
        assert reward_fn.retries >= 1, (
            f"the request in flight was not sent again: retries={reward_fn.retries}"
        )
        served_by = reward_fn.replicas_seen | set(killed)
        assert len(served_by) >= 2, f"two replicas served the run, saw {served_by}"
        deadline = time.monotonic() + 90
        while len(replica_actors(app)) < 2 or apps().get(app) != "RUNNING":
            assert time.monotonic() < deadline, f"the killed replica was not replaced: {apps()}"
            time.sleep(0.5)
        assert killed[0] not in replica_actors(app), "the killed replica is gone, a new one took its place"
    finally:
        serve.delete(app)


def test_sweep_trials_and_runs_share_one_deployment(serving_cluster, tiny_flux_dir, tmp_path):
    """The sweep driver deploys once; trials (configs differing outside reward.*) and run_on_ray reuse it."""
    from leapalign.distributed.ray_train import run_on_ray
    from leapalign.train import train

    overrides = {"train.iterations": 2, "train.num_samples": 1, "ray.cpus_per_worker": 0.5, **SERVING}
    base = load_config(TINY_CONFIG, tiny_overrides(tiny_flux_dir, tmp_path / "run", **overrides))
    driver = ensure_reward_service(base)  # what run_trials does before launching trials
    app = driver.reward.app
    deployed_at = serve.status().applications[app].last_deployed_time_s
    trials = [
        with_overrides(base, {"train.seed": seed, "optim.lr": lr}) for seed, lr in ((1, 1e-3), (2, 3e-3))
    ]
    assert [ensure_reward_service(t).reward.app for t in trials] == [app, app], "trials find the same app"
    replica_pid = make_reward_fn(driver.reward).stats()["pid"]
    before_run = set(apps())

    result = run_on_ray(trials[0])  # the Ray Train run a trial makes: reuses the deployment
    assert result.metrics["step"] == 2, f"the run finished: {result.metrics}"
    assert serve.status().applications[app].last_deployed_time_s == deployed_at, "run_on_ray redeployed"
    assert make_reward_fn(driver.reward).stats()["pid"] == replica_pid, "the same replica served the run"
    assert set(apps()) == before_run, f"run_on_ray deployed nothing of its own: {set(apps()) - before_run}"
    # The served run gives the in-process numbers (values exact; gradients to float32 rounding).
    baseline = train(
        with_overrides(trials[0], {"train.output_dir": str(tmp_path / "local")}), progress=False
    ).history
    records = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    served_losses = [json.loads(line)["loss"] for line in records]
    local_losses = [m["loss"] for m in baseline]
    assert served_losses == pytest.approx(local_losses, rel=1e-5), f"served {served_losses} vs {local_losses}"


def test_bad_input_fails_clearly_or_skips(serving_cluster):
    # Unknown names fail before anything is deployed.
    with pytest.raises(ValueError, match="unknown reward 'no_such_reward'"):
        ensure_reward_service(reward_cfg(**{"reward.name": "no_such_reward"}))
    with pytest.raises(ConfigError, match="weighted sums do not nest"):
        reward_cfg(**{"reward.name": "weighted_sum", "reward.options": {"a": {"name": "weighted_sum"}}})
    # A reward that cannot be built: the replica's own error, and nothing left deployed.
    before = set(apps())
    with pytest.raises(
        RewardServiceError, match="could not build reward 'color_match'.*unknown colour 'mauve'"
    ):
        ensure_reward_service(reward_cfg(**{"reward.options": {"color": "mauve"}}))
    assert set(apps()) == before, f"a failed deployment is removed: {set(apps()) - before}"
    served = make_reward_fn(ensure_reward_service(reward_cfg()).reward)
    good = torch.rand(2, 3, 8, 8)
    # Content a model can produce: RewardError (the trainer skips the step).
    with pytest.raises(RewardError, match=r"must lie in \[0, 1\].*batch index \[1\]"):
        served(torch.stack([good[0], good[1] * 2]), PROMPTS[:2])
    with pytest.raises(RewardError, match="finite"):
        served(torch.full((2, 3, 8, 8), float("nan")), PROMPTS[:2])
    with pytest.raises(RewardError, match=r"empty prompt at batch index \[1\]"):
        served(good, ["a red cube", "  "])
    # A malformed call: ValueError (the run stops).
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        served(torch.rand(2, 8, 8), PROMPTS[:2])
    with pytest.raises(ValueError, match="must pair up"):
        served(good, PROMPTS[:3])
    # The replica checks what reaches it directly too.
    handle = serve.get_app_handle(served.app)
    with pytest.raises(Exception, match=r"must lie in \[0, 1\]") as raised:
        handle.score.remote(np.full((1, 3, 4, 4), 2.0, np.float32), ["a red cube"]).result(timeout_s=60)
    assert isinstance(raised.value, RewardError), f"a RewardError from the replica, got {type(raised.value)}"


def test_serve_cli_serves_a_plugin_and_a_nan_fails_only_its_request(serving_cluster):
    """`python -m reward_servers.serve` in its own process serves a plugin path (with its own runtime_env);
    in one batch, the request whose reward is NaN fails with RewardError and the other succeeds."""
    gcs = serving_cluster.address_info["gcs_address"]
    plugin = "tests.integration.broken_rewards:BrokenReward"
    command = [
        sys.executable, "-m", "reward_servers.serve", plugin, "cpus_per_replica=0.25", "batch_wait_ms=1000",
        f"runtime_env={{env_vars: {{PYTHONPATH: '{REPO}'}}}}", "--app", "broken", "--address", gcs,
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"serve exited with {done.returncode}:\n{done.stderr[-2000:]}"
    assert "reward.app=broken" in done.stdout, f"serve should say how to use it: {done.stdout!r}"
    assert apps().get("broken") == "RUNNING", f"the application outlives the command: {apps()}"

    cfg = ensure_reward_service(reward_cfg(**{"reward.name": plugin, "reward.app": "broken"}))
    callers = {"good": make_reward_fn(cfg.reward), "bad": make_reward_fn(cfg.reward)}
    images = {key: torch.rand(2, 3, 8, 8, requires_grad=True) for key in callers}
    prompts = {"good": ["a red cube", "a blue ball"], "bad": ["a red cube", "a poison apple"]}
    outcome: dict[str, object] = {}
    start = threading.Barrier(2)

    def call(key: str) -> None:
        start.wait(timeout=30)
        try:
            outcome[key] = callers[key](images[key], prompts[key])
        except Exception as err:  # noqa: BLE001 (the test inspects it)
            outcome[key] = err

    threads = [threading.Thread(target=call, args=(key,)) for key in callers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)

    assert callers["good"].largest_batch == 4, "both requests share one forward pass"
    bad = outcome.get("bad")
    assert isinstance(bad, RewardError), f"a NaN reward must raise RewardError, got {bad!r}"
    assert "non-finite values at batch index [1]" in str(bad), str(bad)
    good = outcome.get("good")
    assert isinstance(good, torch.Tensor), f"a clean request batched with a NaN one must succeed: {good!r}"
    expected = build_reward("color_match")(images["good"].detach(), prompts["good"])
    assert (good.detach() - expected).abs().max().item() < 1e-6, "the clean request's rewards are right"
    with pytest.raises(RewardError, match=r"returned shape \(2, 1\), expected \[2\]"):
        callers["bad"](images["bad"], ["a red cube", "wrong-shape"])

    stop = subprocess.run(
        [sys.executable, "-m", "reward_servers.serve", plugin, "--app", "broken", "--stop", "--address", gcs],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert stop.returncode == 0 and "broken" not in apps(), f"--stop deletes it: {stop.stderr[-800:]}"
    with pytest.raises(RewardServiceError, match="reward.app='broken' is not running"):
        ensure_reward_service(cfg)
