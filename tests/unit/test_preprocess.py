"""Differentiable CLIP preprocessing against the original processors: transformers' CLIPImageProcessor
(PIL backend), open_clip's / OpenAI clip's torchvision transform (restated with PIL), HPSv2's ResizeMaxSize.

Units: differences are in normalised pixel_values (divide by ~0.27 for the [0, 1] scale). The PIL 8-bit
path rounds to 1/255 twice; we reproduce its clipping but not its rounding (no gradient through it), so
uint8 references agree to ~1.2/255 per pixel (<= 0.02 normalised), float references to ~1e-7.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from leapalign.rewards.preprocess import (
    CLIP_IMAGE_MEAN,
    CLIP_IMAGE_STD,
    ImageTransform,
    check_images,
    check_prompts,
    hf_image_transform,
    hpsv2_transform,
    open_clip_transform,
    preprocess_images,
)

SIZES = [(32, 32), (48, 80), (97, 61), (224, 224), (300, 200)]  # (height, width): up, down, both aspects
UINT8_BOUND = 0.02  # 1.2 / 255 / min(std): PIL's two roundings to 1/255, which we do not reproduce
FLOAT_BOUND = 1e-5  # PIL "F" mode computes in float32
MEAN, STD = np.array(CLIP_IMAGE_MEAN)[:, None, None], np.array(CLIP_IMAGE_STD)[:, None, None]


def random_image(height: int, width: int, seed: int, kind: str) -> np.ndarray:
    """uint8 [H, W, 3]: "noise" (worst case: every pixel an edge) or "scene" (smooth + sharp edges)."""
    rng = np.random.default_rng(seed)
    if kind == "noise":
        return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    coarse = torch.from_numpy(rng.random((1, 3, 4, 4)))
    smooth = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=True)[0]
    image = smooth.permute(1, 2, 0).numpy()
    top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
    image[top : top + height // 3, left : left + width // 3] = rng.random(3)  # a flat box: hard edges
    return np.round(image * 255).astype(np.uint8)


def as_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float64 [1, 3, H, W] in [0, 1]: what ToTensor / rescale(1/255) give."""
    return torch.from_numpy(image).permute(2, 0, 1)[None].double() / 255


def pil_float_resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """[3, H, W] floats -> [3, height, width] with PIL's bicubic in float ("F") mode: no rounding, no clip."""
    channels = [Image.fromarray(c.astype(np.float32), mode="F") for c in image]
    return np.stack(
        [np.asarray(c.resize((width, height), Image.BICUBIC), dtype=np.float64) for c in channels]
    )


def torchvision_reference(image: np.ndarray, size: int) -> np.ndarray:
    """open_clip / OpenAI clip eval transform on a PIL image, restated: torchvision's Resize(int) on PIL is
    img.resize with the shorter side = size and int() for the longer; CenterCrop's offset is
    int(round((H - h) / 2.0)); ToTensor divides by 255."""
    height, width = image.shape[:2]
    short, long = min(height, width), max(height, width)
    new_long = int(size * long / short)
    new_h, new_w = (new_long, size) if width <= height else (size, new_long)
    pil = Image.fromarray(image)
    if (new_h, new_w) != (height, width):
        pil = pil.resize((new_w, new_h), Image.BICUBIC)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    pixels = np.asarray(pil.crop((left, top, left + size, top + size)), dtype=np.float64) / 255
    return (pixels.transpose(2, 0, 1) - MEAN) / STD


def hpsv2_reference(image: np.ndarray, size: int) -> np.ndarray:
    """HPSv2's preprocess_val: ToTensor, ResizeMaxSize (round(dim * scale), bicubic on floats, zero pad
    [left = pad_w // 2, top = pad_h // 2]), Normalize."""
    pixels = image.transpose(2, 0, 1).astype(np.float64) / 255
    height, width = pixels.shape[1:]
    scale = size / max(height, width)
    new_h, new_w = round(height * scale), round(width * scale)
    resized = pil_float_resize(pixels, new_h, new_w)
    canvas = np.zeros((3, size, size))
    top, left = (size - new_h) // 2, (size - new_w) // 2
    canvas[:, top : top + new_h, left : left + new_w] = resized
    return (canvas - MEAN) / STD


# --------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("kind", ["noise", "scene"])
@pytest.mark.parametrize("height,width", SIZES)
def test_hf_transform_matches_clip_image_processor(height, width, kind):
    from transformers.models.clip import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil()  # openai/clip-vit-*: shortest_edge 224, crop 224, bicubic
    transform = hf_image_transform(processor.to_dict(), image_size=224)
    image = random_image(height, width, seed=height * width, kind=kind)
    expected = processor(images=Image.fromarray(image), return_tensors="np")["pixel_values"][0]
    ours = transform(as_tensor(image))[0].numpy()
    assert ours.shape == expected.shape == (3, 224, 224), f"shape {ours.shape} vs {expected.shape}"
    diff = np.abs(ours - expected)
    assert diff.max() <= UINT8_BOUND, (
        f"{kind} {height}x{width}: max |ours - CLIPImageProcessor| = {diff.max():.4f} "
        f"(mean {diff.mean():.5f}) > {UINT8_BOUND}"
    )
    if (height, width) == (224, 224):
        assert diff.max() < 1e-6, f"no resize, no rounding: must be exact, got {diff.max():.2e}"


@pytest.mark.parametrize("height,width", SIZES)
def test_antialiased_bicubic_is_pils_filter(height, width):
    image = as_tensor(random_image(height, width, seed=7, kind="scene"))
    for new_h, new_w in [(224, 224), (height // 2 + 3, width + 17), (17, 9)]:
        ours = F.interpolate(image, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
        expected = pil_float_resize(image[0].numpy(), new_h, new_w)
        diff = np.abs(ours[0].numpy() - expected).max()
        assert diff < FLOAT_BOUND, f"{height}x{width} -> {new_h}x{new_w}: max |torch - PIL F| = {diff:.2e}"


@pytest.mark.parametrize("height,width", SIZES)
def test_open_clip_transform_matches_torchvision_recipe(height, width):
    image = random_image(height, width, seed=3, kind="scene")
    ours = open_clip_transform(224)(as_tensor(image))[0].numpy()
    diff = np.abs(ours - torchvision_reference(image, 224)).max()
    assert diff <= UINT8_BOUND, f"{height}x{width}: max |ours - Resize+CenterCrop+Normalize| = {diff:.4f}"


@pytest.mark.parametrize("height,width", SIZES)
def test_hpsv2_transform_matches_resize_max_size(height, width):
    image = random_image(height, width, seed=5, kind="noise")
    ours = hpsv2_transform(224)(as_tensor(image))[0].numpy()
    diff = np.abs(ours - hpsv2_reference(image, 224)).max()
    assert diff < FLOAT_BOUND / 0.26, f"{height}x{width}: max |ours - HPSv2 ResizeMaxSize| = {diff:.2e}"


def test_crop_offsets_differ_exactly_where_the_originals_do():
    # 227 - 224 = 3: transformers floors 1.5 to 1, torchvision rounds it (half to even) to 2.
    image = random_image(227, 224, seed=11, kind="noise")
    hf = hf_image_transform(None, image_size=224)(as_tensor(image))[0].numpy()
    tv = open_clip_transform(224)(as_tensor(image))[0].numpy()
    normalised = (image.transpose(2, 0, 1) / 255 - MEAN) / STD
    assert np.abs(hf - normalised[:, 1:225]).max() < 1e-6, "transformers: top offset floor(3 / 2) = 1"
    assert np.abs(tv - normalised[:, 2:226]).max() < 1e-6, "torchvision: top offset round(1.5) = 2"
    assert np.abs(tv - torchvision_reference(image, 224)).max() < 1e-6, "and the restated recipe agrees"


def test_square_images_get_the_same_pixels_from_every_recipe():
    image = as_tensor(random_image(300, 300, seed=2, kind="scene"))
    hf = hf_image_transform(None, image_size=224)(image)
    tv = open_clip_transform(224)(image)
    hps = hpsv2_transform(224)(image)
    assert torch.equal(hf, tv), "square: no crop offset, so transformers == torchvision"
    # HPSv2 resizes floats without clipping; a smooth image barely overshoots [0, 1].
    assert (hps - hf).abs().max() < 0.05, f"HPSv2 vs CLIP on a square image: {(hps - hf).abs().max():.4f}"


def test_processor_config_forms_are_read_like_transformers():
    laion_style = {"crop_size": 224, "size": 224, "resample": 3, "image_mean": list(CLIP_IMAGE_MEAN),
                   "image_std": list(CLIP_IMAGE_STD), "feature_extractor_type": "CLIPFeatureExtractor"}  # fmt: skip
    modern = {"crop_size": {"height": 224, "width": 224}, "size": {"shortest_edge": 224}, "resample": 3}
    assert (
        hf_image_transform(laion_style, 224)
        == hf_image_transform(modern, 224)
        == hf_image_transform(None, 224)
    ), "int sizes (old feature-extractor files) mean shortest_edge / square crop, as in transformers"
    assert hf_image_transform({"resample": 2}, 32).resample == "bilinear", "PIL code 2 is bilinear"
    with pytest.raises(ValueError, match="resample=1"):
        hf_image_transform({"resample": 1}, 224)  # LANCZOS: no differentiable twin here
    with pytest.raises(ValueError, match="do not belong together"):
        hf_image_transform(modern, image_size=336)
    with pytest.raises(ValueError, match="do_center_crop"):
        hf_image_transform({"do_center_crop": False}, 224)


# ------------------------------------------------------------------------------------ gradients


@pytest.mark.parametrize("name", ["hf", "open_clip", "hpsv2"])
def test_preprocessing_gradients_match_finite_differences(name):
    transform = {
        "hf": hf_image_transform(None, image_size=6),
        "open_clip": open_clip_transform(6),
        "hpsv2": hpsv2_transform(6),
    }[name]
    # values in [0.3, 0.7]: bicubic overshoot stays inside [0, 1], away from the clip's kinks
    images = (0.3 + 0.4 * torch.rand(2, 3, 9, 13, generator=torch.Generator().manual_seed(0))).double()
    images.requires_grad_(True)
    assert torch.autograd.gradcheck(transform, (images,), eps=1e-6, atol=1e-7), f"{name}: d pixels / d image"


def test_mini_scorer_training_path_is_plain_normalisation_at_its_size():
    images = torch.rand(2, 3, 32, 32)
    mean, std = torch.tensor([0.9, 0.9, 0.9]), torch.tensor([0.25, 0.24, 0.23])
    out = preprocess_images(images, 32, mean, std)
    expected = (images - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    assert out.dtype == images.dtype and torch.allclose(out, expected, atol=1e-6), (
        "no resize at the model size"
    )
    resized = preprocess_images(torch.rand(1, 3, 64, 48), 32, mean, std)
    assert resized.shape == (1, 3, 32, 32), f"shorter side 48 -> 32, crop 32: got {tuple(resized.shape)}"


# ------------------------------------------------------------------------------------ bad input


def test_bad_images_and_prompts_are_rejected_with_the_fix():
    good = torch.rand(2, 3, 8, 8)
    check_images(good, 2)
    cases = [
        (torch.rand(2, 8, 8, 3), "permute"),
        (good * 255, r"x / 255"),
        (good * 2 - 1.6, r"\(x \+ 1\) / 2"),
        (torch.full((2, 3, 8, 8), float("nan")), "NaN or inf"),
        ((good * 255).to(torch.uint8), "float tensor"),
        (torch.rand(3, 3, 8, 8), "pair up"),
    ]
    for images, fix in cases:
        with pytest.raises(ValueError, match=fix):
            check_images(images, 2)
    assert check_prompts(("a cat", "a dog")) == ["a cat", "a dog"], "sequences become lists"
    for prompts, fix in [(["a cat", "  "], "prompt 1 is empty"), ("a cat", "not a single string"),
                         (["a cat", None], "prompt 1 is NoneType")]:  # fmt: skip
        with pytest.raises(ValueError, match=fix):
            check_prompts(prompts)


def test_transform_rejects_inconsistent_settings():
    with pytest.raises(ValueError, match="smaller than crop"):
        ImageTransform(size=200, crop_size=(224, 224))
    with pytest.raises(ValueError, match="pads to a square"):
        ImageTransform(size=224, crop_size=(224, 200), resize_mode="longest")
    with pytest.raises(ValueError, match="resample='nearest'"):
        ImageTransform(size=224, crop_size=(224, 224), resample="nearest")
