"""What every process a run starts gets in its environment: the CPU kernel pins (train.cpu_isa) and the driver's
OpenMP thread settings (leapalign.numerics.THREAD_KEYS), for Ray Train workers and for reward replicas alike."""

from __future__ import annotations

from leapalign.config import load_config
from leapalign.distributed.ray_train import worker_env
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
