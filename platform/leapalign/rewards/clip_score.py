"""CLIP-style prompt-image agreement reward: the code path of PickScore / HPS, for any saved CLIPModel.

r[b] = scale * cos(image_embeds[b], text_embeds[b]), where the embeddings are CLIPModel's projected,
L2-normalised pooled outputs and `scale` defaults to the model's own `logit_scale.exp()` (PickScore
reports exactly this number). Nothing here is specific to the miniature scorer: the folder is loaded
with `CLIPModel.from_pretrained` / `AutoTokenizer.from_pretrained`, so `path` may equally be the shipped
`leapalign/assets/mini-scorer`, a folder written by `python -m leapalign.world.scorer --out DIR`, or a
Hub id such as `yuvalkirstain/PickScore_v1`.

Preprocessing is differentiable (the direct-gradient methods backpropagate the reward into the
pixels): resize the shorter side to `vision_config.image_size` with antialiased bilinear
interpolation, centre-crop (a no-op for square images), then normalise with the image_mean / image_std
of the folder's preprocessor_config.json, or CLIP's defaults when there is none. HF's CLIPProcessor
resizes with bicubic on uint8 PIL images, which is not differentiable; bilinear on floats is the
standard substitute in reward fine-tuning code (ReFL, DRaFT) and differs from it by a few 1e-3.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from leapalign.rewards.base import register_reward

# OpenAI CLIP's normalisation constants, used by PickScore/HPS and every CLIPImageProcessor default.
CLIP_IMAGE_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_IMAGE_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
# The scorer trained on the miniature world (python -m leapalign.world.scorer), shipped in the package.
MINI_SCORER_DIR = Path(__file__).resolve().parents[1] / "assets" / "mini-scorer"
# Images outside [-tol, 1 + tol] are in another convention ([-1, 1] or [0, 255]), not a small overshoot.
_RANGE_TOLERANCE = 0.5
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HOW_TO_MAKE = (
    "train one with `python -m leapalign.world.scorer --out DIR`, use the shipped scorer at "
    f"{MINI_SCORER_DIR}, or pass a Hub id such as yuvalkirstain/PickScore_v1"
)


def resolve_model_path(path: str | Path) -> str:
    """A local CLIPModel folder, or a string shaped like a Hub id; otherwise FileNotFoundError."""
    local = Path(path).expanduser()
    packaged = MINI_SCORER_DIR.parents[1] / str(path)  # shipped assets resolve like model.path does
    if not local.exists() and packaged.is_dir():
        local = packaged
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise FileNotFoundError(
                f"{local} has no config.json, so it is not a saved CLIPModel; {_HOW_TO_MAKE}"
            )
        return str(local)
    if local.exists():
        raise FileNotFoundError(f"{local} is a file, expected a CLIPModel folder; {_HOW_TO_MAKE}")
    text = str(path)
    if _HUB_ID.match(text) and not text.startswith((".", "~")):
        return text
    raise FileNotFoundError(f"CLIP scorer folder {local} does not exist; {_HOW_TO_MAKE}")


def read_image_stats(source: str) -> tuple[list[float], list[float]]:
    """(image_mean, image_std) from preprocessor_config.json in a folder or Hub repo, else CLIP's defaults."""
    from transformers.utils import cached_file

    config_file = cached_file(
        source,
        "preprocessor_config.json",
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
    )
    if config_file is None:
        return list(CLIP_IMAGE_MEAN), list(CLIP_IMAGE_STD)
    config = json.loads(Path(config_file).read_text())
    mean = [float(v) for v in config.get("image_mean", CLIP_IMAGE_MEAN)]
    std = [float(v) for v in config.get("image_std", CLIP_IMAGE_STD)]
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(
            f"{config_file}: image_mean/image_std must be 3 numbers each, std > 0; got {mean}, {std}"
        )
    return mean, std


def preprocess_images(images: Tensor, image_size: int, image_mean: Tensor, image_std: Tensor) -> Tensor:
    """[B, 3, H, W] in [0, 1] -> pixel_values [B, 3, S, S]: resize shorter side, centre-crop, normalise."""
    height, width = images.shape[-2:]
    if (height, width) != (image_size, image_size):
        factor = image_size / min(height, width)
        new_h, new_w = max(image_size, round(height * factor)), max(image_size, round(width * factor))
        images = F.interpolate(
            images, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False
        )
        top, left = (new_h - image_size) // 2, (new_w - image_size) // 2
        images = images[..., top : top + image_size, left : left + image_size]
    return (images - image_mean.view(1, 3, 1, 1)) / image_std.view(1, 3, 1, 1)


def check_images(images: Tensor, batch_size: int) -> None:
    """[B, 3, H, W] floats in [0, 1] (small overshoot allowed), or a ValueError that says how to fix it."""
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
    low, high = torch.aminmax(images.detach())  # CPU-GPU sync here: the price of a clear error
    if low < -_RANGE_TOLERANCE or high > 1.0 + _RANGE_TOLERANCE:
        raise ValueError(
            f"image values span [{low.item():.3f}, {high.item():.3f}] but must be in [0, 1]; "
            "map [-1, 1] outputs with (x + 1) / 2 and [0, 255] floats with x / 255"
        )


class ClipScore:
    """Frozen CLIPModel reward: scale * cosine(image, prompt). Differentiable w.r.t. the images only."""

    def __init__(
        self, path: str | Path = MINI_SCORER_DIR, scale: float | None = None, device: str | None = None
    ):
        from transformers import AutoTokenizer, CLIPModel

        source = resolve_model_path(path)
        try:
            model = CLIPModel.from_pretrained(source)
            self.tokenizer = AutoTokenizer.from_pretrained(source)
        except OSError as err:
            if Path(source).is_dir():
                raise
            raise FileNotFoundError(
                f"{source!r} is not a local folder and could not be loaded from the Hub ({err}); {_HOW_TO_MAKE}"
            ) from err
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.dtype = next(self.model.parameters()).dtype
        self.image_size = int(model.config.vision_config.image_size)
        mean, std = read_image_stats(source)
        self.image_mean = torch.tensor(mean, dtype=self.dtype, device=self.device)
        self.image_std = torch.tensor(std, dtype=self.dtype, device=self.device)
        self.scale = float(self.model.logit_scale.exp()) if scale is None else float(scale)
        self.max_length = min(
            int(self.tokenizer.model_max_length), int(model.config.text_config.max_position_embeddings)
        )
        self._text_embeds: dict[str, Tensor] = {}  # prompt -> normalised text_embeds [D]; constant (frozen)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        """Normalised text_embeds [B, D], computed once per distinct prompt string."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._text_embeds))
        if missing:
            tokens = self.tokenizer(
                missing, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            ).to(self.device)
            pooled = self.model.text_model(
                input_ids=tokens.input_ids, attention_mask=tokens.attention_mask
            ).pooler_output
            text_embeds = F.normalize(self.model.text_projection(pooled), dim=-1)  # [M, D]
            self._text_embeds.update(zip(missing, text_embeds, strict=True))
        return torch.stack([self._text_embeds[p] for p in prompts])

    def encode_images(self, images: Tensor) -> Tensor:
        """Normalised image_embeds [B, D]; keeps the graph to the pixels."""
        pixel_values = preprocess_images(
            images.to(self.device, self.dtype), self.image_size, self.image_mean, self.image_std
        )  # [B, 3, S, S]
        pooled = self.model.vision_model(pixel_values=pixel_values).pooler_output  # [B, hidden]
        return F.normalize(self.model.visual_projection(pooled), dim=-1)

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """images [B, 3, H, W] in [0, 1], B prompts -> rewards [B] on the images' device."""
        prompts = list(prompts)
        check_images(images, len(prompts))
        rewards = self.scale * (self.encode_images(images) * self.encode_prompts(prompts)).sum(dim=-1)  # [B]
        return rewards.to(images.device, images.dtype)


register_reward("clip_score")(ClipScore)
