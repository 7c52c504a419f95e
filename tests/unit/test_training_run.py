"""The shared training pieces on the tiny Flux, without Ray: local checkpoints and resume, run folders that
are never silently replaced, the compute budget, held-out evaluation during training."""

from __future__ import annotations

import json

import pytest

from leapalign.config import load_config
from leapalign.methods import update_nfe_range
from leapalign.train import train
from tests.conftest import TINY_CONFIG, leapalign_main, tiny_overrides

FAST = {"sampler.eval_num_steps": 2, "train.num_samples": 1}


def cfg_for(tiny_flux_dir, out_dir, **extra):
    return load_config(TINY_CONFIG, tiny_overrides(tiny_flux_dir, out_dir, **{**FAST, **extra}))


def jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# DiffusionNFT's old policy and AWM's EMA policy are weight copies in the checkpoint: with a fast decay ramp
# the losses after the resume depend on them (v_old, v_ema).
COPIES = {
    "nft": {"method.name": "nft", "method.nft.group_size": 2, "method.nft.decay_rate": 0.2},
    "awm": {"method.name": "awm", "method.awm.group_size": 2, "method.awm.decay_rate": 0.2},
}


@pytest.mark.parametrize("method", ["leapalign", "nft", "awm"])
def test_local_run_resumes_with_the_numbers_of_an_uninterrupted_run(tiny_flux_dir, tmp_path, method):
    extra = COPIES.get(method, {})
    whole = train(
        cfg_for(tiny_flux_dir, tmp_path / "whole", **{**extra, "train.iterations": 4}), progress=False
    )
    out = tmp_path / "halves"
    first = train(
        cfg_for(tiny_flux_dir, out, **{**extra, "train.iterations": 2, "train.checkpoint_every": 2}),
        progress=False,
    )
    assert (out / "checkpoints" / "step_000002.pt").is_file(), "a local run checkpoints at its last step"
    second = train(
        cfg_for(tiny_flux_dir, out, **{**extra, "train.iterations": 4, "train.resume": "true"}),
        progress=False,
    )
    losses = [m["loss"] for m in first.history + second.history]
    assert losses == [m["loss"] for m in whole.history], f"resumed {losses} vs uninterrupted {whole.history}"
    nfe = [m["compute/nfe_total"] for m in second.history]
    assert nfe == [m["compute/nfe_total"] for m in whole.history[2:]], (
        "cumulative compute survives the resume"
    )
    assert [r["step"] for r in jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4], (
        "metrics.jsonl holds each step once"
    )


def test_cli_resume_continues_one_mlflow_run(tiny_flux_dir, tmp_path):
    out, db = tmp_path / "run", tmp_path / "mlflow.db"
    common = [*tiny_overrides(tiny_flux_dir, out), "ray.enabled=false", "tracking.enabled=true"]
    common += [
        f"tracking.uri=sqlite:///{db}",
        "train.checkpoint_every=1",
        *(f"{k}={v}" for k, v in FAST.items()),
    ]
    code, stderr = leapalign_main("train", str(TINY_CONFIG), *common, "train.iterations=2")
    assert code == 0, stderr[-1500:]
    code, stderr = leapalign_main(
        "train", str(TINY_CONFIG), *common, "train.iterations=3", "train.resume=true"
    )
    assert code == 0, stderr[-1500:]
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("tiny-demo").experiment_id])
    assert len(runs) == 1, f"a resumed run continues its MLflow run: {len(runs)} runs"
    steps = sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "loss"))
    assert steps == [1, 2, 3], f"each step logged once: {steps}"


def test_an_existing_run_folder_is_refused_then_replaced_on_request(tiny_flux_dir, tmp_path):
    out = tmp_path / "run"
    base = [*tiny_overrides(tiny_flux_dir, out), "ray.enabled=false", "train.iterations=1"]
    base += [f"{k}={v}" for k, v in FAST.items()]
    assert leapalign_main("train", str(TINY_CONFIG), *base)[0] == 0
    (out / "notes.txt").write_text("mine")
    before = (out / "metrics.jsonl").read_text()
    code, stderr = leapalign_main("train", str(TINY_CONFIG), *base)
    assert code == 2 and "already holds a run" in stderr, stderr[-800:]
    assert "train.resume=true" in stderr and "train.overwrite=true" in stderr, "the message says how"
    assert (out / "metrics.jsonl").read_text() == before, "a refused run must not touch the old one"
    code, stderr = leapalign_main("train", str(TINY_CONFIG), *base, "train.overwrite=true", "train.seed=5")
    assert code == 0, stderr[-800:]
    assert (out / "notes.txt").read_text() == "mine", "overwrite removes the run's files only"
    assert load_config(out / "config.yaml").train.seed == 5, "the new run replaced the old one"


def test_compute_budget_stops_the_run(tiny_flux_dir, tmp_path):
    cfg = cfg_for(tiny_flux_dir, tmp_path / "run", **{"train.iterations": 50})
    per_update = update_nfe_range(cfg)[0]
    budget = int(2.5 * per_update)
    cfg = cfg_for(tiny_flux_dir, tmp_path / "run2", **{"train.iterations": 50, "train.max_nfe": budget})
    history = train(cfg, progress=False).history
    assert len(history) == 3, f"2.5 updates' budget: the third update crosses it, got {len(history)} updates"
    assert history[-1]["compute/nfe_total"] == 3 * per_update >= budget, f"{history[-1]['compute/nfe_total']}"


def test_held_out_evaluation_during_training(tiny_flux_dir, tmp_path):
    extra = {
        "train.iterations": 3,
        "eval.prompts": "assets/prompts/world/eval.parquet",
        "eval.every": 2,
        "eval.every_num_prompts": 6,
        "eval.final_num_prompts": 12,
        "eval.batch_size": 5,
    }
    out = tmp_path / "run"
    history = train(cfg_for(tiny_flux_dir, out, **extra), progress=False).history
    records = jsonl(out / "metrics.jsonl")
    evaluated = [r["step"] for r in records if "eval/overall" in r]
    assert evaluated == [0, 2, 3], f"before training, every 2 updates and at the end: {evaluated}"
    first = records[0]
    assert 0.0 <= first["eval/overall"] <= 1.0 and "eval/reward/color_match" in first, f"{first}"
    assert first["compute/nfe_total"] == 0.0, "the step-0 point is the base model at zero compute"
    assert "eval/overall" not in history[0], "step 1 is not an evaluation step"
    import pyarrow.parquet as pq

    curve = pq.read_table(out / "heldout" / "step_000002.parquet").to_pydict()
    final = pq.read_table(out / "heldout" / "step_000003.parquet").to_pydict()
    assert len(curve["prompt"]) == 6 and len(final["prompt"]) == 12, (
        "curve points on 6 prompts, the last on 12"
    )
    last = records[-1]
    assert "eval_final/image_accuracy" in last and "eval_final/overall" not in records[1], "only the last"
    first_six = sum(final["correct"][:6]) / 6
    assert last["eval/image_accuracy"] == pytest.approx(first_six), "the last curve point: its first 6 images"
    assert last["eval_final/image_accuracy"] == pytest.approx(sum(final["correct"]) / 12), "the final: all 12"
    assert last["eval/reward/color_match"] == pytest.approx(
        sum(final["reward/color_match"][:6]) / 6, rel=1e-6
    )


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_finetune_modes_checkpoint_and_resume(tiny_flux_dir, tmp_path, mode):
    extra = {"finetune.mode": mode, "train.checkpoint_every": 1}
    out = tmp_path / "run"
    train(cfg_for(tiny_flux_dir, out, **{"train.iterations": 1, **extra}), progress=False)
    resumed = train(
        cfg_for(tiny_flux_dir, out, **{"train.iterations": 2, "train.resume": "true", **extra}),
        progress=False,
    )
    whole = train(
        cfg_for(tiny_flux_dir, tmp_path / "whole", **{"train.iterations": 2, **extra}), progress=False
    )
    assert resumed.history[0]["loss"] == whole.history[1]["loss"], f"{mode}: step 2 after a resume"
