"""Cost of one update of every method, side by side: transformer forward-equivalents, time, peak memory.

    .venv/bin/python bench/method_cost.py                  # small Flux on CPU (~6 CPU-min on 2 shared cores)
    .venv/bin/python bench/method_cost.py --quick          # tiny Flux, N = 8: a smoke test (~1 min)
    python bench/method_cost.py --flux-dev --res 720 --batch 4   # Flux.1-dev architecture on a GPU, bf16

Every method runs through the project's own code: the direct-gradient methods through their loss functions
(leapalign.methods.DIRECT_METHODS: the same calls `leapalign train` makes), GRPO through the recipe's
pieces (plan_steps, group_rollout, decode + score, group_advantages, ppo_update), then backward, grad
clipping and an AdamW step. Each method runs in a FRESH child process: one warm-up update, `--reps` timed
updates, then one update under the memory probe (the torch profiler's tensor events on CPU,
torch.cuda.max_memory_allocated on GPU). Columns:
  nfe/upd    image forward-equivalents of the transformer per update, as `ComputeMeter` measures them in
             training (a backward counts 2, a gradient-checkpointing recompute 1)
  img/upd    images one update generates (GRPO: prompts x group size)
  s/upd      median CPU seconds per update (one torch thread) on CPU, wall seconds (CUDA-synchronised) on GPU
  s/img      s/upd / img/upd
  peak MiB   peak live tensor bytes of one update
Models have random weights (the cost does not depend on them): on CPU the small Flux of cpu_memory.py
(2 + 2 blocks, 4 heads x 32, 64 px = 256 tokens); with --flux-dev the Flux.1-dev transformer and VAE and a
CLIP-H-sized vision tower as reward, from bench/gpu_flux.py. Prompt embeddings are random (no text encoders).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

METHODS = ("leapalign", "leapalign_p4", "refl", "draft_lv", "drtune", "full_backprop", "grpo")
SMALL = dict(num_layers=2, num_single_layers=2, attention_head_dim=32, num_attention_heads=4,
             axes_dims_rope=(8, 12, 12))  # fmt: skip
GRPO_GROUP = 4  # images per prompt in the GRPO row (Flow-GRPO uses 24, DanceGRPO 12)


def method_overrides(method: str) -> dict:
    name = "leapalign" if method == "leapalign_p4" else method
    extra = {"method.leapalign.pairs_per_rollout": 4} if method == "leapalign_p4" else {}
    if method == "grpo":
        extra = {"method.grpo.group_size": GRPO_GROUP, "method.grpo.micro_batch": 4}
    return {"method.name": name, **extra}


def build(job: dict):
    """(policy, params, optimizer, reward_fn, cfg) for one child."""
    import torch
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from leapalign.config import Config, with_overrides
    from leapalign.finetune import apply_finetune
    from leapalign.models.flux import FluxPolicy, PromptEmbeds

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import gpu_flux  # the Flux.1-dev / CLIP-H sizes and the tower reward, shared with gpu_flux.py

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if job["flux_dev"]:
        transformer_cfg, vae_cfg, tower_cfg, text_len = (
            gpu_flux.FLUX_DEV,
            gpu_flux.FLUX_VAE,
            gpu_flux.CLIP_H,
            512,
        )
    elif job["quick"]:
        transformer_cfg, vae_cfg, tower_cfg, text_len = (
            gpu_flux.TINY,
            gpu_flux.TINY_VAE,
            gpu_flux.TINY_CLIP,
            16,
        )
    else:
        transformer_cfg = dict(gpu_flux.TINY, **SMALL)
        vae_cfg, tower_cfg, text_len = gpu_flux.TINY_VAE, gpu_flux.TINY_CLIP, 64
    cfg = with_overrides(
        Config(),
        {
            "sampler.num_steps": job["steps"],
            "sampler.height": job["res"],
            "sampler.width": job["res"],
            "train.batch_size": job["batch"],
            "finetune.lora_rank": job["rank"],
            "finetune.lora_alpha": job["rank"],
            "finetune.gradient_checkpointing": True,
            "method.leapalign.hinge": 1.0,  # above any cosine: every sample sends a gradient
            **method_overrides(job["method"]),
        },
    )
    torch.manual_seed(0)
    with torch.device(device):
        transformer = FluxTransformer2DModel(**transformer_cfg).to(dtype)
    vae, tower = gpu_flux.frozen_decoder_and_tower(vae_cfg, tower_cfg, device, dtype)
    params = apply_finetune(transformer, cfg.finetune)

    class BenchPolicy(FluxPolicy):
        """FluxPolicy on bare modules: random prompt embeds instead of text encoders."""

        def encode_prompts(self, prompts, max_sequence_length=512):
            batch = len(prompts)
            return PromptEmbeds(
                torch.randn(
                    batch, text_len, transformer_cfg["joint_attention_dim"], device=device, dtype=dtype
                ),
                torch.randn(batch, transformer_cfg["pooled_projection_dim"], device=device, dtype=dtype),
                torch.zeros(text_len, 3, device=device, dtype=dtype),
            )

        def prepare_latents(self, batch_size, height, width, generator):
            side = height // (self.vae_scale_factor * 2)
            latents = torch.randn(batch_size, side * side, 64, generator=generator).to(device)  # fp32
            return latents, FluxPipeline._prepare_latent_image_ids(batch_size, side, side, device, dtype)

    policy = BenchPolicy(
        gpu_flux.FluxPieces(transformer, vae), device, torch.bfloat16 if device.type == "cuda" else None
    )
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    reward_fn = gpu_flux.TowerSimilarity(tower, torch.randn(1, tower_cfg["projection_dim"], device=device))
    return policy, params, optimizer, reward_fn, cfg


def measure(job: dict) -> dict:
    import torch

    from leapalign.compute import ComputeMeter
    from leapalign.methods import DIRECT_METHODS
    from leapalign.methods.common import StepRandomness
    from leapalign.methods.grpo import group_advantages, plan_steps
    from leapalign.recipes.grpo import group_rollout, ppo_update
    from leapalign.sampling import flux_sigmas

    torch.set_num_threads(job["threads"])
    policy, params, optimizer, reward_fn, cfg = build(job)
    device = policy.device
    policy.meter = meter = ComputeMeter(checkpointing=True)
    sigmas = flux_sigmas(cfg.sampler.num_steps, policy.image_seq_len(job["res"], job["res"]), device=device)
    rng = StepRandomness.seeded(0)
    prompts = ["a prompt"] * job["batch"]

    def update() -> int:
        """One update; returns the images it generated."""
        if cfg.method.name == "grpo":
            opts = cfg.method.grpo
            images = len(prompts) * opts.group_size
            plan = plan_steps(opts.variant, cfg.sampler.num_steps, images, iteration=0, generator=rng.steps,
                              train_fraction=opts.train_fraction, window_size=opts.window_size,
                              window_shift_every=opts.window_shift_every)  # fmt: skip
            rollout = group_rollout(policy, prompts, cfg, sigmas, rng, plan)
            with torch.no_grad():
                rewards = reward_fn(
                    policy.decode(rollout.latents[-1], job["res"], job["res"]), rollout.prompts
                )
            advantages = group_advantages(rewards.float(), opts.group_size, std_scope=opts.std_scope)
            ppo_update(policy, rollout, advantages, torch.arange(images, device=device), cfg, sigmas)
        else:
            images = len(prompts)
            loss, _ = DIRECT_METHODS[cfg.method.name](policy, prompts, reward_fn, cfg, sigmas, rng)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return images

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    update()  # warm-up: optimizer state and one-time allocations
    times, nfes = [], []
    for _ in range(job["reps"]):
        meter.reset()
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        images = update()
        sync()
        times.append(time.perf_counter() - t0 if device.type == "cuda" else time.process_time() - c0)
        nfes.append(meter.nfe)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        update()
        peak = torch.cuda.max_memory_allocated()
    else:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from cpu_memory import peak_tensor_bytes  # the profiler's tensor events, as cpu_memory.py reads them

        peak = peak_tensor_bytes(update)
    seconds = statistics.median(times)
    return {
        "method": job["method"],
        "nfe_per_update": statistics.median(nfes),
        "images_per_update": images,
        "s_per_update": seconds,
        "s_per_image": seconds / images,
        "nfe_per_image": statistics.median(nfes) / images,
        "peak_mib": peak / 2**20 if peak is not None else None,
        "all_s": [round(t, 4) for t in times],
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--steps", type=int, default=25, help="sampling steps N (paper: 25)")
    parser.add_argument("--res", type=int, default=None, help="px; default 64 (CPU) or 720 (--flux-dev)")
    parser.add_argument(
        "--batch", type=int, default=None, help="prompts per update; default 2 (CPU), 4 (GPU)"
    )
    parser.add_argument("--rank", type=int, default=None, help="LoRA rank; default 8 (CPU), 64 (--flux-dev)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny Flux, N = 8, 1 rep: checks the script")
    parser.add_argument("--flux-dev", action="store_true", help="the Flux.1-dev architecture (GPU)")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(measure(json.loads(args.child))), flush=True)
        return
    job = {
        "steps": 8 if args.quick else args.steps,
        "res": args.res or (720 if args.flux_dev else (32 if args.quick else 64)),
        "batch": args.batch or (4 if args.flux_dev else 2),
        "rank": args.rank or (64 if args.flux_dev else 8),
        "reps": 1 if args.quick else args.reps,
        "threads": args.threads,
        "quick": args.quick,
        "flux_dev": args.flux_dev,
    }
    rows = []
    for method in args.methods:
        print(f"measuring {method} ...", file=sys.stderr, flush=True)
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps({**job, "method": method})]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
        if proc.returncode != 0:
            print(f"{method} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    leap = next((r for r in rows if r["method"] == "leapalign"), None)
    print(f"\nN={job['steps']}, {job['res']} px, batch {job['batch']} prompts, LoRA r{job['rank']}, "
          f"{rows[0]['device'] if rows else '?'}; ratios to LeapAlign per image")  # fmt: skip
    print(
        f"{'method':<15}{'nfe/upd':>9}{'img/upd':>9}{'nfe/img':>9}{'s/upd':>9}{'s/img':>9}{'vs leap':>9}{'peak MiB':>10}"
    )
    for r in rows:
        vs = f"{r['s_per_image'] / leap['s_per_image']:.2f}x" if leap else "-"
        peak = f"{r['peak_mib']:.1f}" if r["peak_mib"] is not None else "-"
        print(f"{r['method']:<15}{r['nfe_per_update']:>9.0f}{r['images_per_update']:>9}{r['nfe_per_image']:>9.1f}"
              f"{r['s_per_update']:>9.3f}{r['s_per_image']:>9.3f}{vs:>9}{peak:>10}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"job": job, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
