"""GPU benchmark: per-GPU time and memory of one LeapAlign update on the Flux.1-dev architecture (random
weights), LoRA + DDP and full fine-tuning + FSDP2, through the project's leapalign.parallel wrapper.

    torchrun --nproc-per-node 8 bench/flux_gpu_scale.py                     # both modes, 8 GPUs (one node)
    torchrun --nproc-per-node 8 bench/flux_gpu_scale.py --modes full --res 720 --batch 1 --json out.json
    torchrun --nnodes 2 --nproc-per-node 8 ... bench/flux_gpu_scale.py      # the paper's 16 GPUs
    python bench/flux_gpu_scale.py --modes lora                             # one GPU (DDP over 1 rank)
    python bench/flux_gpu_scale.py --tiny                                   # CPU check of the script (gloo)

NOT run yet (written on a machine without GPUs): the figures are for whoever runs it. Full size refuses
to start without CUDA (a 12B model on CPU would take hours and ~200 GB of RAM).

Workload per rank, as bench/gpu_flux.py (whose models and reward it reuses): FluxTransformer2DModel with
the Flux.1-dev config, the Flux VAE, a CLIP-H-sized vision tower as the reward, bf16, gradient
checkpointing, 25 steps, --batch images per GPU at --res px, random prompt embeds (T5 length 512),
leap pair k = 2, j = N // 2; one update = rollout_with_leaps, decode, reward, hinge loss, backward,
clip_grad_norm, AdamW step.

  lora   bf16 base weights on every GPU, LoRA r64 (fp32 master weights) under DDP: the adapter's
         gradients are all-reduced in the backward.
  full   every transformer weight trained. The model is built on the meta device, sharded by FSDP2
         (fully_shard per block and on the root: leapalign.parallel.Parallel.wrap), then each rank
         materialises only its shard on the GPU and fills it with random values: fp32 master weights,
         gradients and AdamW moments sharded 1/world (12B x 16 B / world: 24 GB per GPU on 8 GPUs),
         bf16 compute with fp32 gradient reduction (MixedPrecisionPolicy). --cpu-offload keeps the
         shards in host memory (ray.cpu_offload).

Reports per mode: build seconds, median seconds per update (--reps after a warm-up; the slowest rank),
peak allocated and reserved GiB (the largest over ranks), and trained weights per rank.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    parser.add_argument("--tiny", action="store_true", help="tiny sizes on CPU (gloo): checks the script")
    parser.add_argument("--res", type=int, default=None, help="px; default 720 (64 with --tiny)")
    parser.add_argument("--batch", type=int, default=1, help="images per GPU per update")
    parser.add_argument("--steps", type=int, default=25, help="sampling steps N (>= 6)")
    parser.add_argument("--rank", type=int, default=64, help="LoRA rank (mode lora)")
    parser.add_argument("--reps", type=int, default=3, help="timed updates after one warm-up")
    parser.add_argument("--cpu-offload", action="store_true", help="mode full: FSDP2 shards in host memory")
    parser.add_argument("--json", type=Path, default=None, help="rank 0 also writes the rows here")
    args = parser.parse_args(argv)
    if args.steps < 6:
        parser.error("--steps must be >= 6 (leap pair k = 2, j = N // 2)")
    return args


def init_distributed(cuda: bool):
    """torchrun's env:// group, or a one-rank group (DDP / FSDP2 need one even alone)."""
    import torch
    import torch.distributed as dist

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29517")
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist


def build_transformer(mode: str, cfg: dict, device, dtype, args, parallel):
    """The trained transformer, wrapped; returns (transformer, grad_module, trained params)."""
    import torch
    from diffusers import FluxTransformer2DModel

    from leapalign.config import FinetuneConfig
    from leapalign.finetune import apply_finetune

    if mode == "lora":
        with torch.device(device):
            transformer = FluxTransformer2DModel(**cfg).to(dtype)
        finetune = FinetuneConfig(
            mode="lora", lora_rank=args.rank, lora_alpha=args.rank, gradient_checkpointing=True
        )
        apply_finetune(transformer, finetune)
        grad_module = parallel.wrap(transformer, device)
    else:
        with torch.device("meta"):  # no rank ever holds the whole fp32 model
            transformer = FluxTransformer2DModel(**cfg)
        apply_finetune(transformer, FinetuneConfig(mode="full", gradient_checkpointing=True))
        grad_module = parallel.wrap(transformer, device)
        transformer.to_empty(device="cpu" if args.cpu_offload else device)
        generator = torch.Generator(device="cpu" if args.cpu_offload else device).manual_seed(parallel.rank)
        with torch.no_grad():
            for p in transformer.parameters():  # this rank's shard only; random weights, as the other bench
                local = p.to_local() if hasattr(p, "to_local") else p
                local.normal_(0.0, 0.02, generator=generator)
    params = [p for p in transformer.parameters() if p.requires_grad]
    return transformer, grad_module, params


def measure_mode(mode: str, args, dist, device, dtype) -> dict:
    import gpu_flux as base  # bench/gpu_flux.py: the same models, reward and constants
    import torch
    from diffusers import FluxPipeline

    from leapalign.methods.leapalign import hinge_loss, rollout_with_leaps, similarity_weight
    from leapalign.models.flux import FluxPolicy, PromptEmbeds
    from leapalign.parallel import Parallel, local_numel
    from leapalign.sampling import flux_sigmas

    cuda = device.type == "cuda"
    transformer_cfg, vae_cfg, tower_cfg = (
        (base.TINY, base.TINY_VAE, base.TINY_CLIP)
        if args.tiny
        else (base.FLUX_DEV, base.FLUX_VAE, base.CLIP_H)
    )
    text_len, res = (16, args.res or 64) if args.tiny else (512, args.res or 720)
    rank, world = dist.get_rank(), dist.get_world_size()
    strategy = "ddp" if mode == "lora" else "fsdp2"
    parallel = Parallel(strategy, world_size=world, rank=rank, cpu_offload=args.cpu_offload)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    transformer, grad_module, params = build_transformer(mode, transformer_cfg, device, dtype, args, parallel)
    vae, tower = base.frozen_decoder_and_tower(vae_cfg, tower_cfg, device, dtype)
    policy = FluxPolicy(base.FluxPieces(transformer, vae), device, torch.bfloat16 if cuda else None)
    policy.grad_module = grad_module
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    reward_fn = base.TowerSimilarity(tower, torch.randn(1, tower_cfg["projection_dim"], device=device))
    build_s = time.perf_counter() - t0

    batch = args.batch
    tokens_side = res // (policy.vae_scale_factor * 2)
    model_dtype = dtype
    cond = PromptEmbeds(
        prompt_embeds=torch.randn(batch, text_len, transformer_cfg["joint_attention_dim"], device=device, dtype=model_dtype),
        pooled_prompt_embeds=torch.randn(batch, transformer_cfg["pooled_projection_dim"], device=device, dtype=model_dtype),
        text_ids=torch.zeros(text_len, 3, device=device, dtype=model_dtype),
    )  # fmt: skip
    image_ids = FluxPipeline._prepare_latent_image_ids(batch, tokens_side, tokens_side, device, model_dtype)
    velocity = policy.velocity_fn(cond, image_ids, base.GUIDANCE_SCALE)
    sigmas = flux_sigmas(args.steps, tokens_side**2, device=device)
    k, j = 2, args.steps // 2

    def update() -> None:
        noise = torch.randn(batch, tokens_side**2, 64, device=device)  # [B, S, 64] fp32
        leap = rollout_with_leaps(velocity, noise, sigmas, k, j, alpha=base.ALPHA)
        rewards = reward_fn(policy.decode(leap.x0, res, res), ["random"] * batch)
        loss = hinge_loss(rewards, similarity_weight(leap.d_j, leap.d_0, base.TAU), base.HINGE)
        loss.backward()
        parallel.clip_grad_norm(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()

    update()  # warm-up: AdamW state, NCCL communicators, cuDNN/cuBLAS plans
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.reps):
        sync()
        start = time.perf_counter()
        update()
        sync()
        times.append(time.perf_counter() - start)
    local = {
        "median_s": statistics.median(times),
        "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
        "reserved_gb": torch.cuda.max_memory_reserved() / 2**30 if cuda else float("nan"),
        "build_s": build_s,
        "trained_per_rank": float(sum(local_numel(p) for p in params)),
    }
    gathered = [None] * world
    dist.all_gather_object(gathered, local)
    row = {
        "mode": mode,
        "strategy": strategy,
        "gpus": world,
        "res": res,
        "batch_per_gpu": batch,
        **{key: max(r[key] for r in gathered) for key in local},
    }
    return row  # the models go with this frame; main empties the CUDA cache before the next mode


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sys.path[:0] = [str(REPO / "platform"), str(REPO / "bench")]
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        raise SystemExit("full size needs CUDA GPUs (12B weights); check the script on CPU with --tiny")
    if not cuda:
        torch.set_num_threads(1)
    dist = init_distributed(cuda)
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if cuda:
        torch.backends.cuda.enable_cudnn_sdp(False)  # as bench/gpu_flux.py (illegal access on this shape)
    dtype = torch.bfloat16 if cuda else torch.float32
    rows = []
    for mode in args.modes:
        row = measure_mode(mode, args, dist, device, dtype)
        rows.append(row)
        if cuda:
            torch.cuda.empty_cache()
        if dist.get_rank() == 0:
            print(json.dumps(row), flush=True)
    if dist.get_rank() == 0:
        print(f"\n{'mode':<6}{'strategy':<9}{'gpus':>5}{'res':>6}{'B/gpu':>6}{'s/update':>10}{'peak GiB':>10}"
              f"{'trained/rank':>14}")  # fmt: skip
        for r in rows:
            print(
                f"{r['mode']:<6}{r['strategy']:<9}{r['gpus']:>5}{r['res']:>6}{r['batch_per_gpu']:>6}"
                f"{r['median_s']:>10.2f}{r['peak_gb']:>10.1f}{r['trained_per_rank'] / 1e6:>13.1f}M"
            )
        if args.json:
            args.json.write_text(
                json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2)
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
