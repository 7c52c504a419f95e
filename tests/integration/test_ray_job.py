"""`ray job submit` end to end: a token-authenticated head on 127.0.0.1, the README's submit command, the
job's MLflow run with the pinned first loss; `leapalign sweep` as a job on the same head (one head for the
module). About 2 minutes on two cores.

The head runs as `ray start --head --block` and is stopped by signalling that process, which takes down
exactly the processes it started. `ray stop` would stop every Ray process on the machine, other
sessions' clusters included.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from leapalign.distributed.ray_train import HEALTH_CHECK_INTERVAL_ENV
from tests.conftest import REPO, free_port, tiny_overrides
from tests.unit.test_cli_and_config import EXPECTED_TWO_STEP_LOSSES

# One test process for the whole module: its Ray cluster is module-scoped (scripts/test.sh: --dist loadgroup).
pytestmark = pytest.mark.xdist_group("test_ray_job")

VENV_BIN = Path(sys.executable).parent


def ray_cli(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(VENV_BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def submit_job(address: str, env: dict[str, str], job_id: str, *command: str) -> subprocess.CompletedProcess:
    """`ray job submit` with the repo as working dir (the README's command). Right after start-up the jobs
    API may answer before its agent is up: that, and nothing else, is retried."""
    deadline = time.monotonic() + 90
    while True:
        submit = ray_cli(
            "job", "submit", "--address", address, "--working-dir", str(REPO), "--submission-id", job_id,
            "--", sys.executable, "-m", "leapalign", *command,
            env=env,
            timeout=600,
        )  # fmt: skip
        if "No available agent" not in submit.stdout + submit.stderr or time.monotonic() > deadline:
            return submit
        time.sleep(3)


def assert_succeeded(submit: subprocess.CompletedProcess, job_id: str) -> None:
    """`ray job submit` waits for the job, then prints the status the head reports (what `ray job status`
    prints) and exits 1 if the job failed."""
    said = submit.stdout + submit.stderr
    assert submit.returncode == 0 and f"Job '{job_id}' succeeded" in said, (
        f"job {job_id}: exit {submit.returncode}\nsubmit output: {submit.stdout[-3000:]}{submit.stderr[-2000:]}"
    )


@pytest.fixture(scope="module")
def token_head():
    """A one-node Ray cluster on 127.0.0.1 (GCS, dashboard and workers), token auth, 2 CPUs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env |= {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),  # this cluster's own token; ~/.ray/auth_token is untouched
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # every process listens on 127.0.0.1 (see connect_ray)
        "RAY_USAGE_STATS_ENABLED": "0",
        HEALTH_CHECK_INTERVAL_ENV: "0.2",  # as connect_ray's private clusters (`ray start` sets none)
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # the job's `python` is the venv's
    }
    # Every port is picked free: Ray's fixed defaults (agent 52365, client 10001, ...) clash with any other
    # cluster on this machine, and a clash leaves the head without a job agent.
    ports = {
        name: free_port()
        for name in (
            "port",
            "dashboard-port",
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "ray-client-server-port",
            "metrics-export-port",
            "runtime-env-agent-port",
        )
    }
    # Unix socket paths under the temp dir must stay short (about 100 characters): not pytest's tmp_path.
    temp_dir = tempfile.mkdtemp(prefix="lray-", dir="/tmp")
    command = [str(VENV_BIN / "ray"), *"start --head --block --node-ip-address 127.0.0.1".split()]
    command += [*"--dashboard-host 127.0.0.1 --num-cpus 2 --disable-usage-stats --temp-dir".split(), temp_dir]
    command += [arg for name, port in ports.items() for arg in (f"--{name}", str(port))]
    log = open(Path(temp_dir) / "head.log", "w")  # noqa: SIM115  (closed in finally)
    head = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        deadline = time.monotonic() + 120
        while ray_cli("job", "list", "--address", address, env=env, timeout=60).returncode != 0:
            assert head.poll() is None, (
                f"ray start exited {head.returncode}: {Path(log.name).read_text()[-2000:]}"
            )
            assert time.monotonic() < deadline, f"no dashboard at {address} after 120 s"
            time.sleep(2)
        unauthenticated = {k: v for k, v in env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
        unauthenticated["RAY_AUTH_TOKEN_PATH"] = os.devnull
        denied = ray_cli("job", "list", "--address", address, env=unauthenticated, timeout=60)
        said = (denied.stdout + denied.stderr).lower()
        assert denied.returncode != 0 and "token" in said, f"a client without the token got in: {said[-600:]}"
        yield address, env
    finally:
        # `ray start --block` drains and stops the processes it started on SIGTERM (up to 30 s when a
        # job's workers linger); anything left in its session (this cluster only) is killed after 5 s.
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=30)
        wait_for_session_exit(temp_dir)  # the next module's cluster must not start beside a dying one
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def wait_for_session_exit(temp_dir: str, timeout_s: float = 30.0) -> None:
    """Until no process of this cluster's session (its temp dir on the command line) is left, bounded."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = subprocess.run(["pgrep", "-f", temp_dir], capture_output=True, text=True).stdout.split()
        if not found:
            return
        for pid in found:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        time.sleep(0.5)


def test_ray_job_submit_trains_and_logs_one_mlflow_run(token_head, tiny_flux_dir, tmp_path):
    from mlflow import MlflowClient

    address, env = token_head
    values = {
        "train.iterations": 2,
        "train.num_samples": 1,
        "sampler.eval_num_steps": 2,
        "ray.cpus_per_worker": 0.5,
        "tracking.enabled": "true",
        "tracking.uri": f"sqlite:///{tmp_path}/mlflow.db",  # absolute: the job runs in an unpacked copy
    }
    out = tmp_path / "run"
    # The README's command: the repo as the working dir (.gitignore'd .venv, outputs and caches stay home).
    submit = submit_job(
        address,
        env,
        "tiny-job",
        "train",
        "experiments/tiny_demo.yaml",
        *tiny_overrides(tiny_flux_dir, out, **values),
    )
    assert_succeeded(submit, "tiny-job")
    assert "done: step 2/2 on 1 Ray worker(s)" in submit.stdout, f"job log: {submit.stdout[-2000:]}"

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("tiny-demo").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", f"MLflow runs: {[r.info for r in runs]}"
    run_id = runs[0].info.run_id
    losses = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))
    assert [s for s, _ in losses] == [1, 2], f"MLflow loss steps {losses}"
    assert losses[0][1] == pytest.approx(EXPECTED_TWO_STEP_LOSSES[0], rel=1e-6), (
        f"the job's first loss {losses} vs the pinned single-process one {EXPECTED_TWO_STEP_LOSSES}"
    )
    logged = {a.path for a in client.list_artifacts(run_id)}
    for name in ("config.yaml", "lora", "lora_ema", "samples", "metrics.jsonl"):
        assert name in logged, f"artifact {name} missing: {sorted(logged)}"
    final = tmp_path / "ray_results" / "run" / "checkpoint_000002"
    assert (final / ".metadata").is_file() and (final / "train_state.pt").is_file(), (
        "the final checkpoint (a DCP folder) is beside the output folder"
    )


def test_ray_job_submit_runs_a_sweep_on_the_token_cluster(token_head, tiny_flux_dir, tmp_path):
    """`leapalign sweep` as a job: it joins the job's cluster (RAY_ADDRESS), runs its trials there and nests
    their MLflow runs under one parent."""
    import pyarrow.parquet as pq
    import yaml
    from mlflow import MlflowClient

    from tests.integration.test_experiments import base_overrides

    address, env = token_head
    spec = {
        "name": "job_sweep",
        "base": str(REPO / "experiments" / "tiny_demo.yaml"),
        "overrides": {
            **base_overrides(tiny_flux_dir, tmp_path),
            "train.iterations": 2,
            "ray.cpus_per_worker": 0.5,
        },
        "search": {"method.leapalign.alpha": {"grid": [0.0, 1.0]}},
        "searcher": "grid",
        "metric": "eval/reward/color_match",
        "mode": "max",
    }
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    out = tmp_path / "sweep"  # absolute: the job runs in an unpacked copy of the repo
    submit = submit_job(address, env, "sweep-job", "sweep", str(tmp_path / "sweep.yaml"), "--out", str(out))
    assert_succeeded(submit, "sweep-job")
    assert "best trial: " in submit.stdout, f"the sweep prints its best trial: {submit.stdout[-2000:]}"
    rows = pq.read_table(out / "report" / "results.parquet").to_pylist()
    assert sorted(row["method.leapalign.alpha"] for row in rows) == [0.0, 1.0], f"both grid points: {rows}"
    assert all(row["steps"] == 2 for row in rows), f"every trial ran its 2 updates: {rows}"
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("experiments-test").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2, (
        f"one parent and a nested run per trial: {len(runs)} runs"
    )


def test_ray_job_submit_embeds_and_evaluates_on_ray_data(token_head, tiny_flux_dir, tmp_path):
    """`leapalign embed --actors 2` and `leapalign eval --actors 2` as jobs: their Ray Data actors run on the
    job's cluster; the cache serves every prompt, the evaluation writes one table per weights and the summary."""
    import json

    import pyarrow.parquet as pq

    from leapalign.data import load_prompts
    from leapalign.text_cache import TextCache

    address, env = token_head
    prompts = "assets/prompts/demo.txt"  # shipped with the package: the job resolves it in its own install
    cache = tmp_path / "cache"  # absolute: the job runs in an unpacked copy of the repo
    actors = ["--actors", "2", "--cpus-per-actor", "0.5"]
    embed = submit_job(
        address, env, "embed-job", "embed", prompts, str(cache), "--model", str(tiny_flux_dir),
        "--max-sequence-length", "16", "--shard-size", "3", *actors,
    )  # fmt: skip
    assert_succeeded(embed, "embed-job")
    assert "3 shards encoded on 2 Ray Data actor(s)" in embed.stdout, f"embed job log: {embed.stdout[-2000:]}"
    demo = load_prompts(prompts)
    assert TextCache(cache).missing(demo) == [] and len(TextCache(cache)) == len(set(demo)), "cache coverage"

    out = tmp_path / "eval"
    # The reward built in each actor (served rewards on Ray Data: tests/integration/test_data_jobs.py).
    overrides = tiny_overrides(tiny_flux_dir, tmp_path / "run", **{"sampler.eval_num_steps": 2,
                                                                    "reward.serve": "false"})  # fmt: skip
    evaluate = submit_job(
        address, env, "eval-job", "eval", "base", str(tiny_flux_dir / "transformer"), prompts,
        "--config", str(REPO / "experiments" / "tiny_demo.yaml"), "--num-prompts", "3", "--out", str(out),
        *actors, *overrides,
    )  # fmt: skip
    assert_succeeded(evaluate, "eval-job")
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(summary["summary"]) == ["base", "transformer"], f"one summary per weights: {summary}"
    base, same = (pq.read_table(out / name / "eval.parquet") for name in ("base", "transformer"))
    assert base.num_rows == 3 and "reward/color_match" in base.column_names, f"eval table: {base.schema}"
    # The tiny model's own transformer folder is the base model's transformer: the same table.
    assert base.equals(same), "the base weights loaded from their folder give the base model's table"
