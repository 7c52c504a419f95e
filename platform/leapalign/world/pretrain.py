"""Pretrain the miniature-world Flux on CPU: a real FluxPipeline, small enough to ship (a few MB).

Two stages, both seeded and deterministic on one machine:
  1. VAE (diffusers AutoencoderKL, 2x downsampling, 4 latent channels): reconstruction of rendered
     training scenes; then Flux-style latent normalisation (shift_factor, scaling_factor) from the
     encoded data, like Flux.1's 0.1159 / 0.3611.
  2. Flow matching (rectified flow, the Flux objective) of FluxTransformer2DModel jointly with the
     CLIP and T5 text encoders: x_sigma = (1 - sigma) x_0 + sigma noise, target v = noise - x_0,
     sigma ~ logit-normal. The guidance embedding sees a constant 3.5 (the value sampling uses).
The model learns only training-split captions; the held-out (colour, shape) pairs are what the
alignment has to generalise to. Output: a diffusers folder that `FluxPolicy.from_pretrained` loads.

    python -m leapalign.world.pretrain --out platform/leapalign/assets/mini-flux
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from leapalign.models.tiny import TinyFluxSpec, build_tiny_flux_pipeline, save_pipeline
from leapalign.world.prompts import build_prompt_sets, read_prompts, regenerate_scene
from leapalign.world.scenes import list_caption_words, render_scene

MINI_SPEC = TinyFluxSpec(
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=32,
    num_attention_heads=4,
    axes_dims_rope=(8, 12, 12),
    latent_channels=4,
    vae_block_out_channels=(16, 16),
    vae_norm_groups=4,
    clip_hidden=64,
    t5_d_model=64,
    text_layers=2,
)


@dataclass(frozen=True)
class PretrainConfig:
    seed: int = 0
    resolution: int = 32  # pixels; the miniature world's native size
    n_train: int = 12000  # distinct training scenes (rendered once)
    max_sequence_length: int = 16  # T5 tokens; every world caption fits
    vae_steps: int = 600
    vae_batch: int = 32
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    flow_steps: int = 3500
    flow_batch: int = 32
    flow_lr: float = 1e-3
    guidance_scale: float = 3.5


def render_dataset(records, resolution: int) -> torch.Tensor:
    """Ground-truth scenes of the records as [N, 3, H, W] in [-1, 1] (the VAE's input range)."""
    images = np.stack([render_scene(regenerate_scene(r), resolution) for r in records])  # [N, H, W, 3]
    return torch.from_numpy(images).permute(0, 3, 1, 2).mul(2).sub(1).contiguous()


def _cosine_lr(optimizer, step: int, total: int, base_lr: float, warmup: int = 100) -> None:
    scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / total))
    for group in optimizer.param_groups:
        group["lr"] = base_lr * max(scale, 0.02)


def train_vae(vae, images: torch.Tensor, cfg: PretrainConfig, generator: torch.Generator) -> dict[str, float]:
    """Reconstruction (L1 + MSE) with a tiny KL term; returns the final losses."""
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    bar = tqdm(range(cfg.vae_steps), desc="vae")
    for step in bar:
        _cosine_lr(optimizer, step, cfg.vae_steps, cfg.vae_lr)
        idx = torch.randint(len(images), (cfg.vae_batch,), generator=generator)
        x = images[idx]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        recon = vae.decode(z).sample
        rec = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        kl = posterior.kl().mean()
        loss = rec + cfg.vae_kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        if step % 25 == 0:
            bar.set_postfix(rec=f"{rec.item():.4f}", kl=f"{kl.item():.1f}")
    vae.eval()
    return {"vae/rec": rec.item(), "vae/kl": kl.item()}


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Posterior means [N, C, h, w] (deterministic), before normalisation."""
    return torch.cat(
        [vae.encode(images[i : i + batch]).latent_dist.mean for i in range(0, len(images), batch)]
    )


def encode_text(pipe, captions: list[str], max_sequence_length: int):
    """Like FluxPipeline.encode_prompt, but with a graph (the text encoders train here)."""
    clip_ids = pipe.tokenizer(
        captions,
        padding="max_length",
        max_length=pipe.tokenizer_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    t5_ids = pipe.tokenizer_2(
        captions, padding="max_length", max_length=max_sequence_length, truncation=True, return_tensors="pt"
    ).input_ids
    pooled = pipe.text_encoder(clip_ids, output_hidden_states=False).pooler_output  # [B, D_clip]
    prompt_embeds = pipe.text_encoder_2(t5_ids, output_hidden_states=False)[0]  # [B, L, D_t5]
    return prompt_embeds, pooled


def train_flow(
    pipe, latents: torch.Tensor, captions: list[str], cfg: PretrainConfig, generator
) -> dict[str, float]:
    """Rectified-flow training of transformer + text encoders on packed, normalised latents."""
    transformer = pipe.transformer
    modules = [transformer, pipe.text_encoder, pipe.text_encoder_2]
    params = [p for m in modules for p in m.parameters()]
    for m in modules:
        m.train()
    optimizer = torch.optim.AdamW(params, lr=cfg.flow_lr, weight_decay=1e-4)
    n, c, h, w = latents.shape
    image_ids = pipe._prepare_latent_image_ids(1, h // 2, w // 2, "cpu", torch.float32)
    text_ids = torch.zeros(cfg.max_sequence_length, 3)
    guidance = torch.full((cfg.flow_batch,), cfg.guidance_scale)
    bar = tqdm(range(cfg.flow_steps), desc="flow")
    ema_loss = None
    for step in bar:
        _cosine_lr(optimizer, step, cfg.flow_steps, cfg.flow_lr, warmup=200)
        idx = torch.randint(n, (cfg.flow_batch,), generator=generator)
        x0 = pipe._pack_latents(latents[idx], cfg.flow_batch, c, h, w)  # [B, S, 4C]
        noise = torch.randn(x0.shape, generator=generator)
        sigma = torch.sigmoid(torch.randn(cfg.flow_batch, generator=generator))  # logit-normal
        x_sigma = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
        prompt_embeds, pooled = encode_text(
            pipe, [captions[i] for i in idx.tolist()], cfg.max_sequence_length
        )
        velocity = transformer(
            hidden_states=x_sigma,
            timestep=sigma,
            guidance=guidance,
            pooled_projections=pooled,
            encoder_hidden_states=prompt_embeds,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        loss = F.mse_loss(velocity, noise - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        ema_loss = loss.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * loss.item()
        if step % 25 == 0:
            bar.set_postfix(loss=f"{ema_loss:.4f}")
    for m in modules:
        m.eval()
    return {"flow/loss_ema": ema_loss}


def pretrain(out_dir: Path, cfg: PretrainConfig, prompt_file: Path | None = None) -> dict[str, float]:
    """Both stages; saves the pipeline folder atomically with a pretrain.json beside the weights."""
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    if prompt_file is not None:
        records = read_prompts(prompt_file)
    else:
        from leapalign.world.prompts import PromptRecord

        table, _ = build_prompt_sets(cfg.seed, cfg.n_train, 1)
        records = [
            PromptRecord(prompt=p, category=c, seed=s)
            for p, c, s in zip(
                table.column("prompt").to_pylist(),
                table.column("category").to_pylist(),
                table.column("seed").to_pylist(),
                strict=True,
            )
        ]
    images = render_dataset(records, cfg.resolution)
    captions = [r.prompt for r in records]
    pipe = build_tiny_flux_pipeline(MINI_SPEC, words=list_caption_words(), seed=cfg.seed)
    stats = train_vae(pipe.vae, images, cfg, generator)
    raw = encode_latents(pipe.vae, images)
    shift, scale = raw.mean().item(), 1.0 / raw.std().item()
    pipe.vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    latents = (raw - shift) * scale  # what FluxPipeline's decode inverts
    stats.update(train_flow(pipe, latents, captions, cfg, generator))
    stats.update(
        {"vae/shift_factor": shift, "vae/scaling_factor": scale, "time/total_s": time.perf_counter() - t0}
    )
    for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        module.requires_grad_(False)
    out = save_pipeline(pipe, out_dir)
    (out / "pretrain.json").write_text(json.dumps({"config": asdict(cfg), "stats": stats}, indent=2))
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, type=Path, help="new folder for the diffusers pipeline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=PretrainConfig.vae_steps)
    parser.add_argument("--flow-steps", type=int, default=PretrainConfig.flow_steps)
    parser.add_argument("--n-train", type=int, default=PretrainConfig.n_train)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 keeps torch's default")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)  # on a shared 2-core box one thread avoids oversubscription
    cfg = PretrainConfig(
        seed=args.seed, vae_steps=args.vae_steps, flow_steps=args.flow_steps, n_train=args.n_train
    )
    stats = pretrain(args.out, cfg)
    print(json.dumps(stats, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
