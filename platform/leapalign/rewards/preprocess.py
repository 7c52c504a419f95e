"""Differentiable image preprocessing for CLIP-family rewards: the original processors, written in torch.

The published scorers preprocess uint8 PIL images, which stops gradients. Each transform here computes
the same numbers on float images [B, 3, H, W] in [0, 1] and keeps the graph to the pixels:

- transformers' CLIPImageProcessor (PickScore, CLIPScore): resize the shorter side to `size` with PIL
  bicubic, centre-crop with offset floor((H - h) / 2), x / 255, normalise.
- open_clip's / OpenAI clip's transform (the aesthetic predictor's CLIP): torchvision Resize(size,
  BICUBIC) on a PIL image, CenterCrop with offset round((H - h) / 2) (round half to even), ToTensor,
  Normalize. The same as above except for the crop offset when H - h = 3 mod 4.
- HPSv2's own scoring transform (create_model_and_transforms(light_augmentation=True)): ToTensor FIRST,
  then ResizeMaxSize: the LONGER side to `size` with torchvision's tensor bicubic (antialiased, no
  clipping), zero-pad (black) to a square, Normalize. For square images this equals the two above.

Bicubic: F.interpolate(mode="bicubic", antialias=True) uses PIL's filter (a = -0.5, support widened by
the scale factor when shrinking); it reproduces PIL's float ("F" mode) resize to about 1e-7. PIL's
8-bit path resizes horizontally, rounds and clips to [0, 255], then vertically, rounds and clips again.
`clamp_passes` reproduces the two passes and the clipping (without clipping, high-contrast images
differ by up to 0.5 after normalisation); the rounding to 1/255 is not reproduced (it has no gradient),
which leaves a difference of at most about 1.2 / 255 per pixel before normalisation.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

# OpenAI CLIP's normalisation constants: PickScore, HPSv2, the aesthetic predictor and every CLIPImageProcessor default.
CLIP_IMAGE_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_IMAGE_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
# PIL.Image.Resampling codes as stored in preprocessor_config.json -> F.interpolate modes with PIL's filters.
PIL_RESAMPLE = {2: "bilinear", 3: "bicubic"}
# Images outside [-tol, 1 + tol] are in another convention ([-1, 1] or [0, 255]), not a small overshoot.
RANGE_TOLERANCE = 0.5


@dataclass(frozen=True)
class ImageTransform:
    """One CLIP-family image processor as numbers; calling it maps [B, 3, H, W] in [0, 1] to pixel_values."""

    size: int  # resize target in pixels: the shorter side ("shortest") or the longer side ("longest")
    crop_size: tuple[int, int]  # (height, width) the vision model sees: centre crop, or the padded square
    image_mean: tuple[float, ...] = CLIP_IMAGE_MEAN  # per channel, on the [0, 1] scale
    image_std: tuple[float, ...] = CLIP_IMAGE_STD  # per channel, > 0
    resample: str = "bicubic"  # "bicubic" or "bilinear", both with PIL's antialiasing when shrinking
    resize_mode: str = "shortest"  # "shortest": resize + centre crop; "longest": resize + zero pad (HPSv2)
    clamp_passes: bool = True  # PIL's 8-bit resampler: horizontal pass, clip, vertical pass, clip
    crop_rounding: str = "floor"  # centre-crop offset: "floor" (transformers) or "round" (torchvision)
    value_scale: float = 1.0  # 255 * rescale_factor: 1.0 for the usual x / 255

    def __post_init__(self) -> None:
        if self.resample not in PIL_RESAMPLE.values():
            raise ValueError(f"resample={self.resample!r}: use one of {sorted(PIL_RESAMPLE.values())}")
        if self.resize_mode not in ("shortest", "longest"):
            raise ValueError(f"resize_mode={self.resize_mode!r}: use 'shortest' (crop) or 'longest' (pad)")
        if self.crop_rounding not in ("floor", "round"):
            raise ValueError(f"crop_rounding={self.crop_rounding!r}: use 'floor' or 'round'")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise ValueError(
                f"image_mean/image_std must be 3 numbers each, std > 0; got {self.image_mean}, {self.image_std}"
            )
        if self.resize_mode == "shortest" and self.size < max(self.crop_size):
            raise ValueError(
                f"resize size {self.size} is smaller than crop {self.crop_size}: the crop would need padding"
            )
        if self.resize_mode == "longest" and self.crop_size != (self.size, self.size):
            raise ValueError(
                f"resize_mode='longest' pads to a square: crop_size must be ({self.size}, {self.size})"
            )

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after the resize, with the originals' integer arithmetic."""
        if self.resize_mode == "longest":  # HPSv2 ResizeMaxSize: round(dim * scale), Python's round
            scale = self.size / max(height, width)
            return round(height * scale), round(width * scale)
        # transformers get_resize_output_image_size == torchvision Resize(int): truncate the longer side
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(self.size * long / short)
        return (new_long, self.size) if width <= height else (self.size, new_long)

    def __call__(self, images: Tensor) -> Tensor:
        """[B, 3, H, W] in [0, 1] -> pixel_values [B, 3, crop_h, crop_w], float32 or wider."""
        pixels = images.to(torch.promote_types(images.dtype, torch.float32))
        height, width = pixels.shape[-2:]
        pixels = self._resize(pixels, *self.resized_size(height, width))
        if self.resize_mode == "shortest":
            pixels = self._centre_crop(pixels)
        else:
            pad_h, pad_w = self.size - pixels.shape[-2], self.size - pixels.shape[-1]
            # HPSv2 pads only when it resized; we always pad, or a 224 x 100 input would reach the ViT.
            pixels = F.pad(
                pixels, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0
            )
        mean = torch.tensor(self.image_mean, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
        if self.value_scale != 1.0:
            pixels = pixels * self.value_scale
        return (pixels - mean) / std

    def _resize(self, pixels: Tensor, height: int, width: int) -> Tensor:
        def interpolate(x: Tensor, size: tuple[int, int]) -> Tensor:
            return F.interpolate(x, size=size, mode=self.resample, antialias=True, align_corners=False)

        if not self.clamp_passes:  # torchvision's tensor resize: one call, no clipping for floats
            return pixels if pixels.shape[-2:] == (height, width) else interpolate(pixels, (height, width))
        if pixels.shape[-1] != width:  # PIL resizes horizontally first
            pixels = interpolate(pixels, (pixels.shape[-2], width)).clamp(0.0, 1.0)
        if pixels.shape[-2] != height:
            pixels = interpolate(pixels, (height, width)).clamp(0.0, 1.0)
        return pixels

    def _centre_crop(self, pixels: Tensor) -> Tensor:
        (height, width), (crop_h, crop_w) = pixels.shape[-2:], self.crop_size
        if self.crop_rounding == "floor":
            top, left = (height - crop_h) // 2, (width - crop_w) // 2
        else:  # torchvision: int(round((H - h) / 2.0)), which rounds half to even
            top, left = int(round((height - crop_h) / 2.0)), int(round((width - crop_w) / 2.0))
        return pixels[..., top : top + crop_h, left : left + crop_w]


def hf_image_transform(config: dict[str, Any] | None, image_size: int) -> ImageTransform:
    """transformers' CLIPImageProcessor from its preprocessor_config.json; its defaults when config is None.

    `image_size` is the vision model's input size: the default resize and crop, and a check on the config.
    """
    config = dict(config or {})
    unsupported = {k: config[k] for k in ("do_resize", "do_center_crop", "do_normalize") if k in config}
    if not all(unsupported.values()):
        raise ValueError(
            f"preprocessor_config.json sets {unsupported}: only the CLIP recipe (resize, centre crop, "
            "normalise) is implemented differentiably; remove those keys or set them to true"
        )
    size = config.get("size", {"shortest_edge": image_size})
    size = {"shortest_edge": size} if isinstance(size, int) else size
    crop = config.get("crop_size", {"height": image_size, "width": image_size})
    crop = {"height": crop, "width": crop} if isinstance(crop, int) else crop
    if set(size) != {"shortest_edge"} or set(crop) != {"height", "width"}:
        raise ValueError(
            f"preprocessor_config.json: size={size}, crop_size={crop}; expected size {{'shortest_edge': N}} "
            "and crop_size {'height': h, 'width': w} (the CLIPImageProcessor recipe)"
        )
    crop_size = (int(crop["height"]), int(crop["width"]))
    if crop_size != (image_size, image_size):
        raise ValueError(
            f"preprocessor_config.json crops to {crop_size} but the vision model takes {image_size} x {image_size}: "
            "the processor and the model folder do not belong together"
        )
    resample = int(config.get("resample", 3))
    if resample not in PIL_RESAMPLE:
        raise ValueError(
            f"preprocessor_config.json resample={resample}: only {PIL_RESAMPLE} have a differentiable twin here"
        )
    rescale = float(config.get("rescale_factor", 1 / 255)) if config.get("do_rescale", True) else 1.0
    return ImageTransform(
        size=int(size["shortest_edge"]),
        crop_size=crop_size,
        image_mean=tuple(float(v) for v in config.get("image_mean", CLIP_IMAGE_MEAN)),
        image_std=tuple(float(v) for v in config.get("image_std", CLIP_IMAGE_STD)),
        resample=PIL_RESAMPLE[resample],
        value_scale=round(255.0 * rescale, 9),  # 255 * (1 / 255) is 0.9999999999999999 in floats
    )


def open_clip_transform(
    image_size: int,
    image_mean: Sequence[float] = CLIP_IMAGE_MEAN,
    image_std: Sequence[float] = CLIP_IMAGE_STD,
) -> ImageTransform:
    """open_clip's / OpenAI clip's evaluation transform: Resize(bicubic, PIL) + CenterCrop + Normalize."""
    return ImageTransform(
        size=image_size,
        crop_size=(image_size, image_size),
        image_mean=tuple(image_mean),
        image_std=tuple(image_std),
        crop_rounding="round",
    )


def hpsv2_transform(
    image_size: int,
    image_mean: Sequence[float] = CLIP_IMAGE_MEAN,
    image_std: Sequence[float] = CLIP_IMAGE_STD,
) -> ImageTransform:
    """HPSv2's scoring transform: ToTensor, ResizeMaxSize (longer side, tensor bicubic, zero pad), Normalize."""
    return ImageTransform(
        size=image_size,
        crop_size=(image_size, image_size),
        image_mean=tuple(image_mean),
        image_std=tuple(image_std),
        resize_mode="longest",
        clamp_passes=False,
    )


def read_preprocessor_config(source: str) -> dict[str, Any] | None:
    """preprocessor_config.json of a local folder or a Hub repo as a dict, or None when there is none."""
    from transformers.utils import cached_file

    config_file = cached_file(
        source,
        "preprocessor_config.json",
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
    )
    if config_file is None:
        return None
    try:
        return json.loads(Path(config_file).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file} is not valid JSON ({err}): re-download or rewrite it") from None


def read_image_stats(source: str) -> tuple[list[float], list[float]]:
    """(image_mean, image_std) from preprocessor_config.json in a folder or Hub repo, else CLIP's defaults."""
    config = read_preprocessor_config(source) or {}
    mean = [float(v) for v in config.get("image_mean", CLIP_IMAGE_MEAN)]
    std = [float(v) for v in config.get("image_std", CLIP_IMAGE_STD)]
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(
            f"{source}/preprocessor_config.json: image_mean/image_std must be 3 numbers each, std > 0; "
            f"got {mean}, {std}"
        )
    return mean, std


def preprocess_images(
    images: Tensor, image_size: int, image_mean: Tensor, image_std: Tensor, resample: str = "bilinear"
) -> Tensor:
    """[B, 3, H, W] in [0, 1] -> pixel_values [B, 3, S, S]: resize shorter side, centre-crop, normalise.

    The miniature scorer's recipe (bilinear, as its preprocessor_config.json says); the training code in
    world/scorer.py calls it with tensors for the statistics.
    """
    transform = ImageTransform(
        size=image_size,
        crop_size=(image_size, image_size),
        image_mean=tuple(float(v) for v in image_mean),
        image_std=tuple(float(v) for v in image_std),
        resample=resample,
    )
    return transform(images).to(images.dtype)


def check_images(images: Tensor, batch_size: int) -> None:
    """[B, 3, H, W] finite floats in [0, 1] (small overshoot allowed), or a ValueError that says how to fix it."""
    if not isinstance(images, Tensor) or not images.is_floating_point():
        got = f"a tensor of dtype {images.dtype}" if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a float tensor [B, 3, H, W] in [0, 1], got {got}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"images must have shape [B, 3, H, W], got {tuple(images.shape)}; "
            "permute [B, H, W, 3] arrays with images.permute(0, 3, 1, 2)"
        )
    if images.shape[0] != batch_size:
        raise ValueError(f"got {images.shape[0]} images but {batch_size} prompts; they must pair up")
    if images.numel() == 0:
        raise ValueError(f"images have shape {tuple(images.shape)}: the batch is empty")
    low, high = torch.aminmax(images.detach())  # CPU-GPU sync here: the price of a clear error
    if not (torch.isfinite(low) and torch.isfinite(high)):
        raise ValueError(
            "images contain NaN or inf: the generator or the VAE decode diverged before the reward; "
            "lower the learning rate or check the loss of the previous steps"
        )
    if low < -RANGE_TOLERANCE or high > 1.0 + RANGE_TOLERANCE:
        raise ValueError(
            f"image values span [{low.item():.3f}, {high.item():.3f}] but must be in [0, 1]; "
            "map [-1, 1] outputs with (x + 1) / 2 and [0, 255] floats with x / 255"
        )


def check_prompts(prompts: Sequence[str]) -> list[str]:
    """The prompts as a list of non-empty strings, or a ValueError naming the first bad one."""
    if isinstance(prompts, str):
        raise ValueError("prompts must be a sequence of strings, one per image, not a single string")
    prompts = list(prompts)
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ValueError(f"prompt {index} is {type(prompt).__name__}, expected a string")
        if not prompt.strip():
            raise ValueError(
                f"prompt {index} is empty: a prompt-image scorer needs the prompt the image was generated "
                "from; drop empty lines from the prompt file"
            )
    return prompts
