"""Scale out on a real local Ray cluster (127.0.0.1, 2 CPUs, gloo) with the tiny Flux.

Global random streams make N workers with batch B compute what one process with batch N x B computes:
FSDP2 (full fine-tuning) and DDP (LoRA) with 2 workers give the losses and trained weights of the single
process with the combined batch, for LeapAlign and for GRPO (Flow-GRPO, DanceGRPO); a DCP checkpoint written by 2 FSDP2 workers resumes on 1 worker and then
on 2 again with the numbers of an uninterrupted run, each MLflow step logged once; a NaN reward on one
rank skips the step on every rank without a hang.

Tolerances: the batch is split across processes, so sums are taken in another order. Losses agree to
rtol 1e-5 (seen: 1.5e-7). Weights agree to atol 1e-4: AdamW's first step moves each weight by lr x
sign(grad) (lr = 3e-3 here), so a weight whose gradient is rounding noise may move either way; a real
mismatch (another batch, unsynced gradients) moves thousands of weights by ~lr.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from leapalign.distributed.ray_train import run_on_ray
from leapalign.streams import PromptOrder
from leapalign.train import train
from tests.conftest import local_ray, start_in_thread
from tests.integration.test_ray_train import metric_steps, only_run, tiny_cfg

# One test process for the whole module: its Ray cluster is module-scoped (scripts/test.sh: --dist loadgroup).
pytestmark = pytest.mark.xdist_group("test_scale_out")

LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-4
# Reward built in each worker (no Ray Serve deployment to start): the numbers do not depend on it.
LOCAL_REWARD = {"reward.serve": "false"}
FULL = {"finetune.mode": "full", **LOCAL_REWARD}
LORA = {"finetune.mode": "lora", **LOCAL_REWARD}
# Held-out evaluation before the first update and after the last: 3 world prompts, one per sampling unit.
HELD_OUT = {"eval.prompts": "assets/prompts/demo.txt", "eval.every": 100, "eval.every_num_prompts": 3,
            "eval.batch_size": 1}  # fmt: skip
GRPO = {"method.name": "grpo", "method.grpo.group_size": 2, "method.grpo.updates_per_rollout": 2}


@pytest.fixture(scope="module")
def ray_cluster():
    with local_ray() as context:  # its controllers notice a dead worker within 0.2 s, as on connect_ray's
        yield context


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def single_process(tiny_flux_dir: Path, tmp: Path, **extra) -> list[dict[str, float]]:
    """The reference: one process (no Ray, no torch.distributed) with the combined batch."""
    cfg = tiny_cfg(tiny_flux_dir, tmp, **{"tracking.enabled": "false", **extra})
    return train(cfg, progress=False).history


def weights_in(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    assert len(files) == 1, f"{folder}: expected one safetensors file, found {files}"
    return load_file(files[0])


def assert_same_weights(got: dict, want: dict, label: str) -> None:
    assert sorted(got) == sorted(want), f"{label}: exported tensor names differ"
    diff = max((got[k] - want[k]).abs().max().item() for k in want)
    assert diff <= WEIGHT_ATOL, f"{label}: trained weights differ from the single process by up to {diff}"


# ----------------------------------------------------------------------------- 1. equivalence


@pytest.mark.parametrize(
    ("mode", "extra", "weights"),
    # Two micro-batches per update: gradients cross ranks only in the second one's backward (DDP no_sync,
    # FSDP2 set_requires_gradient_sync(False)); FSDP2 also with gradient checkpointing in the blocks.
    [
        # (FSDP2 full fine-tuning with LeapAlign: the resharded-resume test below, from its first steps.)
        ("ddp", {**LORA, "train.grad_accum": 2}, "lora"),
        # GRPO: plan, SDE noise and PPO shuffle drawn for the global batch; DanceGRPO's per-sample step
        # subsets leave the ranks different samples at each step, micro-batches of 1 different call counts.
        ("ddp", {**LORA, **GRPO, "method.grpo.variant": "flow_grpo"}, "lora"),
        ("fsdp2", {**FULL, **GRPO, "method.grpo.variant": "dance_grpo", "method.grpo.sde": "dance_grpo",
                   "method.grpo.noise_level": 0.3, "method.grpo.micro_batch": 1}, "transformer"),
    ],
    ids=["ddp-lora", "ddp-lora-flow_grpo", "fsdp2-full-dance_grpo"],
)  # fmt: skip
def test_two_workers_equal_one_process_with_the_combined_batch(
    ray_cluster, tiny_flux_dir, tmp_path, mode, extra, weights
):
    """Also the held-out evaluation split across the 2 ranks (DDP and FSDP2): its per-image table at step 0
    (base weights) equals the one process's bit for bit."""
    steps = 2
    # 3 held-out units of 1 prompt: rank 0 samples 2, rank 1 one (plus a padding call under FSDP2).
    extra = {**extra, **HELD_OUT}
    reference = single_process(
        tiny_flux_dir, tmp_path / "one", **{**extra, "train.iterations": steps, "train.batch_size": 2}
    )
    cfg = tiny_cfg(
        tiny_flux_dir,
        tmp_path / "two",
        **{
            **extra,
            "train.iterations": steps,
            "train.batch_size": 1,
            "ray.num_workers": 2,
            "train.checkpoint_every": 1,
            "train.keep_checkpoints": steps,
            "tracking.enabled": "false",
        },
    )
    started = time.monotonic()
    result = run_on_ray(cfg)
    print(f"{mode}: 2 workers, {steps} steps in {time.monotonic() - started:.1f}s")

    assert result.metrics["step"] == steps, f"{mode}: last reported step {result.metrics}"
    logged = jsonl(tmp_path / "two" / "run" / "metrics.jsonl")
    records = [r for r in logged if r["step"] > 0]  # step 0: the base model's held-out evaluation
    for key in ("loss", "reward/mean", "grad_norm"):
        got, want = [r[key] for r in records], [m[key] for m in reference]
        # abs: GRPO's PPO loss is a mean of group-centred advantages, zero up to rounding in its first update
        assert got == pytest.approx(want, rel=LOSS_RTOL, abs=1e-7), (
            f"{mode} {key}: 2 workers {got} vs 1 process {want}"
        )
    got = weights_in(tmp_path / "two" / "run" / weights)
    want = weights_in(tmp_path / "one" / "run" / weights)
    assert_same_weights(got, want, mode)
    split = pq.read_table(tmp_path / "two" / "run" / "heldout" / "step_000000.parquet")
    whole = pq.read_table(tmp_path / "one" / "run" / "heldout" / "step_000000.parquet")
    assert split.num_rows == 3 and split.equals(whole), (
        f"{mode}: held-out results gathered from 2 ranks {split.to_pydict()} vs one process {whole.to_pydict()}"
    )
    evals = [r["step"] for r in logged if "eval/reward/color_match" in r]
    assert evals == [0, steps], f"{mode}: held-out evaluations logged at steps {evals}, want 0 and {steps}"

    # Each checkpoint is one DCP folder holding the weights, the optimizer state and the EMA, with the train
    # state of the 2-rank run. FSDP2 saves every weight as 2 row shards (one per rank); DDP's replicated
    # weights are saved whole, once.
    import torch.distributed.checkpoint as dcp

    folder = Path(result.checkpoint_path)
    assert folder.name == f"checkpoint_{steps:06d}", f"{mode}: newest checkpoint {folder}"
    for step in range(1, steps + 1):
        kept = folder.parent / f"checkpoint_{step:06d}"
        assert (kept / ".metadata").is_file(), f"{mode}: {kept} is not a DCP checkpoint"
        state = torch.load(kept / "train_state.pt", weights_only=True)
        assert state["step"] == step and state["world_size"] == 2, f"{kept}: train state {state}"
        keys = dcp.FileSystemReader(str(kept)).read_metadata().state_dict_metadata
        for prefix in ("model.", "optim.state.", "ema."):
            assert any(k.startswith(prefix) for k in keys), f"{kept}: no {prefix}* tensors in the checkpoint"
    metadata = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    chunks = [len(v.chunks) for k, v in metadata.items() if k.startswith("model.") and hasattr(v, "chunks")]
    assert chunks, f"{folder}: no weights in the checkpoint"
    if mode == "fsdp2":
        sharded = sum(c == 2 for c in chunks) / len(chunks)
        assert sharded > 0.9, f"fsdp2: only {sharded:.0%} of the weights were saved as 2 shards"
    else:
        assert set(chunks) == {1}, f"ddp: replicated weights are saved whole, got chunk counts {set(chunks)}"


# ----------------------------------------------------------------------------- 2. resharded resume


def test_fsdp2_checkpoint_resumes_on_one_worker_and_on_two(ray_cluster, tiny_flux_dir, tmp_path):
    """FSDP2 full fine-tuning with two micro-batches per update (gradients cross ranks only in the second
    one's backward) and gradient checkpointing in the blocks: 2 workers for steps 1-2 equal one process
    with the combined batch; their sharded DCP checkpoint resumes on 1 worker, and that one's on 2 again."""
    steps = 4
    sharded = {**FULL, "train.grad_accum": 2, "finetune.gradient_checkpointing": "true"}
    reference = single_process(
        tiny_flux_dir, tmp_path / "whole", **{**sharded, "train.iterations": steps, "train.batch_size": 2}
    )
    common = {**sharded, "train.checkpoint_every": 1, "train.keep_checkpoints": 5}
    two = {"ray.num_workers": 2, "train.batch_size": 1}  # global batch 2 throughout
    one = {"ray.num_workers": 1, "train.batch_size": 2}
    # 2 workers (fsdp2) steps 1-2 -> 1 worker (no sharding) step 3 -> 2 workers (fsdp2) step 4.
    for iterations, workers, resume in ((2, two, "false"), (3, one, "true"), (4, two, "true")):
        cfg = tiny_cfg(
            tiny_flux_dir,
            tmp_path,
            **{**common, **workers, "train.iterations": iterations, "train.resume": resume},
        )
        result = run_on_ray(cfg)
        assert result.metrics["step"] == iterations, f"run to {iterations} ended at {result.metrics}"

    client, run = only_run(tmp_path)
    assert run.info.status == "FINISHED", f"the one MLflow run ends FINISHED, not {run.info.status}"
    resumes = metric_steps(client, run.info.run_id, "ray/resumed_from_step")
    assert resumes == [(2, 2.0), (3, 3.0)], f"expected resumes from step 2 (2 -> 1) and 3 (1 -> 2): {resumes}"
    for key in ("loss", "grad_norm"):
        logged = metric_steps(client, run.info.run_id, key)
        assert [s for s, _ in logged] == list(range(1, steps + 1)), f"{key}: MLflow steps {logged}, want 1..4"
        want = [m[key] for m in reference]
        assert [v for _, v in logged] == pytest.approx(want, rel=LOSS_RTOL), (
            f"{key}: resharded 2 -> 1 -> 2 {logged} vs uninterrupted single process {want}"
        )
    records = jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, steps + 1)), "metrics.jsonl holds each step once"
    assert_same_weights(
        weights_in(tmp_path / "run" / "transformer"), weights_in(tmp_path / "whole" / "run" / "transformer"),
        "resharded resume",
    )  # fmt: skip
    assert_same_weights(
        weights_in(tmp_path / "run" / "transformer_ema"),
        weights_in(tmp_path / "whole" / "run" / "transformer_ema"),
        "resharded resume (EMA)",
    )


# ----------------------------------------------------------------------------- 3. NaN on one rank


def test_nan_reward_on_rank_one_skips_the_step_on_every_rank(ray_cluster, tiny_flux_dir, tmp_path):
    # Four prompts; the one rank 1 draws at step 1 (global streams: the order is known in advance) is
    # poisoned: BrokenReward gives NaN for prompts containing "poison".
    clean = ["a red square", "a blue circle", "a green field", "a yellow sun"]
    ranks = [PromptOrder(clean, 1, seed=0, rank=r, world_size=2).next_batch()[0] for r in (0, 1)]
    prompts = ["poison " + p if p == ranks[1] else p for p in clean]
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(prompts) + "\n")
    cfg = tiny_cfg(
        tiny_flux_dir,
        tmp_path,
        **{
            **LORA,
            "reward.name": "tests.integration.broken_rewards:BrokenReward",
            "train.prompts": str(prompt_file),
            "train.iterations": 2,
            "train.batch_size": 1,
            "ray.num_workers": 2,
            "train.checkpoint_every": 2,
            "tracking.enabled": "false",
        },
    )
    started = time.monotonic()
    worker, outcome = start_in_thread(run_on_ray, cfg)
    worker.join(timeout=300)
    assert not worker.is_alive(), "a NaN reward on one rank hung the run (no result after 300 s)"
    assert "error" not in outcome, f"the run failed instead of skipping: {outcome.get('error')!r}"
    print(f"NaN run: {time.monotonic() - started:.1f}s")
    records = jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["skipped"] for r in records] == [1.0, 0.0], (
        f"step 1 (NaN on rank 1) skipped on every rank, step 2 applied: {records}"
    )
    assert "loss" in records[1] and "grad_norm" in records[1], f"step 2 trains normally: {records[1]}"
