"""Tiny Flux pipelines built from configs, with offline tokenizers, saved as diffusers folders.

Nothing is downloaded: the classes are diffusers' and transformers' own (FluxTransformer2DModel,
AutoencoderKL, CLIPTextModel, T5EncoderModel, CLIPTokenizer, T5Tokenizer), sized down, and the
tokenizers are built in code from a word list. The folder loads through `FluxPolicy.from_pretrained`,
the same path as Flux.1-dev.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

import torch

# Whole-word tokens; every other word falls back to characters. The miniature world passes its own.
DEFAULT_WORDS = (
    "a", "an", "the", "and", "of", "to", "in", "on", "with", "photo", "image", "left", "right", "above",
    "below", "top", "bottom", "red", "green", "blue", "yellow", "magenta", "cyan", "white", "black",
    "square", "squares", "circle", "circles", "triangle", "triangles", "one", "two", "three", "cat", "dog",
)  # fmt: skip
CHARS = string.ascii_lowercase + string.digits + "-',.!?"


@dataclass(frozen=True)
class TinyFluxSpec:
    """Sizes of a tiny Flux. Defaults: about 0.2M parameters, 32x32 px images in a few ms on CPU."""

    num_layers: int = 1  # double-stream (MM-DiT) blocks
    num_single_layers: int = 1  # single-stream blocks
    attention_head_dim: int = 16  # = sum(axes_dims_rope)
    num_attention_heads: int = 2
    axes_dims_rope: tuple[int, int, int] = (4, 6, 6)
    latent_channels: int = 4  # VAE latent channels; the transformer sees 4x that (2x2 packing)
    vae_block_out_channels: tuple[int, ...] = (16, 16)  # len 2 -> the VAE downsamples 2x
    vae_norm_groups: int = 4
    clip_hidden: int = 32
    t5_d_model: int = 32
    text_layers: int = 1
    guidance_embeds: bool = True


def build_tokenizers(words: tuple[str, ...] = DEFAULT_WORDS):
    """A CLIP BPE tokenizer and a T5 unigram tokenizer over `words` + single characters."""
    from transformers import CLIPTokenizer, T5Tokenizer

    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in CHARS:
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:  # merge left to right: the whole word becomes one token
            pair = (pieces[0], pieces[1])
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            pieces = [pair[0] + pair[1], *pieces[2:]]
    clip_tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, -1.0) for w in words] + [("\u2581", -2.0)] + [(c, -3.0) for c in CHARS]
    t5_tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0)
    return clip_tokenizer, t5_tokenizer


def build_tiny_flux_pipeline(
    spec: TinyFluxSpec = TinyFluxSpec(), words: tuple[str, ...] = DEFAULT_WORDS, seed: int = 0
):
    """A randomly initialised FluxPipeline with real diffusers/transformers classes (fp32, CPU)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    if sum(spec.axes_dims_rope) != spec.attention_head_dim:
        raise ValueError(
            f"axes_dims_rope {spec.axes_dims_rope} must sum to attention_head_dim={spec.attention_head_dim}"
        )
    clip_tokenizer, t5_tokenizer = build_tokenizers(words)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_tokenizer), hidden_size=spec.clip_hidden, intermediate_size=2 * spec.clip_hidden,
            num_hidden_layers=spec.text_layers, num_attention_heads=2, max_position_embeddings=77,
            bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=spec.clip_hidden,
        )
    )  # fmt: skip
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tokenizer), d_model=spec.t5_d_model, d_kv=8, d_ff=2 * spec.t5_d_model,
            num_layers=spec.text_layers, num_heads=2, relative_attention_num_buckets=8,
            relative_attention_max_distance=32, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        )
    )  # fmt: skip
    channels = list(spec.vae_block_out_channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=spec.latent_channels,
        down_block_types=["DownEncoderBlock2D"] * len(channels), up_block_types=["UpDecoderBlock2D"] * len(channels),
        block_out_channels=channels, layers_per_block=1, norm_num_groups=spec.vae_norm_groups,
        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.0, shift_factor=0.0,
    )  # fmt: skip
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * spec.latent_channels, num_layers=spec.num_layers,
        num_single_layers=spec.num_single_layers, attention_head_dim=spec.attention_head_dim,
        num_attention_heads=spec.num_attention_heads, joint_attention_dim=spec.t5_d_model,
        pooled_projection_dim=spec.clip_hidden, guidance_embeds=spec.guidance_embeds,
        axes_dims_rope=list(spec.axes_dims_rope),
    )  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )  # fmt: skip
    return FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=t5_tokenizer, transformer=transformer,
    )  # fmt: skip


def save_pipeline(pipe, out_dir: str | Path) -> Path:
    """save_pretrained into a temp folder, then rename: a crash never leaves half a model folder."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty: choose a new folder or remove it first")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.partial")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    pipe.save_pretrained(tmp)
    if out_dir.exists():
        out_dir.rmdir()
    tmp.rename(out_dir)
    return out_dir


def build_tiny_flux(out_dir: str | Path, spec: TinyFluxSpec = TinyFluxSpec(), seed: int = 0) -> Path:
    """Build a random tiny Flux and save it as a diffusers folder loadable by FluxPipeline.from_pretrained."""
    return save_pipeline(build_tiny_flux_pipeline(spec, seed=seed), out_dir)
