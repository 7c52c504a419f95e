"""Throughput of `leapalign embed` and `leapalign eval` on Ray Data with 1 and 2 actors, side by side, on the
miniature world's Flux (platform/leapalign/assets/mini-flux) and the quickstart's settings (32 px, 12 steps,
the world's judge and the served learned scorer).

    .venv/bin/python bench/data_throughput.py                      # 16384 prompts to embed, 384 images to sample
    .venv/bin/python bench/data_throughput.py --prompts 2048 --images 64

One private Ray cluster on 127.0.0.1 for all runs; each run is a whole job (actors started, models loaded,
work, cache or tables written), as a user's command pays it. One torch thread per actor; 1 actor reserves 1 CPU,
2 actors 0.75 each, the served reward's replica 0.5 (2 CPUs in all). The one-process row is the same work in
this process with one torch thread (what `leapalign embed` / `leapalign eval` without --actors do). Prints the
machine's load (uptime) before and after: on a shared 2-core machine the ratios are what to read.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from leapalign.config import load_config, with_overrides
from leapalign.data import load_prompts, resolve_data_path, resolve_model_path
from leapalign.distributed.data_jobs import ActorResources, run_embed_job, run_eval_job
from leapalign.distributed.ray_train import connect_ray
from leapalign.distributed.reward_service import ensure_reward_service
from leapalign.evaluation import evaluate_weights, plan_eval
from leapalign.numerics import use_cpu_isa
from leapalign.text_cache import plan_text_cache, write_text_cache

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "experiments" / "quickstart.yaml"


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16384, help="unique prompts to embed")
    parser.add_argument(
        "--images", type=int, default=384, help="images to sample and score (world eval prompts)"
    )
    parser.add_argument("--skip-local", action="store_true", help="no one-process row")
    args = parser.parse_args()

    overrides = ["tracking.enabled=false", "train.torch_threads=1", "reward.cpus_per_replica=0.5",
                 "eval.batch_size=8"]  # fmt: skip
    cfg = load_config(QUICKSTART, overrides)
    use_cpu_isa(cfg.train.cpu_isa)
    torch.set_num_threads(1)
    model = resolve_model_path(cfg.model.path)
    # The world's training captions repeat (6000 lines, 573 unique): numbered, every prompt is encoded.
    world = list(dict.fromkeys(load_prompts(cfg.train.prompts)))
    prompts = [f"{world[i % len(world)]} {i}" for i in range(args.prompts)]
    eval_prompts = str(resolve_data_path(cfg.eval.prompts))
    print(f"load before: {uptime()}")
    rows: list[tuple[str, str, int, float, float]] = []
    with tempfile.TemporaryDirectory() as tmp:

        def embed_plan(name: str):
            return plan_text_cache(
                prompts, Path(tmp) / name, model_path=model, revision=None,
                max_sequence_length=cfg.model.max_sequence_length, dtype=torch.float32, sources=["bench"],
                shard_size=256,
            )  # fmt: skip

        plan = plan_eval(
            cfg, ["base"], eval_prompts, ["world", "clip_score"], args.images, build_rewards=False
        )
        if not args.skip_local:
            from leapalign.models.flux import FluxPolicy

            started = time.perf_counter()
            policy = FluxPolicy.from_pretrained(model, dtype="float32", device="cpu")

            def encode(batch):
                cond = policy.encode_prompts(batch, cfg.model.max_sequence_length)
                return cond.prompt_embeds, cond.pooled_prompt_embeds

            p = embed_plan("local")
            write_text_cache(
                encode, p.prompts, p.out_dir, model_path=model, revision=None,
                max_sequence_length=cfg.model.max_sequence_length, dtype=torch.float32, sources=["bench"],
                shard_size=256,
            )  # fmt: skip
            rows.append(("embed", "1 process", len(prompts), time.perf_counter() - started, float("nan")))
            started = time.perf_counter()
            local = plan_eval(cfg, ["base"], eval_prompts, ["world", "clip_score"], args.images)
            evaluate_weights(cfg, local, 0, Path(tmp) / "eval-local")
            rows.append(("eval", "1 process", args.images, time.perf_counter() - started, float("nan")))

        connect_ray(cfg)  # one cluster for every Ray Data run (the jobs reuse it)
        ensure_reward_service(with_overrides(cfg, {"reward.name": "clip_score"}))  # deployed once, reused
        for job in ("embed", "eval"):
            for actors in (1, 2):
                resources = ActorResources(actors, 1.0 if actors == 1 else 0.75)
                landed: list[tuple[float, int]] = []
                started = time.perf_counter()
                record = lambda n, landed=landed: landed.append((time.perf_counter(), n))  # noqa: E731
                if job == "embed":
                    run_embed_job(cfg, embed_plan(f"ray{actors}"), batch_size=32, resources=resources,
                                  progress=False, on_result=record)  # fmt: skip
                else:
                    run_eval_job(cfg, plan, resources=resources, progress=False, on_result=record)
                wall = time.perf_counter() - started
                # Steady state: the items after the first result, over the time since it (actors up, models in).
                steady = sum(n for _, n in landed[1:]) / max(landed[-1][0] - landed[0][0], 1e-9)
                items = sum(n for _, n in landed)
                rows.append((job, f"{actors} actor(s)", items, wall, steady))
    print(f"load after: {uptime()}")
    print(f"cores: {os.cpu_count()}, torch threads per actor: 1")
    print("items/s: the whole job (start-up, model loads, writing); steady/s: after the first result lands")
    print(
        f"{'job':<6} {'where':<12} {'items':>6} {'wall s':>8} {'items/s':>9} {'steady/s':>9} {'x 1 actor':>10}"
    )
    for job, where, items, seconds, steady in rows:
        one = next(r[4] for r in rows if r[0] == job and r[1] == "1 actor(s)")
        print(
            f"{job:<6} {where:<12} {items:>6} {seconds:>8.1f} {items / seconds:>9.2f} {steady:>9.2f} "
            f"{steady / one:>10.2f}"
        )


if __name__ == "__main__":
    main()
