"""`leapalign sweep` and `leapalign compare` end to end on a real local Ray cluster, a real MLflow store and
the tiny Flux: one ASHA sweep killed and resumed (nested MLflow runs, ASHA's cuts, nothing rerun,
the exported best config), the tuned comparison and its report, bad specs. About 3.5 minutes on two cores
(most of it starting Ray Train workers).
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from leapalign.reports import read_metrics
from tests.conftest import REPO, leapalign_main

ITERATIONS = 6


def base_overrides(tiny_flux_dir: Path, tmp: Path) -> dict:
    return {
        "model.path": str(tiny_flux_dir),
        "eval.prompts": "assets/prompts/world/validation.parquet",  # searches select on validation prompts
        "eval.every": 2,
        "eval.every_num_prompts": 4,
        "eval.batch_size": 4,
        "train.iterations": ITERATIONS,
        "train.checkpoint_every": 2,
        "sampler.eval_num_steps": 2,
        "train.num_samples": 1,
        "train.torch_threads": 1,
        "ray.cpus_per_worker": 0.9,
        "reward.serve": False,  # the colour reward in each trial: two trials at a time on 2 CPUs (serving: its own tests)
        "tracking.uri": f"sqlite:///{tmp}/mlflow.db",
        "tracking.experiment": "experiments-test",
    }


def write_spec(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def sweep_spec(tiny_flux_dir: Path, tmp: Path, **extra) -> Path:
    spec = {
        "name": "tiny_sweep",
        "base": str(REPO / "experiments" / "tiny_demo.yaml"),
        "overrides": base_overrides(tiny_flux_dir, tmp),
        "search": {
            "leap.distribution": {"choice": ["uniform", "beta"]},
            "method.leapalign.alpha": {"uniform": [0.0, 1.0]},
            "leap.beta_a": {"uniform": [0.5, 3.0], "when": {"leap.distribution": "beta"}},
            "optim.lr": {"loguniform": [1e-3, 3e-2]},
        },
        "searcher": "random",
        "num_samples": 3,
        "metric": "eval/reward/color_match",
        "mode": "max",
        "scheduler": {"name": "asha", "grace_period": 2, "reduction_factor": 2},
        "seed": 3,
        **extra,
    }
    return write_spec(tmp / "sweep.yaml", spec)


def leapalign(*args: str, timeout: float = 900, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "leapalign", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def mlflow_runs(tmp: Path):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    experiment = client.get_experiment_by_name("experiments-test")
    return client, client.search_runs([experiment.experiment_id]) if experiment else []


def terminated_trials(out: Path) -> list[str]:
    """Trials Tune's newest saved experiment state marks TERMINATED (what a resumed sweep keeps)."""
    states = sorted((out / "tune" / "trials").glob("experiment_state-*.json"))
    if not states:
        return []
    try:
        data = json.loads(states[-1].read_text())
    except (json.JSONDecodeError, OSError):  # caught mid-write
        return []
    trials = [json.loads(entry[0]) for entry in data["trial_data"]]
    return [t["trial_id"] for t in trials if t.get("status") == "TERMINATED"]


def last_write(folder: Path) -> float:
    """The newest modification time of any file in a trial's run folder (a rerun would rewrite them)."""
    return max(path.stat().st_mtime for path in folder.rglob("*") if path.is_file())


def trial_folders(out: Path) -> list[str]:
    return sorted(folder.name for folder in (out / "runs").iterdir() if folder.is_dir())


def eval_curve(folder: Path) -> dict[int, float]:
    """The trial's held-out metric by step, from its metrics.jsonl (ASHA's input)."""
    metric = "eval/reward/color_match"
    return {record["step"]: record[metric] for record in read_metrics(folder) if metric in record}


def last_step(folder: Path) -> int:
    return max(record["step"] for record in read_metrics(folder))


def asha_replay(out: Path, last_steps: dict[str, int]) -> dict[str, int]:
    """Where each trial must stop, by ASHA's rule (mode max, reduction factor 2) replayed in the order the
    saved rungs recorded the trials, over the kill: a trial is cut at the first rung where its value is
    below the median of the trials recorded there before it. The rung values must be the trials' own
    logged metrics, and every trial must be in the first rung (a resumed ASHA that lost its rungs would
    not hold the trials that reached it before the kill)."""
    import numpy as np

    state = pickle.loads((out / "tune" / "asha_state.pkl").read_bytes())
    (bracket,) = state["_brackets"]
    rungs = sorted(bracket._rungs, key=lambda rung: rung[0])
    assert [milestone for milestone, _ in rungs] == [2, 4], f"rungs at steps 2 and 4: {rungs}"
    assert sorted(rungs[0][1]) == sorted(last_steps), f"every trial reached the first rung: {rungs[0][1]}"
    stop_at = dict.fromkeys(last_steps, ITERATIONS)
    for milestone, recorded in rungs:
        seen: list[float] = []
        for trial, value in recorded.items():  # insertion order: the order ASHA decided in
            assert value == eval_curve(out / "runs" / trial)[milestone], f"{trial}: rung value vs its log"
            if seen and value < np.nanpercentile(seen, 50) and stop_at[trial] == ITERATIONS:
                stop_at[trial] = milestone
            seen.append(value)
    for milestone, recorded in rungs[1:]:
        cut_before = [trial for trial in recorded if stop_at[trial] < milestone]
        assert not cut_before, f"trials cut before step {milestone} are not in its rung: {cut_before}"
    return stop_at


def test_killed_asha_sweep_resumes_with_nested_runs_and_a_reproducible_best_config(tiny_flux_dir, tmp_path):
    """One sweep, killed (driver and its private cluster) once Tune has recorded a finished trial, then run
    again: finished trials are not rerun, each trial is one nested MLflow run with each step once, ASHA
    cut exactly the trials its rule cuts (replayed over the kill), the results table and plots are
    written, and the exported best config trained again without Ray reproduces its trial's metric."""
    spec = sweep_spec(tiny_flux_dir, tmp_path)
    # One trial at a time: the trials reach ASHA's rungs in a fixed order. Which of them are cut still
    # depends on the machine's numerics (and on none at all where the values happen to rise), so the test
    # replays ASHA's rule on the logged values; tests/unit/test_tune_scheduler.py has a cut for certain.
    values = yaml.safe_load(spec.read_text())
    values["overrides"]["ray.cpus_per_worker"] = 1.5
    write_spec(spec, values)
    out = tmp_path / "sweep"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "leapalign", "sweep", str(spec), "--out", str(out)]
    driver = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)  # fmt: skip
    finished: dict[str, float] = {}
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not finished:  # kill once Tune has recorded a finished trial
            finished = {trial: last_write(out / "runs" / trial) for trial in terminated_trials(out)}
            assert driver.poll() is None, "the sweep ended before it could be interrupted"
            time.sleep(1)
        assert finished, "no trial finished within 10 minutes"
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the private cluster it started
        driver.wait(timeout=60)
    proc = leapalign("sweep", str(spec), "--out", str(out))
    assert proc.returncode == 0, f"resumed sweep failed: {proc.stderr[-3000:]}"
    assert "ASHA: rungs restored" in proc.stderr, "the resumed sweep's ASHA continues from the saved rungs"
    for trial, mtime in finished.items():
        assert last_write(out / "runs" / trial) == mtime, f"finished trial {trial} ran again"

    client, runs = mlflow_runs(tmp_path)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.run_name == "tiny_sweep", (
        f"one parent run, reused: {parents}"
    )
    assert len(children) == 3, f"one nested run per trial, no duplicates: got {len(children)}"
    assert all(c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for c in children), "nesting"
    steps = {}
    for child in children:
        assert "method.leapalign.alpha" in child.data.params, "the trial's resolved config is logged"
        history = client.get_metric_history(child.info.run_id, "eval/reward/color_match")
        points = [m.step for m in history]
        assert points == sorted(set(points)) and points[0] == 0, f"a curve with each step once: {points}"
        losses = sorted(m.step for m in client.get_metric_history(child.info.run_id, "loss"))
        assert losses == list(range(1, losses[-1] + 1)), f"each step logged once: {losses}"
        steps[child.info.run_id] = losses[-1]
    assert max(steps.values()) == ITERATIONS, f"some trial runs to the end: {steps}"
    last_steps = {trial: last_step(out / "runs" / trial) for trial in trial_folders(out)}
    # (A cut trial's last update can miss one of its records, MLflow's or the folder's: it was killed.)
    assert len(last_steps) == len(steps), f"one run folder per trial: {sorted(last_steps)}"
    cut_at = asha_replay(out, last_steps)
    decided = pickle.loads((out / "tune" / "asha_state.pkl").read_bytes())["_stopped"]
    assert decided == {trial for trial, step in cut_at.items() if step < ITERATIONS}, (
        f"ASHA cut the trials its rule, replayed over the kill, cuts: {decided} vs {cut_at}"
    )
    for trial, last in last_steps.items():
        # A cut trial stops once the decision reaches its workers: on the tiny model that can be after its
        # last update. A trial that is not cut runs to the end.
        assert last >= cut_at[trial] and (last == ITERATIONS or cut_at[trial] < ITERATIONS), (
            f"each trial runs at least to where ASHA cut it: ran to {last_steps}, cut at {cut_at}"
        )

    import pyarrow.parquet as pq

    table = pq.read_table(out / "report" / "results.parquet").to_pylist()
    assert len(table) == 3 and len({row["trial_id"] for row in table}) == 3, "every trial once in the table"
    for row in table:
        stopped = last_steps[row["trial_id"]] < ITERATIONS
        assert row["stopped_early"] == stopped, f"the table marks the stopped trials: {row}"
    for row in table:
        if row["leap.distribution"] == "uniform":
            assert row["leap.beta_a"] is None, "a conditional key is only applied where its condition holds"
    assert (out / "report" / "curves.png").stat().st_size > 1000, "curves of all trials"
    assert (out / "report" / "metric_vs_method_leapalign_alpha.png").is_file(), "metric vs each swept key"
    parent_artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"best.yaml", "report"} <= parent_artifacts, f"logged to the parent run: {parent_artifacts}"

    # The exported best config, trained again (no Ray, same seed), reproduces its trial's metric.
    best_row = json.loads(proc.stdout.split("best trial: ", 1)[1].splitlines()[0])
    code, err = leapalign_main("train", str(out / "best.yaml"), "ray.enabled=false", "tracking.enabled=false",
                               f"train.output_dir={tmp_path / 'again'}")  # fmt: skip
    assert code == 0, err[-2000:]
    records = [json.loads(line) for line in (tmp_path / "again" / "metrics.jsonl").read_text().splitlines()]
    final = [r["eval/reward/color_match"] for r in records if "eval/reward/color_match" in r][-1]
    assert final == pytest.approx(best_row["final/eval/reward/color_match"], rel=1e-6, abs=1e-7), (
        f"best config again: {final} vs its trial {best_row}"
    )


def test_tuned_compare_end_to_end(tiny_flux_dir, tmp_path):
    """Tune each method on the validation prompts, run the chosen configs on the test prompts, report."""
    spec = {
        "name": "tiny_compare",
        "base": str(REPO / "experiments" / "tiny_demo.yaml"),
        "overrides": {
            **base_overrides(tiny_flux_dir, tmp_path),
            "train.iterations": 100,
            "eval.every": 0,
            "eval.every_nfe": 150,
            "eval.prompts": "assets/prompts/world/eval.parquet",
            # Relative, as in the shipped configs: resolved against the command's folder, not the trial's
            # (tuning trials build their configs inside Tune's trial folders).
            "tracking.uri": "sqlite:///mlflow.db",
        },  # fmt: skip
        "budget_nfe": 400,
        "seeds": [0],  # the statistics over seeds are checked by hand in tests/unit/test_comparison.py
        "metric": "eval/overall",
        "runs": {
            "LeapAlign": {"method.name": "leapalign"},
            "GRPO": {"method.name": "grpo", "method.grpo.group_size": 2, "train.batch_size": 1},
        },
        "tune": {
            "trials": 1,
            "prompts": "assets/prompts/world/validation.parquet",
            "budget_nfe": 200,
            "space": {"optim.lr": {"loguniform": [1e-3, 1e-2]}},
            "per_run": {"GRPO": {"method.grpo.clip_range": {"loguniform": [1e-4, 1e-2]}}},
        },
    }
    out = tmp_path / "compare"
    proc = leapalign(
        "compare", str(write_spec(tmp_path / "compare.yaml", spec)), "--out", str(out), cwd=tmp_path
    )
    assert proc.returncode == 0, f"compare failed: {proc.stderr[-3000:]}"
    chosen = json.loads((out / "tuning" / "chosen.json").read_text())
    assert set(chosen["chosen"]) == {"LeapAlign", "GRPO"}, f"one choice per method: {chosen}"
    assert set(chosen["chosen"]["GRPO"]) == {"optim.lr", "method.grpo.clip_range"}, "GRPO's own space"
    for trial in chosen["trials"]:
        cfg = yaml.safe_load((out / "tuning" / "runs" / trial["trial_id"] / "config.yaml").read_text())
        assert cfg["eval"]["prompts"].endswith("validation.parquet") and cfg["train"]["seed"] == 1000, (
            "tuning trials score on the validation split with the tuning seed"
        )
    finals = list((out / "runs").iterdir())
    assert len(finals) == 2, f"2 methods x 1 seed: {finals}"
    for run in finals:
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        label = "GRPO" if cfg["method"]["name"] == "grpo" else "LeapAlign"
        assert cfg["optim"]["lr"] == pytest.approx(chosen["chosen"][label]["optim.lr"]), "the chosen lr"
        assert cfg["eval"]["prompts"].endswith("eval.parquet"), "final runs report on the test split"
        last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
        assert budget_reached(last["compute/nfe_total"], 400), f"{run.name}: stops on crossing the budget"
        assert (run / "heldout" / f"step_{last['step']:06d}.parquet").is_file(), "per-image final results"
    report = (out / "report" / "report.md").read_text()
    for fragment in (
        "| LeapAlign |",
        "| GRPO |",
        "(1) |",
        "Δ vs LeapAlign",
        "## Tuning",
        "Failed or missing runs: none.",
    ):
        assert fragment in report, f"report lacks {fragment!r}:\n{report}"
    for name in ("curves.png", "samples.png"):
        assert (out / "report" / name).stat().st_size > 1000, f"{name} missing"
    client, runs = mlflow_runs(tmp_path)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 4, (
        f"one nested MLflow run per tuning trial and per method x seed: {len(children)}"
    )


def budget_reached(total: float, budget: float) -> bool:
    return budget <= total < budget + 2 * 2 * 14 * 2


@pytest.mark.parametrize(
    "case,change,message",
    [
        ("unknown key", {"search": {"leap.shape": {"choice": [1, 2]}}}, "unknown config key(s) leap.shape"),
        ("inverted range", {"search": {"optim.lr": {"uniform": [0.1, 0.01]}}}, "empty or inverted"),
        ("empty choice", {"search": {"leap.distribution": {"choice": []}}}, "non-empty list"),
        ("bad value", {"search": {"method.leapalign.alpha": {"uniform": [0.5, 2.0]}}}, "outside [0, 1]"),
        ("unknown searcher", {"searcher": "bayes"}, "unknown searcher 'bayes'"),
        ("unknown scheduler", {"scheduler": {"name": "pbt"}}, "unknown scheduler"),
        ("never reported", {"metric": "eval/position"}, "never reported"),
        ("test split", {}, "is the reported test split"),
    ],
)
def test_bad_sweep_specs_fail_before_any_trial(tiny_flux_dir, tmp_path, case, change, message):
    spec_path = sweep_spec(tiny_flux_dir, tmp_path)
    spec = yaml.safe_load(spec_path.read_text())
    spec.update(change)
    if case == "never reported":
        spec["overrides"]["eval.prompts"] = None
    if case == "test split":
        spec["overrides"]["eval.prompts"] = "assets/prompts/world/eval.parquet"
    write_spec(spec_path, spec)
    out = tmp_path / "sweep"
    code, stderr = leapalign_main("sweep", str(spec_path), "--out", str(out))
    assert code == 2, f"{case}: exit {code}: {stderr[-800:]}"
    assert message in stderr and "Traceback" not in stderr, f"{case}: {stderr[-800:]}"
    assert not out.exists() and not (tmp_path / "mlflow.db").exists(), f"{case}: nothing may be written"


@pytest.mark.parametrize(
    "case,change,message",
    [
        ("unknown method", {"runs": {"X": {"method.name": "dpo"}}}, "method.name='dpo'"),
        (
            "unknown option",
            {"runs": {"X": {"method.grpo.clipp": 1}}},
            "unknown config key(s) method.grpo.clipp",
        ),
        ("budget too small", {"budget_nfe": 3}, "cannot fit one update"),
        ("no prompts", {"overrides": {"train.prompts": "EMPTY"}}, "holds no prompts"),
    ],
)
def test_bad_compare_specs_fail_before_anything(tiny_flux_dir, tmp_path, case, change, message):
    spec = {
        "name": "bad",
        "base": str(REPO / "experiments" / "tiny_demo.yaml"),
        "overrides": {
            **base_overrides(tiny_flux_dir, tmp_path),
            "train.iterations": 100,
            "eval.every_nfe": 100,
        },
        "budget_nfe": 1000,
        "runs": {"LeapAlign": {"method.name": "leapalign"}},
    }
    if case == "no prompts":
        empty = tmp_path / "empty.txt"
        empty.write_text("\n")
        change = {"overrides": {**spec["overrides"], "train.prompts": str(empty)}}
    spec.update(change)
    out = tmp_path / "compare"
    spec_path = write_spec(tmp_path / "compare.yaml", spec)
    code, stderr = leapalign_main("compare", str(spec_path), "--out", str(out))
    assert code == 2, f"{case}: exit {code}: {stderr[-800:]}"
    assert message in stderr and "Traceback" not in stderr, f"{case}: {stderr[-800:]}"
    assert not out.exists() and not (tmp_path / "mlflow.db").exists(), f"{case}: nothing may be written"
