"""Flux (diffusers) as a policy: load, encode prompts, pack latents, predict velocity, decode.

Real Flux.1-dev, the tiny test model and the miniature-world model all load through
`FluxPolicy.from_pretrained`, i.e. diffusers' own `FluxPipeline.from_pretrained`. The pipeline's
`__call__` runs under no_grad and hides its loop, so training uses the pieces here and writes the
loop out (leapalign.sampling, leapalign.methods).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from leapalign.compute import ComputeMeter
from leapalign.data import pick_dtype, resolve_model_path
from leapalign.sampling import VelocityFn, flux_sigmas, rollout

if TYPE_CHECKING:
    from leapalign.text_cache import TextCache


@dataclass
class PromptEmbeds:
    """Frozen text conditioning of one batch (no graph)."""

    prompt_embeds: Tensor  # [B, L, D_t5] T5 token states
    pooled_prompt_embeds: Tensor  # [B, D_clip] pooled CLIP embedding
    text_ids: Tensor  # [L, 3] zeros (RoPE ids of text tokens)

    def repeat(self, times: int) -> PromptEmbeds:
        """Each prompt `times` times in a row (GRPO groups, several images per prompt)."""
        return PromptEmbeds(
            self.prompt_embeds.repeat_interleave(times, dim=0),
            self.pooled_prompt_embeds.repeat_interleave(times, dim=0),
            self.text_ids,
        )

    def select(self, index: slice | Tensor) -> PromptEmbeds:
        """The rows `index` of the batch (a slice or a tensor of indices)."""
        return PromptEmbeds(self.prompt_embeds[index], self.pooled_prompt_embeds[index], self.text_ids)


class FluxPolicy:
    """The frozen parts (text encoders, VAE) and the trained transformer of a diffusers Flux."""

    def __init__(
        self,
        pipe,
        device: torch.device,
        autocast_dtype: torch.dtype | None = None,
        text_cache: TextCache | None = None,
    ):
        self.pipe = pipe
        self.device = device
        self.autocast_dtype = autocast_dtype  # bf16 autocast on GPU; None runs in the weights' dtype
        self.text_cache = text_cache  # precomputed prompt embeddings; then the pipeline has no text encoders
        self.transformer = pipe.transformer
        self.vae = pipe.vae
        self.vae_scale_factor = pipe.vae_scale_factor
        self.num_channels_latents = self.transformer.config.in_channels // 4
        self.meter: ComputeMeter | None = None  # counts transformer calls (compute accounting) when set
        # Forwards that build a graph go through this wrapper when set (DDP: its hooks reduce the gradients);
        # no-grad forwards (rollouts, grids) call the transformer itself and never touch a collective.
        self.grad_module: torch.nn.Module | None = None
        # No-grad forwards through torch.compile when set (sampler.compile, `compile_no_grad_calls`).
        self.compiled: torch.nn.Module | None = None
        for module in (pipe.text_encoder, pipe.text_encoder_2, pipe.vae):
            if module is not None:
                module.requires_grad_(False)
                module.eval()

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        dtype: str = "auto",
        device: str | torch.device | None = None,
        revision: str | None = None,
        autocast: bool | None = None,
        text_cache: str | None = None,
    ) -> FluxPolicy:
        """Load through diffusers' FluxPipeline.from_pretrained (hub id or local diffusers folder).

        text_cache: a folder written by `leapalign embed` for this model, max_sequence_length and dtype. The
        pipeline is then loaded without text encoders and tokenizers (None), and prompts are looked up.
        """
        from diffusers import FluxPipeline

        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch_dtype = pick_dtype(dtype, device)
        local = resolve_model_path(path)
        cache, skipped = None, {}
        if text_cache is not None:
            from leapalign.text_cache import TEXT_COMPONENTS, TextCache

            cache = TextCache(text_cache)
            cache.check_dtype(torch_dtype)
            cache.check_model(path, revision)
            skipped = dict.fromkeys(TEXT_COMPONENTS)  # text_encoder=None, ...: never built, never downloaded
        try:
            pipe = FluxPipeline.from_pretrained(local, dtype=torch_dtype, revision=revision, **skipped)
        except (OSError, ValueError) as err:
            raise FileNotFoundError(f"could not load a Flux pipeline from {path!r}: {err}") from err
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        use_autocast = device.type == "cuda" if autocast is None else autocast
        return cls(pipe, device, torch.bfloat16 if use_autocast else None, text_cache=cache)

    # ------------------------------------------------------------------ shapes

    def check_resolution(self, height: int, width: int) -> None:
        multiple = self.vae_scale_factor * 2
        for name, value in (("height", height), ("width", width)):
            if value % multiple:
                raise ValueError(
                    f"sampler.{name}={value} must be a multiple of {multiple}: the VAE downsamples "
                    f"{self.vae_scale_factor}x and latents are packed 2x2"
                )

    def image_seq_len(self, height: int, width: int) -> int:
        return (height // (self.vae_scale_factor * 2)) * (width // (self.vae_scale_factor * 2))

    def sigmas(self, num_steps: int, height: int, width: int) -> Tensor:
        """The scheduler's dynamically shifted grid for this resolution: [num_steps + 1]."""
        config = self.pipe.scheduler.config
        return flux_sigmas(
            num_steps,
            self.image_seq_len(height, width),
            base_seq_len=config.get("base_image_seq_len", 256),
            max_seq_len=config.get("max_image_seq_len", 4096),
            base_shift=config.get("base_shift", 0.5),
            max_shift=config.get("max_shift", 1.15),
            device=self.device,
        )

    # ------------------------------------------------------------------ conditioning and noise

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], max_sequence_length: int = 512) -> PromptEmbeds:
        """The one place that chooses: the text cache when the policy has one, else the text encoders."""
        prompts, length = list(prompts), max_sequence_length
        if self.text_cache is not None:
            prompt_embeds, pooled, text_ids = self.text_cache.lookup(prompts, length, self.device)
        else:
            prompt_embeds, pooled, text_ids = self.pipe.encode_prompt(
                prompt=prompts, prompt_2=None, device=self.device, max_sequence_length=length
            )
        return PromptEmbeds(prompt_embeds, pooled, text_ids)

    def prepare_latents(
        self, batch_size: int, height: int, width: int, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """Packed Gaussian noise [B, S, 4C] in fp32 and the image RoPE ids [S, 3].

        Drawn from the same (CPU) generator with the same call as FluxPipeline.prepare_latents, so
        a seed gives the same noise on every device.
        """
        self.check_resolution(height, width)
        latents, latent_image_ids = self.pipe.prepare_latents(
            batch_size, self.num_channels_latents, height, width, torch.float32, generator.device, generator
        )
        return latents.to(self.device), latent_image_ids.to(self.device)

    def latent_image_ids(self, height: int, width: int) -> Tensor:
        """The image tokens' RoPE ids [S, 3], as FluxPipeline.prepare_latents makes them."""
        self.check_resolution(height, width)
        rows, cols = height // (self.vae_scale_factor * 2), width // (self.vae_scale_factor * 2)
        return self.pipe._prepare_latent_image_ids(1, rows, cols, self.device, torch.float32)

    # ------------------------------------------------------------------ model

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def compile_no_grad_calls(self) -> None:
        """Forwards without a graph (the rollout's no-grad steps, evaluation, grids) run the transformer
        through torch.compile (inductor: fused kernels; CUDA or a C++ compiler on CPU). Forwards that build a
        graph stay eager: they go through the DDP wrapper and autograd as before. The batch dimension is
        compiled dynamic, so training batches and evaluation batches share one compiled graph. Values agree
        with eager ones to float rounding (fusion reorders arithmetic; tests/unit/test_compile.py)."""
        self.compiled = torch.compile(self.transformer)

    def velocity_fn(
        self, cond: PromptEmbeds, latent_image_ids: Tensor, guidance_scale: float, *, compiled: bool = True
    ) -> VelocityFn:
        """v_theta(latents, sigma) for this batch's conditioning; returns fp32 [B, S, 4C].

        compiled=False keeps no-grad calls eager too (GRPO: the rollout's log-probs and the update's must
        come from the same kernels, or the PPO ratio starts away from 1)."""
        transformer = self.transformer
        weight_dtype = transformer.dtype

        def velocity(latents: Tensor, sigma: Tensor) -> Tensor:
            batch = latents.shape[0]
            guidance = None
            if transformer.config.guidance_embeds:
                guidance = torch.full((batch,), guidance_scale, device=latents.device, dtype=torch.float32)
            timestep = sigma.expand(batch).to(weight_dtype)
            inputs = {
                "hidden_states": latents.to(weight_dtype),
                "timestep": timestep,
                "guidance": guidance,
                "pooled_projections": cond.pooled_prompt_embeds.to(weight_dtype),
                "encoder_hidden_states": cond.prompt_embeds.to(weight_dtype),
            }
            if torch.is_grad_enabled():
                module = self.grad_module if self.grad_module is not None else transformer
            elif compiled and self.compiled is not None:
                module = self.compiled
                for value in inputs.values():
                    if value is not None:
                        torch._dynamo.maybe_mark_dynamic(value, 0)  # one graph for every batch size
            else:
                module = transformer
            with self.autocast():
                out = module(**inputs, txt_ids=cond.text_ids, img_ids=latent_image_ids, return_dict=False)[0]
            meter = self.meter
            return out.float() if meter is None else meter.count(out.float(), sigma)

        return velocity

    def decode(self, latents: Tensor, height: int, width: int) -> Tensor:
        """Packed latents [B, S, 4C] -> images [B, 3, H, W] in [0, 1], differentiable."""
        unpacked = self.pipe._unpack_latents(latents, height, width, self.vae_scale_factor)
        config = self.vae.config
        unpacked = unpacked / config.scaling_factor + (config.shift_factor or 0.0)
        with self.autocast():
            images = self.vae.decode(unpacked.to(self.vae.dtype), return_dict=False)[0]
        images = (images.float() / 2 + 0.5).clamp(0, 1)
        return images if self.meter is None else self.meter.count_decode(images)

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        *,
        num_steps: int,
        height: int,
        width: int,
        guidance_scale: float,
        generator: torch.Generator | None = None,
        latents: Tensor | None = None,
        max_sequence_length: int = 512,
    ) -> Tensor:
        """Plain ODE sampling (no graph): images [B, 3, H, W] in [0, 1], from noise drawn from `generator`
        or given as `latents` [B, S, C] (packed)."""
        cond = self.encode_prompts(prompts, max_sequence_length)
        if (generator is None) == (latents is None):
            raise ValueError("generate: give either a generator or the initial latents")
        if latents is None:
            latents, image_ids = self.prepare_latents(len(prompts), height, width, generator)
        else:
            image_ids = self.latent_image_ids(height, width)
            latents = latents.to(self.device)
        velocity = self.velocity_fn(cond, image_ids, guidance_scale)
        x0 = rollout(velocity, latents, self.sigmas(num_steps, height, width))
        return self.decode(x0, height, width)
