"""The held-out evaluation split across ranks (leapalign.evaluation.HeldOutEvaluator with a process group), in a
real 2-process gloo group on the tiny Flux: each rank samples its own share of the sampling units (rank 0
units 0 and 2, rank 1 unit 1), the gathered per-image results and metrics equal one rank's bit for bit, with
plain replicated weights (as under DDP) and with FSDP2-sharded weights (every forward a collective: the rank
with one unit fewer pads with a repeat, or the group would hang). The Ray Train path is tested end to end in
tests/integration/test_scale_out.py (2 workers, DDP and FSDP2: the same table as one process)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from leapalign.config import load_config
from leapalign.evaluation import HeldOutEvaluator
from leapalign.models.flux import FluxPolicy
from leapalign.parallel import LocalContext, Parallel, TorchDistContext
from leapalign.rewards.base import build_reward
from tests.conftest import TINY_CONFIG, free_port, tiny_overrides

# 3 world prompts, one per sampling unit: an odd count for 2 ranks.
HELD_OUT = {"eval.prompts": "assets/prompts/demo.txt", "eval.every": 1, "eval.every_num_prompts": 3,
            "eval.batch_size": 1, "sampler.eval_num_steps": 2}  # fmt: skip


def evaluate(model_dir: str, strategy: str, context) -> tuple[dict, dict, list, int]:
    torch.set_num_threads(1)
    cfg = load_config(TINY_CONFIG, tiny_overrides(Path(model_dir), Path(model_dir) / "unused", **HELD_OUT))
    policy = FluxPolicy.from_pretrained(model_dir, dtype="float32", device="cpu")
    parallel = Parallel(strategy, world_size=context.world_size, rank=context.rank)
    parallel.wrap(policy.transformer, policy.device)
    evaluator = HeldOutEvaluator(cfg, build_reward("color_match"), context, lockstep=parallel.sharded)
    metrics = evaluator(policy)
    return metrics, evaluator.last_images, evaluator.last_prompts, evaluator.last_share


def _rank(rank: int, port: int, model_dir: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        results = {s: evaluate(model_dir, s, TorchDistContext()) for s in ("none", "fsdp2")}
        Path(out, f"rank{rank}.pkl").write_bytes(pickle.dumps(results))
    finally:
        dist.destroy_process_group()


def test_held_out_evaluation_split_over_two_ranks_equals_one_rank(tiny_flux_dir, tmp_path):
    mp.start_processes(_rank, args=(free_port(), str(tiny_flux_dir), str(tmp_path)), nprocs=2,
                       start_method="spawn")  # fmt: skip
    one_metrics, one_images, one_prompts, one_share = evaluate(str(tiny_flux_dir), "none", LocalContext())
    assert one_share == 3 and len(one_prompts) == 3, f"one rank samples all 3 units: {one_share}"
    for rank, share in ((0, 2), (1, 1)):
        results = pickle.loads((tmp_path / f"rank{rank}.pkl").read_bytes())
        for strategy, (metrics, images, prompts, last_share) in results.items():
            label = f"rank {rank} of 2 ({strategy})"
            assert last_share == share, f"{label} sampled {last_share} units, its share is {share}"
            assert prompts == one_prompts, f"{label}: prompts {prompts} vs {one_prompts}"
            assert images == one_images, f"{label}: per-image results {images} vs one rank's {one_images}"
            assert metrics == one_metrics, f"{label}: metrics {metrics} vs one rank's {one_metrics}"
