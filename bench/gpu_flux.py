"""GPU benchmark: the project's LeapAlign update on the Flux.1-dev architecture with random weights.

Intended command, in ONE device call (same machine, same warm GPU, so the rows are comparable):

    python ../shared/bench/flux_gpu_anchor.py --res 720 --batch 4 --only leap full
    python bench/gpu_flux.py --res 720 --batch 4 --only leap full

Target: our `leap` row within 1.05x of the anchor's `leap` row in both median_s and peak_gb
(anchor on one H200: 11.95 s, 43.8 GiB; full backprop 32.86 s, 121.4 GiB, which does not fit an
H100: both scripts report it as OOM there). Time on an H200: each script builds its models, then
runs 1 warm-up + 3 timed updates per row: about 4 x 12 s for leap and 4 x 33 s for full, so the
pair needs about 7-8 minutes with `--only leap full` and about 3 with `--only leap`. Check the script itself on a CPU with
`python bench/gpu_flux.py --tiny` (a few seconds).

The workload is the anchor's (shared/bench/flux_gpu_anchor.py): FluxTransformer2DModel with the
Flux.1-dev config, the Flux VAE, a CLIP-H-sized vision tower as the reward (cosine similarity of
its image embedding to a fixed random target), bf16 weights, LoRA r64 on to_q/to_k/to_v/to_out.0,
gradient checkpointing in the transformer, the VAE decoder and the reward tower, 25 steps, random
prompt embeds (T5 length 512) and a fixed leap pair k = 2, j = N // 2. The update itself is the
project's, as train.py runs it: FluxPolicy.velocity_fn (bf16 autocast, fp32 latents),
rollout_with_leaps, FluxPolicy.decode, similarity_weight, hinge_loss, apply_finetune (fp32 LoRA
master weights), flux_sigmas, then backward, grad clipping and an AdamW step. Differences from the
anchor that may show in the figures: fp32 LoRA weights, grads and AdamW state (74.7M adapter
weights: about +0.6 GiB); peft casts each adapted layer's bf16 input to the fp32 adapter dtype
(peft 0.21 `_cast_input_dtype`: two extra copies of a [B, S, 3072] activation in each of the 190
adapted layers per forward, estimated at a few % of the forward's time); autocast (layer/group
norms in fp32) instead of pure bf16; grad clipping. If the leap row misses 1.05x, these are the
first suspects.

No FluxPipeline and no text encoders are built: `FluxPieces` gives FluxPolicy the few attributes
it reads from a pipeline. `--no-vae-checkpointing` measures the decode as train.setup_policy runs it
today (it does not enable checkpointing in the VAE), which the anchor never does. `--compile` runs the
no-grad forwards through torch.compile as `sampler.compile` does (the warm-up call carries the compile):
run the same command with and without it for the compiled-vs-eager rows (`--only fwd rollout leap`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
from diffusers.utils import logging as diffusers_logging
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from leapalign.config import FinetuneConfig
from leapalign.finetune import apply_finetune
from leapalign.methods.full_backprop import full_backprop_rollout
from leapalign.methods.leapalign import hinge_loss, rollout_with_leaps, similarity_weight
from leapalign.methods.refl import refl_rollout
from leapalign.models.flux import FluxPolicy, PromptEmbeds
from leapalign.sampling import flux_sigmas, rollout

# The anchor's sizes (shared/bench/flux_gpu_anchor.py).
FLUX_DEV = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=[16, 56, 56],
)  # fmt: skip
TINY = dict(
    FLUX_DEV, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 6, 6],
)  # fmt: skip
FLUX_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=16, down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
    norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611,
    shift_factor=0.1159,
)  # fmt: skip
TINY_VAE = dict(FLUX_VAE, block_out_channels=[8, 8, 8, 8], layers_per_block=1, norm_num_groups=4)
CLIP_H = dict(
    hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, patch_size=14,
    image_size=224, projection_dim=1024,
)  # fmt: skip
TINY_CLIP = dict(CLIP_H, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 projection_dim=16)  # fmt: skip
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

GUIDANCE_SCALE = 3.5
ALPHA = 0.3  # HPSv2.1 setting, as the anchor
TAU = 0.1
HINGE = 0.55  # the anchor's lambda; random-tower cosine similarities sit near 0, so all samples count


class FluxPieces:
    """What FluxPolicy reads from a FluxPipeline, without text encoders (prompt embeds are random)."""

    def __init__(self, transformer: FluxTransformer2DModel, vae: AutoencoderKL):
        self.transformer = transformer
        self.vae = vae
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.text_encoder = self.text_encoder_2 = torch.nn.Identity()
        self._unpack_latents = FluxPipeline._unpack_latents


class TowerSimilarity:
    """RewardFn: cosine similarity of a vision tower's image embedding to a fixed target, per image."""

    def __init__(self, tower: CLIPVisionModelWithProjection, target: torch.Tensor):
        self.tower, self.target = tower, target  # target [1, D]
        self.mean = torch.tensor(CLIP_MEAN, device=target.device).view(1, 3, 1, 1)
        self.std = torch.tensor(CLIP_STD, device=target.device).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor, prompts) -> torch.Tensor:
        size = self.tower.config.image_size
        pixels = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", antialias=True)
        pixels = ((pixels - self.mean) / self.std).to(self.tower.dtype)  # [B, 3, 224, 224]
        embeds = self.tower(pixel_values=pixels).image_embeds  # [B, D]
        return torch.nn.functional.cosine_similarity(embeds.float(), self.target.float())  # [B]


def frozen_decoder_and_tower(vae_cfg: dict, tower_cfg: dict, device, dtype, vae_checkpointing: bool = True):
    """The frozen, random-weight VAE and reward tower every bench decodes and scores with, checkpointed
    as training runs them (the VAE decode under the reward gradient, the tower's layers)."""
    with torch.device(device):
        vae = AutoencoderKL(**vae_cfg).to(dtype)
        tower = CLIPVisionModelWithProjection(CLIPVisionConfig(**tower_cfg)).to(dtype)
    for module in (vae, tower):
        module.requires_grad_(False)
        module.eval()
    if vae_checkpointing:
        vae.enable_gradient_checkpointing()
    tower.activation_checkpointing_enable()  # transformers 5 name of gradient_checkpointing_enable
    return vae, tower


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_resolution(
    res, args, policy, params, optimizer, reward_fn, transformer_cfg, text_len
) -> list[dict]:
    """Warm up, then time `args.reps` calls of each test in `args.only`; one JSON row per test."""
    device, dtype = policy.device, policy.transformer.dtype
    policy.check_resolution(res, res)
    batch = args.batch
    prompts = ["random prompt embeds"] * batch
    tokens_side = res // (policy.vae_scale_factor * 2)  # packed token grid (VAE /8, then 2x2)
    cond = PromptEmbeds(
        prompt_embeds=torch.randn(
            batch, text_len, transformer_cfg["joint_attention_dim"], device=device, dtype=dtype
        ),
        pooled_prompt_embeds=torch.randn(
            batch, transformer_cfg["pooled_projection_dim"], device=device, dtype=dtype
        ),
        text_ids=torch.zeros(text_len, 3, device=device, dtype=dtype),
    )
    image_ids = FluxPipeline._prepare_latent_image_ids(
        batch, tokens_side, tokens_side, device, dtype
    )  # [S, 3]
    velocity = policy.velocity_fn(cond, image_ids, GUIDANCE_SCALE)
    sigmas = flux_sigmas(args.steps, tokens_side**2, device=device)  # [N + 1]
    k, j = 2, args.steps // 2

    def noise() -> torch.Tensor:
        return torch.randn(batch, tokens_side**2, 64, device=device)  # [B, S, 64] fp32, as in training

    def finish(rewards: torch.Tensor, weight: torch.Tensor) -> None:
        loss = hinge_loss(rewards, weight, HINGE)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def leap_update() -> None:
        leap = rollout_with_leaps(velocity, noise(), sigmas, k, j, alpha=ALPHA)
        rewards = reward_fn(policy.decode(leap.x0, res, res), prompts)  # [B]
        finish(rewards, similarity_weight(leap.d_j, leap.d_0, TAU))

    def refl_update() -> None:
        x0_hat = refl_rollout(velocity, noise(), sigmas, j)  # the anchor's ReFL step
        rewards = reward_fn(policy.decode(x0_hat, res, res), prompts)
        finish(rewards, torch.ones_like(rewards))

    def full_update() -> None:
        x0 = full_backprop_rollout(velocity, noise(), sigmas)
        rewards = reward_fn(policy.decode(x0, res, res), prompts)
        finish(rewards, torch.ones_like(rewards))

    def fwd() -> None:
        with torch.no_grad():
            velocity(noise(), sigmas[3])

    def rollout_only() -> None:
        rollout(velocity, noise(), sigmas)

    tests = {
        "fwd": fwd,
        "rollout": rollout_only,
        "leap": leap_update,
        "refl": refl_update,
        "full": full_update,
    }
    rows = []
    for name in args.only:
        fn = tests[name]
        try:
            fn()  # warm-up
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            times = []
            for _ in range(args.reps):
                sync(device)
                t0 = time.perf_counter()
                fn()
                sync(device)
                times.append(time.perf_counter() - t0)
            cuda = device.type == "cuda"
            row = dict(
                event="time", res=res, batch=batch, what=name, median_s=round(statistics.median(times), 4),
                all_s=[round(t, 4) for t in times],
                peak_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
                reserved_gb=round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
            )  # fmt: skip
        except torch.OutOfMemoryError:
            row = dict(event="time", res=res, batch=batch, what=name, median_s=None, oom=True)
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny sizes, runs on CPU: checks the script")
    parser.add_argument("--res", type=int, nargs="+", default=None, help="px; default 720 (64 with --tiny)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--only", nargs="+", default=["leap"], choices=["fwd", "rollout", "leap", "refl", "full"]
    )
    parser.add_argument("--no-vae-checkpointing", action="store_true")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="sampler.compile: the no-grad forwards (rollout, fwd rows) through torch.compile",
    )
    parser.add_argument("--json", type=str, default=None, help="also write all rows to this file")
    args = parser.parse_args()
    if args.steps < 6:
        parser.error("--steps must be >= 6 (leap pair k = 2, j = N // 2)")

    resolutions = args.res or ([64] if args.tiny else [720])
    diffusers_logging.set_verbosity_error()  # "modules that should be kept in float32: []" on every .to()
    if args.tiny:
        torch.set_num_threads(1)  # on shared CPU cores, 2 OpenMP threads ran 10-100x slower than 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        # As the anchor: cuDNN's fused attention backward hit an illegal memory access on this shape.
        torch.backends.cuda.enable_cudnn_sdp(False)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    transformer_cfg, vae_cfg, tower_cfg = (
        (TINY, TINY_VAE, TINY_CLIP) if args.tiny else (FLUX_DEV, FLUX_VAE, CLIP_H)
    )
    text_len = 16 if args.tiny else 512

    # 1. Random-weight models, frozen; the LoRA adapter via the project's apply_finetune.
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(device):
        transformer = FluxTransformer2DModel(**transformer_cfg).to(dtype)
    vae, tower = frozen_decoder_and_tower(vae_cfg, tower_cfg, device, dtype, not args.no_vae_checkpointing)
    finetune = FinetuneConfig(
        mode="lora", lora_rank=args.rank, lora_alpha=args.rank, gradient_checkpointing=True
    )
    params = apply_finetune(transformer, finetune)
    policy = FluxPolicy(
        FluxPieces(transformer, vae), device, torch.bfloat16 if device.type == "cuda" else None
    )
    if args.compile:
        policy.compile_no_grad_calls()  # as sampler.compile=true: the first call of each test compiles
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    reward_fn = TowerSimilarity(tower, torch.randn(1, tower_cfg["projection_dim"], device=device))
    print(
        json.dumps(
            dict(
                event="built",
                s=round(time.perf_counter() - t0, 1),
                params=sum(p.numel() for p in transformer.parameters()),
                lora_params=sum(p.numel() for p in params),
                device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                vae_checkpointing=not args.no_vae_checkpointing,
                compiled=args.compile,
            )
        ),
        flush=True,
    )

    rows = []
    for res in resolutions:
        rows += measure_resolution(res, args, policy, params, optimizer, reward_fn, transformer_cfg, text_len)

    print("\nres  what              median_s  peak_GiB")
    for r in rows:
        peak = "OOM" if r.get("oom") else r["peak_gb"]
        print(f"{r['res']:<5}{r['what']:<18}{r['median_s']!s:<10}{peak}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
