"""A reward served by Ray Serve vs the same reward in process, measured side by side in one run.

    .venv/bin/python bench/reward_serving_overhead.py                    # ~10 min on 2 busy CPU cores
    .venv/bin/python bench/reward_serving_overhead.py --vision-layers 32 --threads 8   # the full tower

The scorer is leapalign.rewards.clip_score.ClipScore (differentiable resize + normalise, CLIPModel vision
tower, cosine with cached prompt embeddings) on a CLIP ViT-H/14-shaped model with random weights (width
1280, MLP 5120, 16 heads, patch 14, 224 px: 257 tokens per image) but only --vision-layers of its 32
blocks (default 1: on two CPU cores one block at batch 32 already takes seconds; the served path's added
cost does not depend on the depth, the compute grows with it, so fewer blocks overstate the overhead).

Part 1, latency: batch 1, 8 and 32 at 224 px, `score` (values) and `score_and_grad` (values and
d r / d image, then the worker's backward through the bridge). Calls alternate in process / served so
machine noise hits both alike; medians are reported. The replica gets the same torch threads as this
process (reward.cpus_per_replica = --threads) and batch_wait_ms=0 (one caller: a batch window would
only add latency). "replica compute" is the reward's own forward (+ backward) inside the replica;
"transport" = served - replica compute: tensor to numpy, input checks, Serve routing, object store,
the answer, the autograd glue. The same rows for a reward that costs nothing (brightness) give that
transport in absolute terms: what to compare with a GPU forward pass, which takes milliseconds.

Part 2, throughput: 1, 2 and 4 concurrent callers (threads here, one ServedReward each, like training
workers), each sending --calls `score` requests of --caller-batch images, against one replica with
batching (max_batch 32, batch_wait_ms 10) and without (max_batch 1: every request alone).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

# Ray binds to 127.0.0.1 only with this (read when ray is imported); no usage stats.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import ray  # noqa: E402
import torch  # noqa: E402
from ray import serve  # noqa: E402

from leapalign.config import RewardConfig, load_config  # noqa: E402
from leapalign.distributed.reward_service import ensure_reward_service, make_reward_fn, start_serve  # noqa: E402

WORDS = (
    "a red square two blue circles green triangle above cat yellow dog photo of white three magenta".split()
)


def build_clip_h_folder(out_dir: Path, vision_layers: int) -> Path:
    """A CLIP ViT-H/14-shaped CLIPModel (vision_layers of 32 blocks) with random weights, saved to out_dir."""
    from transformers import CLIPConfig, CLIPModel

    from leapalign.models.tiny import build_tokenizers

    tokenizer, _ = build_tokenizers()
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=1024, intermediate_size=4096, num_hidden_layers=2,
            num_attention_heads=16, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=vision_layers, num_attention_heads=16,
            image_size=224, patch_size=14,
        ),
        projection_dim=1024,
    )  # fmt: skip
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def prompts_for(batch: int) -> list[str]:
    return [f"a photo of {WORDS[i % len(WORDS)]} {WORDS[(3 * i + 1) % len(WORDS)]}" for i in range(batch)]


def call(reward_fn, images: torch.Tensor, prompts: list[str], mode: str) -> float:
    """One worker-side reward call (+ the backward through it for score_and_grad); seconds."""
    t0 = time.perf_counter()
    if mode == "score":
        reward_fn.score(images, prompts)
    else:
        pixels = images.clone().requires_grad_(True)
        reward_fn(pixels, prompts).sum().backward()
    return time.perf_counter() - t0


def serving_cfg(reward: str, options: dict, threads: int, **serving):
    overrides = [f"reward.name={reward}", f"reward.options={options}", f"reward.cpus_per_replica={threads}"]
    return load_config(None, overrides + [f"reward.{k}={v}" for k, v in serving.items()])


def latency(reward: str, options: dict, batches: list[int], repeats: int, threads: int) -> list[dict]:
    cfg = ensure_reward_service(serving_cfg(reward, options, threads, batch_wait_ms=0))
    served = make_reward_fn(cfg.reward)
    local = make_reward_fn(RewardConfig(name=reward, options=options, serve=False))  # in process
    stats = served.stats()
    assert stats["torch_threads"] == threads, (
        f"replica has {stats['torch_threads']} threads, this process {threads}"
    )
    rows = []
    try:
        for batch in batches:
            images = torch.rand(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch))
            prompts = prompts_for(batch)
            for mode in ("score", "score_and_grad"):
                call(local, images, prompts, mode)  # warm-up: prompt embeddings cached, allocators warm
                call(served, images, prompts, mode)
                t_local, t_served, t_compute = [], [], []
                for _ in range(repeats):
                    t_local.append(call(local, images, prompts, mode))
                    before = served.stats()["compute_s"]
                    t_served.append(call(served, images, prompts, mode))
                    t_compute.append(served.stats()["compute_s"] - before)
                local_s, served_s = statistics.median(t_local), statistics.median(t_served)
                transport = statistics.median([s - c for s, c in zip(t_served, t_compute, strict=True)])
                rows.append({
                    "reward": reward, "batch": batch, "mode": mode, "local_ms": 1e3 * local_s,
                    "served_ms": 1e3 * served_s, "compute_ms": 1e3 * statistics.median(t_compute),
                    "transport_ms": 1e3 * transport, "overhead_pct": 100 * (served_s / local_s - 1),
                    "transport_pct": 100 * transport / local_s,
                })  # fmt: skip
                print_row(rows[-1])
    finally:
        serve.delete(cfg.reward.app)
    return rows


HEADER = (
    f"{'reward':<11} {'batch':>5} {'call':<15} {'in process ms':>13} {'served ms':>10} {'replica compute ms':>18} "
    f"{'transport ms':>12} {'overhead':>9} {'transport / in process':>22}"
)


def print_row(r: dict) -> None:
    print(
        f"{r['reward']:<11} {r['batch']:>5} {r['mode']:<15} {r['local_ms']:>13.1f} {r['served_ms']:>10.1f} "
        f"{r['compute_ms']:>18.1f} {r['transport_ms']:>12.1f} {r['overhead_pct']:>8.1f}% {r['transport_pct']:>21.1f}%",
        flush=True,
    )


def throughput(options: dict, threads: int, callers: list[int], calls: int, caller_batch: int) -> None:
    print(
        f"\nthroughput: `score`, {caller_batch} images per request, {calls} requests per caller, one replica"
    )
    print(
        f"{'batching':<34} "
        + " ".join(f"{f'{n} caller(s) img/s':>18}" for n in callers)
        + f" {'largest batch':>14}"
    )
    for label, settings in (
        ("on  (max_batch 32, wait 10 ms)", {"max_batch": 32, "batch_wait_ms": 10}),
        ("off (max_batch 1)", {"max_batch": 1, "batch_wait_ms": 0}),
    ):
        cfg = ensure_reward_service(serving_cfg("clip_score", options, threads, **settings))
        figures, largest = [], 0
        try:
            warm = make_reward_fn(cfg.reward)
            warm.score(torch.rand(caller_batch, 3, 224, 224), prompts_for(caller_batch))
            for n in callers:
                clients = [make_reward_fn(cfg.reward) for _ in range(n)]
                images = torch.rand(caller_batch, 3, 224, 224)
                start = threading.Barrier(n + 1)

                def work(client, start=start, images=images) -> None:
                    start.wait()
                    for _ in range(calls):
                        client.score(images, prompts_for(caller_batch))

                threads_ = [threading.Thread(target=work, args=(c,)) for c in clients]
                for t in threads_:
                    t.start()
                start.wait()
                t0 = time.perf_counter()
                for t in threads_:
                    t.join()
                figures.append(n * calls * caller_batch / (time.perf_counter() - t0))
                largest = max([largest, *(c.largest_batch for c in clients)])
        finally:
            serve.delete(cfg.reward.app)
        print(f"{label:<34} " + " ".join(f"{f:>18.2f}" for f in figures) + f" {largest:>14}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--vision-layers", type=int, default=1, help="ViT-H/14 blocks (the real tower has 32)"
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="images per call")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per path and case (median)")
    parser.add_argument(
        "--transport-repeats", type=int, default=9, help="timed calls for the brightness rows"
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads per side")
    parser.add_argument("--callers", type=int, nargs="+", default=[1, 2, 4], help="concurrent callers")
    parser.add_argument("--calls", type=int, default=3, help="requests per caller in the throughput runs")
    parser.add_argument(
        "--caller-batch", type=int, default=2, help="images per request in the throughput runs"
    )
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()
    t_start = time.perf_counter()
    threads = args.threads
    torch.set_num_threads(threads)
    import ray._private.ray_constants as ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # every process of this private cluster listens on 127.0.0.1
    ray.init(address="local", num_cpus=max(2, threads), include_dashboard=False, log_to_driver=False)
    start_serve()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = build_clip_h_folder(Path(tmp) / "clip-h14", args.vision_layers)
            options = {"path": str(folder)}
            print(
                f"ClipScore on a CLIP ViT-H/14 shape (width 1280, 224 px) with {args.vision_layers}/32 vision "
                f"blocks, random weights; {threads} torch threads on each side; median of {args.repeats}"
            )
            print(HEADER)
            rows = latency("clip_score", options, args.batches, args.repeats, threads)
            print(f"\ntransport only (brightness: no model); median of {args.transport_repeats}")
            print(HEADER)
            latency("brightness", {}, args.batches, args.transport_repeats, threads)
            if not args.skip_throughput:
                throughput(options, threads, args.callers, args.calls, args.caller_batch)
    finally:
        serve.shutdown()
        ray.shutdown()
    at8 = [r for r in rows if r["batch"] == 8]
    if at8:
        overhead = ", ".join(f"{r['mode']} {r['overhead_pct']:+.1f}%" for r in at8)
        transport = ", ".join(f"{r['mode']} {r['transport_pct']:.1f}%" for r in at8)
        print(
            f"\nClipScore at batch 8: overhead {overhead} (target <= 10%); transport / in process {transport}"
        )
    print(
        f"total {time.perf_counter() - t_start:.0f} s; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )


if __name__ == "__main__":
    main()
