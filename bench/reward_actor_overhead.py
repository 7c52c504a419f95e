"""Reward round trip through a Ray actor vs the same reward in process, measured side by side.

    .venv/bin/python bench/reward_actor_overhead.py                 # ~2 min on 2 CPU cores
    .venv/bin/python bench/reward_actor_overhead.py --vision-layers 12 --repeats 5   # full ViT-B/32

The scorer is leapalign.rewards.clip_score.ClipScore (differentiable resize + normalise, CLIPModel
vision tower, cosine with cached prompt embeddings) on a CLIP ViT-B/32-shaped model with random
weights (width 768, patch 32, 224 px; --vision-layers of its 12 blocks), saved to a temporary folder
and loaded by both sides. Batch 8 at 64 and 512 px; `score` (values) and `score_and_grad` (values and
d r / d image, then the worker's backward). Calls alternate in-process / actor so machine noise hits
both alike; medians are reported. The actor gets the same number of torch threads as this process and
max_wait_ms=0 (one caller: a batch window would only add latency). A second table times the transport
alone with a reward that costs nothing (brightness): that absolute cost is what to compare with a GPU
forward pass, where the model takes milliseconds instead of seconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

# Ray binds to 127.0.0.1 only with this (read when ray is imported); no usage stats.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import ray  # noqa: E402
import torch  # noqa: E402

from leapalign.distributed.reward_actor import ActorReward, launch_reward_actor  # noqa: E402
from leapalign.rewards import build_reward  # noqa: E402

PROMPTS = [
    "a red square", "two blue circles", "a green triangle above a cat", "a yellow dog",
    "a photo of a white cat", "three magenta squares", "a cyan circle on the left", "a black dog",
]  # fmt: skip
NAMESPACE = "bench"


def build_clip_folder(out_dir: Path, vision_layers: int) -> Path:
    """A CLIP ViT-B/32-shaped CLIPModel with random weights and an offline tokenizer, saved to out_dir."""
    from transformers import CLIPConfig, CLIPModel

    from leapalign.models.tiny import build_tokenizers

    tokenizer, _ = build_tokenizers()
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
            num_attention_heads=8, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=vision_layers, num_attention_heads=12,
            image_size=224, patch_size=32,
        ),
        projection_dim=512,
    )  # fmt: skip
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def local_call(reward, images: torch.Tensor, mode: str):
    if mode == "score":
        with torch.no_grad():
            return reward(images, PROMPTS), None
    pixels = images.clone().requires_grad_(True)
    rewards = reward(pixels, PROMPTS)
    rewards.sum().backward()
    return rewards.detach(), pixels.grad


def actor_call(actor_reward: ActorReward, images: torch.Tensor, mode: str):
    if mode == "score":
        return actor_reward.score(images, PROMPTS), None
    pixels = images.clone().requires_grad_(True)
    rewards = actor_reward(pixels, PROMPTS)
    rewards.sum().backward()
    return rewards.detach(), pixels.grad


def compare(reward_name: str, options: dict, sizes: list[int], repeats: int, threads: int) -> list[dict]:
    """Launch an actor serving the reward, time both paths alternately, kill the actor."""
    actor = launch_reward_actor(
        f"bench_{reward_name}", reward_name, options, namespace=NAMESPACE, num_cpus=threads, max_wait_ms=0
    )
    actor_reward = ActorReward(f"bench_{reward_name}", NAMESPACE)
    local = build_reward(reward_name, options)
    rows = []
    try:
        actor_threads = actor_reward.stats()["torch_threads"]
        assert actor_threads == threads, f"actor has {actor_threads} torch threads, this process {threads}"
        for size in sizes:
            images = torch.rand(len(PROMPTS), 3, size, size, generator=torch.Generator().manual_seed(size))
            for mode in ("score", "score_and_grad"):
                # Warm-up: text embeddings cached, allocator and object store warm on both sides.
                r_local, g_local = local_call(local, images, mode)
                r_actor, g_actor = actor_call(actor_reward, images, mode)
                reward_err = (r_local - r_actor).abs().max().item()
                grad_err = (
                    0.0 if g_local is None else ((g_local - g_actor).abs().max() / g_local.abs().max()).item()
                )
                t_local, t_actor, t_compute = [], [], []
                for _ in range(repeats):
                    t_local.append(timed(lambda: local_call(local, images, mode)))  # noqa: B023
                    before = actor_reward.stats()["compute_s"]
                    t_actor.append(timed(lambda: actor_call(actor_reward, images, mode)))  # noqa: B023
                    t_compute.append(actor_reward.stats()["compute_s"] - before)
                # transport = everything the actor path adds around the reward's own compute: tensor to
                # numpy, ray.put, scheduling, the actor's copy, the answer, autograd glue.
                transport = [a - c for a, c in zip(t_actor, t_compute, strict=True)]
                local_s, actor_s = statistics.median(t_local), statistics.median(t_actor)
                rows.append({
                    "reward": reward_name, "size": size, "mode": mode, "local_ms": 1e3 * local_s,
                    "actor_ms": 1e3 * actor_s, "actor_compute_ms": 1e3 * statistics.median(t_compute),
                    "transport_ms": 1e3 * statistics.median(transport),
                    "overhead_pct": 100 * (actor_s / local_s - 1),
                    "transport_pct": 100 * statistics.median(transport) / local_s,
                    "reward_err": reward_err, "grad_rel_err": grad_err,
                })  # fmt: skip
                print_row(rows[-1])
    finally:
        ray.kill(actor, no_restart=True)
    return rows


# Medians over the repeats. "actor compute": the reward's forward (+ backward) inside the actor;
# "transport": actor call minus actor compute, per call. "overhead" compares two separately timed
# computations and carries the machine's noise; "transport / in-process" is the cost the actor adds.
HEADER = (
    f"{'reward':<11} {'px':>4} {'call':<15} {'in-process ms':>13} {'actor ms':>9} {'actor compute ms':>16} "
    f"{'transport ms':>12} {'overhead':>9} {'transport / in-process':>22}  {'max |dr|':>8} {'grad rel err':>12}"
)


def print_row(r: dict) -> None:
    print(
        f"{r['reward']:<11} {r['size']:>4} {r['mode']:<15} {r['local_ms']:>13.1f} {r['actor_ms']:>9.1f} "
        f"{r['actor_compute_ms']:>16.1f} {r['transport_ms']:>12.1f} {r['overhead_pct']:>8.1f}% "
        f"{r['transport_pct']:>21.1f}%  {r['reward_err']:>8.1e} {r['grad_rel_err']:>12.1e}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vision-layers", type=int, default=4, help="ViT blocks (ViT-B/32 has 12)")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per path and case (median)")
    parser.add_argument(
        "--transport-repeats", type=int, default=15, help="timed calls for the brightness rows"
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads per side")
    args = parser.parse_args()
    t_start = time.perf_counter()
    threads = args.threads
    torch.set_num_threads(threads)  # the actor gets num_cpus=threads, and Ray sets OMP_NUM_THREADS from it
    ray.init(
        address="local", num_cpus=threads, include_dashboard=False, namespace=NAMESPACE, log_to_driver=False
    )
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = build_clip_folder(Path(tmp) / "clip-b32", args.vision_layers)
            print(
                f"ClipScore on a CLIP ViT-B/32 shape with {args.vision_layers}/12 vision blocks, random weights; "
                f"batch {len(PROMPTS)}; {threads} torch threads on each side; median of {args.repeats}"
            )
            print(HEADER)
            rows = compare("clip_score", {"path": str(folder)}, [64, 512], args.repeats, threads)
        print(f"\ntransport only (brightness: no model); median of {args.transport_repeats}")
        print(HEADER)
        rows += compare("brightness", {}, [64, 512], args.transport_repeats, threads)
    finally:
        ray.shutdown()
    clip = [r for r in rows if r["reward"] == "clip_score"]
    print(
        f"\nClipScore: worst transport / in-process {max(r['transport_pct'] for r in clip):.1f}%, worst "
        f"overhead {max(r['overhead_pct'] for r in clip):.1f}% (target <= 10%); total "
        f"{time.perf_counter() - t_start:.0f} s; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )


if __name__ == "__main__":
    main()
