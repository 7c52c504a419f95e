"""What every process a run starts gets in its environment: the CPU kernel pins (train.cpu_isa) and the OpenMP
wait policy (leapalign.numerics.THREAD_ENV), for Ray Train workers and for reward replicas alike."""

from __future__ import annotations

from leapalign.config import load_config
from leapalign.distributed.ray_train import worker_env
from leapalign.rewards.serving import serving_plan
from tests.conftest import TINY_CONFIG

PINS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2,STRICT", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def test_workers_and_replicas_get_the_pins_and_the_thread_policy(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    cfg = load_config(TINY_CONFIG, ["train.cpu_isa=avx2"])
    env = worker_env(cfg, {"FAULT": "1"})["env_vars"]
    assert env == {**PINS, "OMP_WAIT_POLICY": "PASSIVE", "FAULT": "1"}, f"a worker's env_vars: {env}"
    replica = serving_plan(cfg.reward, cfg.train.cpu_isa)[0].spec.runtime_env["env_vars"]
    assert replica == {**PINS, "OMP_WAIT_POLICY": "PASSIVE"}, f"a replica's env_vars: {replica}"

    native = load_config(TINY_CONFIG, ["train.cpu_isa=native"])
    assert worker_env(native, {})["env_vars"] == {"OMP_WAIT_POLICY": "PASSIVE"}, (
        "native: no pins, threads still"
    )


def test_a_wait_policy_in_the_environment_wins(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    cfg = load_config(TINY_CONFIG, ["train.cpu_isa=avx2"])
    assert worker_env(cfg, {})["env_vars"]["OMP_WAIT_POLICY"] == "ACTIVE", "the user's setting is kept"
    replica = serving_plan(cfg.reward, cfg.train.cpu_isa)[0].spec.runtime_env["env_vars"]
    assert replica["OMP_WAIT_POLICY"] == "ACTIVE", "for replicas too"
