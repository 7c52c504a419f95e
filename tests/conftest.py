"""Shared fixtures: a tiny real Flux saved as a diffusers folder, built once per test session."""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Every x86-64 CPU runs the same AVX2 kernels (train.cpu_isa=avx2, leapalign/numerics.py): pinned numbers hold
# on AVX2 and AVX-512 machines alike. Read once per process, before torch runs a kernel: set them first.
for _key, _value in {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "AVX2,STRICT",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
}.items():
    os.environ.setdefault(_key, _value)

REPO = Path(__file__).resolve().parents[1]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item) -> None:
    """Under xdist's loadgroup (scripts/test.sh) a grouped test's id carries its group; without it xdist
    splits the module, and its module-scoped Ray cluster, over both processes (seen with pytest 9.2)."""
    if getattr(item.config.option, "loadgroup", False) and item.get_closest_marker("xdist_group"):
        if "@" not in item.nodeid:
            pytest.fail(f"xdist group lost from {item.nodeid}: pytest/xdist versions (pyproject.toml)")


def _quiet() -> None:
    from diffusers.utils import logging as dl
    from transformers.utils import logging as tl

    dl.set_verbosity_error()
    dl.disable_progress_bar()
    tl.set_verbosity_error()
    tl.disable_progress_bar()


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory) -> Path:
    from leapalign.models.tiny import build_tiny_flux

    _quiet()
    return build_tiny_flux(tmp_path_factory.mktemp("models") / "tiny-flux", seed=0)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def leapalign_main(*args: str, cwd: Path = REPO) -> tuple[int, str]:
    """(exit code, what it printed to stderr) of `leapalign ARGS` run through the command's own entry
    (`leapalign.cli.main`, what the console script calls) in this test process, from `cwd`. For commands that
    need no process of their own (refusals, short one-process runs): a child's imports alone take seconds.
    The process-wide settings a command makes (working folder, torch threads) are restored."""
    import contextlib
    import io

    import torch

    from leapalign.cli import main

    err = io.StringIO()
    before, threads = os.getcwd(), torch.get_num_threads()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exit_:  # argparse's refusals
                code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        os.chdir(before)
        torch.set_num_threads(threads)
    return code, err.getvalue()


def tiny_overrides(model_dir: Path, out_dir: Path, **extra) -> list[str]:
    """key=value overrides that point experiments/tiny_demo.yaml at test folders, MLflow off."""
    values = {
        "model.path": str(model_dir),
        "train.output_dir": str(out_dir),
        "tracking.enabled": "false",
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


TINY_CONFIG = REPO / "experiments" / "tiny_demo.yaml"


@contextmanager
def local_ray(**init_kwargs):
    """A private Ray cluster on 127.0.0.1 only, shut down afterwards.

    On Linux Ray binds a node to the host's routable address even when given 127.0.0.1, unless it
    believes multi-node clusters are off (leapalign.distributed.ray_train.connect_ray does the same for
    real runs). The constant is read when ray is imported, so it is patched as well as set for children;
    both are restored afterwards.
    """
    import ray
    import ray._private.ray_constants as ray_constants

    from leapalign.distributed.ray_train import (
        HEALTH_CHECK_INTERVAL_ENV,
        PREEMPTION_WATCHER_ENV,
        PRIVATE_CLUSTER_ENV,
    )

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        mp.setenv(PREEMPTION_WATCHER_ENV, "0")  # as connect_ray's private clusters: no node to lose,
        mp.setenv(HEALTH_CHECK_INTERVAL_ENV, "0.2")  # workers polled every 0.2 s (a dead one noticed then)
        mp.setenv(PRIVATE_CLUSTER_ENV, "1")  # and no placement-group cleaner (it has no dashboard to poll)
        mp.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
        try:
            context = ray.init(address="local", num_cpus=2, include_dashboard=False, **init_kwargs)
        except Exception as err:  # a node start that timed out on a loaded machine: one more, once
            print(f"local_ray: Ray did not start ({type(err).__name__}: {err}); trying once more")
            ray.shutdown()
            context = ray.init(address="local", num_cpus=2, include_dashboard=False, **init_kwargs)
        try:
            ip = context.address_info["node_ip_address"]
            assert ip == "127.0.0.1", f"Ray bound to {ip}, expected 127.0.0.1 only"
            yield context
        finally:
            shutdown_ray()


def shutdown_ray() -> None:
    """Ray down, and Serve's cached client forgotten: Serve keeps it per job id, and the first driver of
    every fresh cluster has the same one, so a test process that starts another cluster later (xdist runs
    several modules in one process) would ask the old cluster's Serve controller ("Can't find actor ... from
    a different cluster")."""
    import ray
    from ray.serve.context import _set_global_client

    _set_global_client(None)
    ray.shutdown()


def start_in_thread(fn, *args) -> tuple[threading.Thread, dict]:
    """Run fn(*args) in a daemon thread so a test can bound it (join with a timeout) or act while it runs;
    the dict gets "result" or "error" (any exception, for the test to report)."""
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["result"] = fn(*args)
        except BaseException as err:  # reported by the test
            outcome["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome
