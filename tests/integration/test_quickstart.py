"""The quickstart (miniature world): same seed -> same numbers, evaluation logged, bad input refused.

Runs the real entry point on experiments/quickstart.yaml with fewer steps and prompts; the full
quickstart's accuracy gain over three seeds is measured by hand (README) since it takes minutes.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, leapalign_main

QUICKSTART = REPO / "experiments" / "quickstart.yaml"
# The first update, before any optimizer step: what every x86-64 machine reproduces with train.cpu_isa=avx2
# (the shipped quickstart's setting; tests/unit/test_numerics.py). Later updates are checked run to run.
QUICKSTART_FIRST_LOSS = 11.13279914855957  # ray.enabled=false, seed 0
QUICKSTART_FIRST_REWARD = -1.347558856010437  # the mini scorer's logit on the first rollouts


def quickstart_args(out_dir, db, *extra) -> list[str]:
    return [
        "train", str(QUICKSTART), "train.iterations=2", "eval.num_prompts=12",
        "train.num_samples=2", f"train.output_dir={out_dir}", f"tracking.uri=sqlite:///{db}", *extra,
    ]  # fmt: skip


def run_quickstart(out_dir, db, *extra):
    return subprocess.run(
        [sys.executable, "-m", "leapalign", *quickstart_args(out_dir, db, *extra)],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip


def test_same_seed_same_numbers_and_evaluation_logged(tmp_path):
    """The same quickstart in one process and on the Ray path (its default: a Ray Train worker, the reward on
    a Serve deployment, the base model evaluated while Ray starts): the same numbers."""
    runs = []
    paths = {"a": ["ray.enabled=false"], "b": ["ray.enabled=true", f"ray.storage_path={tmp_path / 'ray'}"]}
    for name, path in paths.items():
        proc = run_quickstart(tmp_path / name, tmp_path / "mlflow.db", *path)
        assert proc.returncode == 0, f"quickstart failed: {proc.stderr[-2000:]}"
        assert "held-out accuracy" in proc.stdout and "overall" in proc.stdout, proc.stdout[-1500:]
        metrics = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        evaluation = json.loads((tmp_path / name / "eval.json").read_text())
        runs.append((metrics, evaluation))
        assert (tmp_path / name / "eval_before_after.png").stat().st_size > 1000, "before/after grid missing"
    (m_a, e_a), (m_b, e_b) = runs
    losses = [m["loss"] for m in m_a]
    # Pinned: the shipped mini Flux + mini scorer, seed 0, the first LeapAlign update.
    assert losses[0] == pytest.approx(QUICKSTART_FIRST_LOSS, rel=1e-6), f"pinned first loss: {losses}"
    assert m_a[0]["reward/mean"] == pytest.approx(QUICKSTART_FIRST_REWARD, rel=1e-6), "pinned first reward"
    assert losses == [m["loss"] for m in m_b], "same seed, same losses on both paths"
    assert [m["reward/mean"] for m in m_a] == [m["reward/mean"] for m in m_b], "same seed, same rewards"
    assert e_a == e_b, f"same seed, same held-out accuracy before and after on both paths: {e_a} vs {e_b}"
    assert e_a["before"]["n"] == 12 and e_a["after"]["n"] == 12, f"eval summary {e_a}"
    # The base model on the first 12 held-out prompts with the fixed evaluation noise: 3 images correct.
    assert e_a["before"]["image_accuracy"] == pytest.approx(3 / 12), f"pinned base accuracy: {e_a['before']}"

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("quickstart")
    found = client.search_runs([experiment.experiment_id])
    assert len(found) == 2, f"one MLflow run per quickstart, found {len(found)}"
    logged = found[0].data.metrics
    assert "eval/before/overall" in logged and "eval/after/overall" in logged, (
        f"eval metrics: {sorted(logged)}"
    )
    assert logged["eval/before/overall"] == pytest.approx(e_a["before"]["overall"]), (
        "MLflow holds eval.json's value"
    )


@pytest.mark.parametrize(
    "content,message",
    [
        ("unknown_word", "unknown shape word 'hexagon'"),
        ("corrupt", "not a readable Parquet file"),
        ("empty", "no prompts"),
    ],
)
def test_bad_prompt_files_fail_before_anything_is_written(tmp_path, content, message):
    """The command's own entry in this process (tests.conftest.leapalign_main): the checks run before torch,
    Ray or MLflow do anything, so no child process is needed to see them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    bad = tmp_path / "prompts.parquet"
    if content == "unknown_word":
        pq.write_table(
            pa.table({"prompt": ["a red hexagon"], "category": ["single_object"], "seed": [1]}), bad
        )
    elif content == "corrupt":
        bad.write_bytes(b"PAR1 this is not parquet")
    else:
        pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), bad)
    out, db = tmp_path / "run", tmp_path / "mlflow.db"
    for key in ("train.prompts", "eval.prompts"):
        code, stderr = leapalign_main(*quickstart_args(out, db, f"{key}={bad}"))
        assert code == 2, f"{key}: exit {code}: {stderr[-800:]}"
        assert message in stderr, f"{key}: expected {message!r} in {stderr[-800:]!r}"
        assert not out.exists() and not db.exists(), f"{key}: nothing may be written for a bad prompt file"
