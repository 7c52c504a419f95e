"""Ray Train on a real local cluster (127.0.0.1, 2 CPUs), a real MLflow sqlite store and the tiny Flux.

One worker reproduces the single-process loop exactly, through a killed worker and a stopped run that both
continue from the last checkpoint, with every MLflow step logged exactly once (two workers with half the
batch each, under DDP and FSDP2, and their DCP checkpoints: test_scale_out.py); bad storage and an unreachable
tracking server fail before any work. About 3 minutes on two cores, most of it starting worker processes
(torch + diffusers imports).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from leapalign.config import load_config
from leapalign.distributed.ray_train import FAULT_MARKER_ENV, FAULT_STEP_ENV, run_on_ray
from leapalign.train import train
from tests.conftest import REPO, TINY_CONFIG, local_ray, tiny_overrides

# One test process for the whole module: its Ray cluster is module-scoped (scripts/test.sh: --dist loadgroup).
pytestmark = pytest.mark.xdist_group("test_ray_train")

BASELINE_STEPS = 6
# Smaller sample grids (they never touch the training draws) and half a CPU per worker (2 cores).
FAST = {"train.num_samples": 1, "sampler.eval_num_steps": 2, "ray.cpus_per_worker": 0.5}


@pytest.fixture(scope="module")
def ray_cluster():
    with local_ray() as context:  # its controllers notice a dead worker within 0.2 s, as on connect_ray's
        yield context


def tiny_cfg(model_dir: Path, tmp: Path, **extra):
    values = {
        "tracking.enabled": "true",
        "tracking.uri": f"sqlite:///{tmp}/mlflow.db",
        "ray.storage_path": str(tmp / "ray_results"),
        **FAST,
        **extra,
    }
    return load_config(TINY_CONFIG, tiny_overrides(model_dir, tmp / "run", **values))


@pytest.fixture(scope="module")
def baseline_losses(tiny_flux_dir, tmp_path_factory) -> list[float]:
    """The single-process loop (no Ray), same config and seed: the numbers every Ray run must give."""
    tmp = tmp_path_factory.mktemp("baseline")
    cfg = tiny_cfg(tiny_flux_dir, tmp, **{"train.iterations": BASELINE_STEPS, "tracking.enabled": "false"})
    history = train(cfg, progress=False).history
    assert not any(m["skipped"] for m in history), "the baseline must apply every step"
    return [m["loss"] for m in history]


def metric_steps(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def only_run(tmp: Path):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("tiny-demo").experiment_id])
    assert len(runs) == 1, f"one training run must make one MLflow run, found {len(runs)}"
    return client, runs[0]


def test_killed_worker_and_stopped_run_continue_from_the_last_checkpoint(
    ray_cluster, baseline_losses, tiny_flux_dir, tmp_path, monkeypatch
):
    """One Ray Train worker gives the single-process loop's numbers, through a killed worker and a resume."""
    # 1. Rank 0 dies at step 4, after flushing steps 3-4 to MLflow but before checkpoint 4 is reported:
    #    Ray restarts the worker group from checkpoint 2, and the replayed steps 3-4 must not log twice.
    marker = tmp_path / "fault.marker"
    monkeypatch.setenv(FAULT_STEP_ENV, "4")
    monkeypatch.setenv(FAULT_MARKER_ENV, str(marker))
    extra = {"train.checkpoint_every": 2, "ray.max_failures": 1, "train.keep_checkpoints": 5}
    result = run_on_ray(tiny_cfg(tiny_flux_dir, tmp_path, **{"train.iterations": 4, **extra}))
    assert marker.exists(), "the fault-injection hook never fired"
    assert result.metrics["step"] == 4, f"after the restart the run must finish: {result.metrics}"

    # 2. The run stopped at its iteration limit; resume it with a higher one: it continues at step 5.
    monkeypatch.delenv(FAULT_STEP_ENV)
    cfg = tiny_cfg(
        tiny_flux_dir, tmp_path, **{"train.iterations": BASELINE_STEPS, "train.resume": "true", **extra}
    )
    result = run_on_ray(cfg)
    assert result.metrics["step"] == BASELINE_STEPS, f"resumed run ended at {result.metrics}"

    client, run = only_run(tmp_path)
    assert run.info.status == "FINISHED", f"the one MLflow run ends FINISHED, not {run.info.status}"
    resumes = metric_steps(client, run.info.run_id, "ray/resumed_from_step")
    assert resumes == [(2, 2.0), (4, 4.0)], f"expected resumes from step 2 (fault) and 4 (stop): {resumes}"
    for key in ("loss", "reward/mean", "time/step_s", "grad_norm"):
        steps = [s for s, _ in metric_steps(client, run.info.run_id, key)]
        assert steps == list(range(1, BASELINE_STEPS + 1)), (
            f"{key}: MLflow steps {steps}, want 1..6 once each"
        )
    losses = [v for _, v in metric_steps(client, run.info.run_id, "loss")]
    assert losses == pytest.approx(baseline_losses, rel=1e-6, abs=1e-7), (
        f"interrupted twice {losses} vs uninterrupted single process {baseline_losses}"
    )
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, BASELINE_STEPS + 1)), "metrics.jsonl replays once"
    # What every run leaves: the newest checkpoint, the resolved config as params, its artifacts in MLflow.
    assert result.checkpoint_path.endswith(f"checkpoint_{BASELINE_STEPS:06d}"), f"{result.checkpoint_path}"
    assert run.info.run_id == result.run_id, f"the run's MLflow run: {run.info.run_id} vs {result.run_id}"
    assert run.data.params["ray.num_workers"] == "1", "the resolved config is logged as params"
    logged = {a.path for a in client.list_artifacts(run.info.run_id)}
    logged |= {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    for name in ("config.yaml", "metrics.jsonl", "lora", "lora_ema", "samples/samples_before.png"):
        assert name in logged, f"artifact {name} missing from the MLflow run: {sorted(logged)}"


# ----------------------------------------------------------------------------- bad input, through the CLI


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


@pytest.mark.parametrize("case", ["unreachable tracking server", "storage under a file", "nothing to resume"])
def test_bad_ray_input_fails_before_any_work(tiny_flux_dir, tmp_path, case):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    storage = tmp_path / "ray_results"
    extra, message = {
        "unreachable tracking server": (
            {"tracking.uri": f"http://127.0.0.1:{closed_port()}"},
            "is unreachable",
        ),
        "storage under a file": (
            {"ray.storage_path": str(blocker / "ray_results")},
            "cannot write checkpoints",
        ),
        "nothing to resume": ({"train.resume": "true"}, "holds no run to continue"),
    }[case]
    values = {"tracking.enabled": "true", "tracking.uri": f"sqlite:///{tmp_path}/mlflow.db"}
    values |= {"ray.storage_path": str(storage), **extra}
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "leapalign",
            "train",
            str(TINY_CONFIG),
            *tiny_overrides(tiny_flux_dir, out, **values),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, f"{case}: exit code {proc.returncode}, stderr {proc.stderr[-1500:]}"
    assert message in proc.stderr, f"{case}: want {message!r} in {proc.stderr[-800:]!r}"
    assert "Traceback" not in proc.stderr, f"{case}: a user error must not print a traceback"
    assert "Started a local Ray instance" not in proc.stderr, f"{case}: Ray must not start"
    assert not out.exists(), f"{case}: no run folder"
    assert not (tmp_path / "mlflow.db").exists(), f"{case}: no MLflow store or run"
    assert not storage.exists(), f"{case}: nothing written to ray.storage_path"


def test_a_dead_controllers_workers_are_released_without_the_dashboard(ray_cluster):
    """What a sweep does when ASHA kills a trial, or a controller dies while its trial ends: the placement
    group that a dead actor created is removed (this cluster runs no dashboard, so Ray Train's own cleaner
    cannot do it) and its CPUs come back; the driver's groups (Tune's) and a live controller's are kept."""
    import ray
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, placement_group, placement_group_table

    from leapalign.distributed.tune_runner import ReleaseOrphanedWorkers

    @ray.remote(num_cpus=0)
    class Controller:
        def start_group(self) -> str:
            group = placement_group([{"CPU": 0.25}])
            ray.get(group.ready(), timeout=60)
            return group.id.hex()

    free_before = ray.available_resources().get("CPU", 0.0)
    drivers = placement_group([{"CPU": 0.25}])
    ray.get(drivers.ready(), timeout=60)
    live, dead = Controller.remote(), Controller.remote()
    live_group, dead_group = ray.get([live.start_group.remote(), dead.start_group.remote()], timeout=60)
    ray.kill(dead)

    def state(group_hex: str) -> str:
        return placement_group_table(PlacementGroup(PlacementGroupID.from_hex(group_hex)))["state"]

    callback = ReleaseOrphanedWorkers()
    for _ in range(100):  # bounded: the kill reaches the GCS asynchronously; Tune calls this every loop
        callback.on_step_begin(0, [])
        if state(dead_group) == "REMOVED":
            break
        time.sleep(0.1)
    assert state(dead_group) == "REMOVED", "the dead controller's group is removed"
    callback.on_trial_complete(0, [], None)
    callback.on_experiment_end([])
    assert state(live_group) == "CREATED", "a live controller's group is kept"
    assert placement_group_table(drivers)["state"] == "CREATED", "the driver's own group (Tune's) is kept"
    ray.kill(live)
    for _ in range(100):
        callback.release()
        if state(live_group) == "REMOVED":
            break
        time.sleep(0.1)
    assert state(live_group) == "REMOVED", "and removed once its controller is dead"
    ray.util.remove_placement_group(drivers)
    free_after = 0.0
    for _ in range(100):  # bounded: removal is asynchronous
        free_after = ray.available_resources().get("CPU", 0.0)
        if free_after >= free_before - 1e-6:
            break
        time.sleep(0.1)
    # >=: an earlier test's workers may still be handing their CPUs back while this one runs.
    assert free_after >= free_before - 1e-6, f"the CPUs are free again: {free_after} vs {free_before} before"
