"""cluster.yaml: Ray's own schema accepts it, and it carries what the README promises (GPU workers, the
project installed with the pinned torch, dashboard on 127.0.0.1 only, token auth on every node)."""

from __future__ import annotations

import copy
import re
import tomllib

import pytest
import yaml

from tests.conftest import REPO


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_ray_cluster_launcher_schema_accepts_it(cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cluster)))  # raises on an unknown or mistyped field


def test_head_and_gpu_workers(cluster):
    assert cluster["cluster_name"], "cluster_name is empty"
    assert cluster["provider"]["type"] == "aws" and cluster["provider"]["region"], cluster["provider"]
    assert cluster["auth"]["ssh_user"], "auth.ssh_user is needed for `ray up` / `ray dashboard`"
    types = cluster["available_node_types"]
    assert cluster["head_node_type"] in types, f"head_node_type {cluster['head_node_type']} not defined"
    gpu_types = {name: t for name, t in types.items() if t.get("resources", {}).get("GPU", 0) >= 1}
    assert gpu_types, f"no node type offers a GPU: {types}"
    for name, node in gpu_types.items():
        assert name != cluster["head_node_type"], "training GPUs belong on workers, not the head"
        assert node["min_workers"] == 0 and node["max_workers"] >= 1, f"{name}: min 0, max >= 1 expected"
        assert node["max_workers"] <= cluster["max_workers"], f"{name}: max_workers above the cluster's"


def test_setup_installs_the_project_with_the_pinned_torch(cluster):
    pins = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_pin = next(p for p in pins if p.startswith("torch=="))
    setup = " ".join(cluster["setup_commands"])
    assert "python3.11 -m venv .venv" in setup, "the venv must be Python 3.11 (pyproject requires-python)"
    assert setup.count(f"pip install -q {torch_pin}") == 2, f"{torch_pin} for GPU (PyPI) and CPU nodes"
    assert "whl/cpu" in setup and "nvidia-smi" in setup, "CUDA torch on GPU nodes only"
    assert "pip install -q -e ." in setup, "the project itself is installed"
    assert setup.index(torch_pin) < setup.index("-e ."), "torch first and alone, as scripts/setup.sh does"
    assert cluster["file_mounts"]["~/leapalign"] == ".", "the checkout is synced to every node"
    assert ".gitignore" in cluster["rsync_filter"], ".venv, outputs and mlflow.db stay home"


def test_dashboard_local_only_and_token_auth_everywhere(cluster):
    head_start = [c for c in cluster["head_start_ray_commands"] if "ray start" in c]
    worker_start = [c for c in cluster["worker_start_ray_commands"] if "ray start" in c]
    assert len(head_start) == 1 and len(worker_start) == 1, "one `ray start` per node type"
    assert "--dashboard-host=127.0.0.1" in head_start[0], "the dashboard must not listen beyond the head"
    assert not re.search(r"--dashboard-host[= ]0\.0\.0\.0", head_start[0]), head_start[0]
    for command in (*head_start, *worker_start):
        assert "RAY_AUTH_MODE=token" in command, f"token auth missing: {command}"
        assert ".venv/bin:$PATH" in command, f"Ray (and so a job's python) must come from the venv: {command}"
    assert cluster["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token", "every node needs the token"
    mlflow = " ".join(c for c in cluster["head_start_ray_commands"] if "mlflow server" in c)
    assert "--workers 1" in mlflow and "sqlite:///" in mlflow, f"MLflow server command: {mlflow}"


def test_full_finetuning_node_type_and_shared_storage_notes(cluster):
    """The paper's full fine-tuning: 8 x 80 GB GPUs per node, at most 2 nodes; checkpoints on shared storage."""
    eight = {
        n: t for n, t in cluster["available_node_types"].items() if t.get("resources", {}).get("GPU") == 8
    }
    assert eight, "no node type with 8 GPUs for full fine-tuning"
    name, node = next(iter(eight.items()))
    assert node["node_config"]["InstanceType"] == "p5.48xlarge", f"{name}: 8 x H100 80 GB is p5.48xlarge"
    assert node["min_workers"] == 0 and node["max_workers"] == 2, f"{name}: 0..2 nodes, got {node}"
    assert node["max_workers"] <= cluster["max_workers"], f"{name}: above the cluster's max_workers"
    text = (REPO / "cluster.yaml").read_text()
    for phrase in ("ray.storage_path", "s3://", "NFS", "DCP"):
        assert phrase in text, (
            f"cluster.yaml must say how checkpoints reach shared storage ({phrase!r} missing)"
        )
