"""What every process a run starts gets in its environment: the CPU kernel pins (train.cpu_isa) and the driver's
OpenMP thread settings (leapalign.numerics.THREAD_KEYS), for Ray Train workers and for reward replicas alike."""

from __future__ import annotations

from leapalign.config import load_config
from leapalign.distributed.ray_train import (
    HEALTH_CHECK_INTERVAL_ENV,
    PREEMPTION_WATCHER_ENV,
    PRIVATE_CLUSTER_ENV,
    worker_env,
)
from leapalign.rewards.serving import serving_plan
from tests.conftest import TINY_CONFIG

PINS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2,STRICT", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def test_workers_and_replicas_get_the_pins_and_nothing_forced(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    cfg = load_config(TINY_CONFIG, ["train.cpu_isa=avx2"])
    env = worker_env(cfg, {"FAULT": "1"})["env_vars"]
    assert env == {**PINS, "FAULT": "1"}, f"a worker's env_vars: {env}"
    replica = serving_plan(cfg.reward, cfg.train.cpu_isa)[0].spec.runtime_env["env_vars"]
    assert replica == PINS, f"a replica's env_vars: {replica}"
    native = load_config(TINY_CONFIG, ["train.cpu_isa=native"])
    assert worker_env(native, {})["env_vars"] == {}, "native: no pins, no thread setting of our own"


def test_the_drivers_wait_policy_reaches_workers_and_replicas(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    cfg = load_config(TINY_CONFIG, ["train.cpu_isa=avx2"])
    assert worker_env(cfg, {})["env_vars"] == {**PINS, "OMP_WAIT_POLICY": "PASSIVE"}, "a worker gets it"
    replica = serving_plan(cfg.reward, cfg.train.cpu_isa)[0].spec.runtime_env["env_vars"]
    assert replica["OMP_WAIT_POLICY"] == "PASSIVE", "a replica gets it too"


SETTINGS = (HEALTH_CHECK_INTERVAL_ENV, PREEMPTION_WATCHER_ENV, PRIVATE_CLUSTER_ENV)
PROBE = f"""
import json, os, ray
from leapalign.config import load_config
from leapalign.distributed.ray_train import connect_ray
from tests.conftest import TINY_CONFIG
assert connect_ray(load_config(TINY_CONFIG, []))
print(json.dumps(ray.get(ray.remote(num_cpus=0)(lambda: {{k: os.environ.get(k) for k in {SETTINGS!r}}}).remote())))
ray.shutdown()
"""


def test_a_private_clusters_processes_get_the_train_settings():
    """connect_ray's private cluster (a real one): what a Train controller started there inherits, read in one
    of its worker processes. The health-check interval is 0.2 s when the user set none (bench/README.md)."""
    import json
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    unset = ("RAY_ADDRESS", HEALTH_CHECK_INTERVAL_ENV)
    env = {k: v for k, v in os.environ.items() if k not in unset}
    probe = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    assert probe.returncode == 0, probe.stderr[-2000:]
    seen = json.loads(probe.stdout.strip().splitlines()[-1])
    want = {HEALTH_CHECK_INTERVAL_ENV: "0.2", PREEMPTION_WATCHER_ENV: "0", PRIVATE_CLUSTER_ENV: "1"}
    assert seen == want, f"a private cluster's process: {seen}"
