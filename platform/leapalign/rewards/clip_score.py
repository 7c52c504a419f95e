"""CLIP-family prompt-image rewards: one loader (load_clip) and one scorer (scale * cosine), configured as
the published scorers.

    r[b] = scale * cos(image_embeds[b], text_embeds[b])

with CLIPModel's projected, L2-normalised pooled outputs. Differentiable with respect to the images only:
the weights are frozen and the text embeddings are computed once per prompt string and cached.

Scorer      registry name  weights                                            scale (default first)
ClipScore   clip_score     any CLIPModel folder / Hub id (default: the shipped   "logit" | "cosine" | "clipscore" | float
                           mini scorer; openai/clip-vit-large-patch14 for CLIPScore)
PickScore   pickscore      yuvalkirstain/PickScore_v1 + the processor of         "cosine" | "logit"
                           laion/CLIP-ViT-H-14-laion2B-s32B-b79K
HPSv21      hpsv2.1        HPS_v2.1_compressed.pt (open_clip ViT-H-14) or a      raw cosine, as the original
                           folder written by `leapalign reward convert`

Every scorer loads through `load_clip`: CLIPModel.from_pretrained on a folder or Hub id, or an open_clip
state-dict file mapped onto CLIPModel (checkpoints.py) and handed to the same from_pretrained. Images go
through the original processor's recipe in differentiable form (preprocess.py).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from leapalign.data import PACKAGE_DIR
from leapalign.rewards.base import RewardError
from leapalign.rewards.checkpoints import (
    CheckpointError,
    check_finite_weights,
    clip_from_open_clip,
    load_state_dict_file,
)
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
    read_preprocessor_config,
)

if TYPE_CHECKING:
    from transformers import CLIPModel

# preprocess_images is re-exported: world/scorer.py imports it from here.
__all__ = ["ClipScore", "HPSv21", "LoadedClip", "PickScore", "load_clip", "preprocess_images"]

# The scorer trained on the miniature world (python -m leapalign.world.scorer), shipped in the package.
MINI_SCORER_DIR = PACKAGE_DIR / "assets" / "mini-scorer"
PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
# PickScore's processor and HPSv2's tokenizer: open_clip's SimpleTokenizer is this byte-level BPE vocab.
VIT_H_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
HPSV2_REPO, HPSV21_FILE = "xswu/HPSv2", "HPS_v2.1_compressed.pt"
_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HOW_TO_MAKE = (
    "train one with `python -m leapalign.world.scorer --out DIR`, use the shipped scorer at "
    f"{MINI_SCORER_DIR}, or pass a Hub id such as openai/clip-vit-large-patch14"
)


@dataclass
class LoadedClip:
    """A frozen CLIPModel on its device, with what its processor needs."""

    model: CLIPModel
    tokenizer: Any | None  # None when not asked for (image-only scorers)
    processor_config: dict[str, Any] | None  # preprocessor_config.json, None when the source has none
    source: str  # where the weights came from, for messages


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r}: use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def locate_weights(path: str | Path, checkpoint_filename: str | None, how_to: str) -> tuple[str, str]:
    """("pretrained", folder or Hub id) for a CLIPModel folder, ("open_clip", file) for a state-dict file."""
    from transformers.utils import cached_file

    local = Path(path).expanduser()
    packaged = MINI_SCORER_DIR.parents[1] / str(path)  # shipped assets resolve like model.path does
    if not local.exists() and packaged.exists():
        local = packaged
    if local.is_file():
        return "open_clip", str(local)
    if local.is_dir():
        if (local / "config.json").is_file():
            return "pretrained", str(local)
        if checkpoint_filename and (local / checkpoint_filename).is_file():
            return "open_clip", str(local / checkpoint_filename)
        expected = (
            f"config.json (a CLIPModel folder) or {checkpoint_filename}"
            if checkpoint_filename
            else "config.json"
        )
        raise FileNotFoundError(f"{local} has no {expected}, so it is not a saved CLIP scorer; {how_to}")
    text = str(path)
    if not (_HUB_ID.match(text) and not text.startswith((".", "~"))):
        raise FileNotFoundError(f"CLIP scorer {local} does not exist; {how_to}")
    options = dict(_raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False)
    try:
        if cached_file(text, "config.json", **options) is not None:
            return "pretrained", text
        if checkpoint_filename and (found := cached_file(text, checkpoint_filename, **options)) is not None:
            return "open_clip", found
    except OSError as err:  # no such repo, no access
        raise FileNotFoundError(
            f"{text!r} is neither a local path nor a readable Hub repo ({err}); {how_to}"
        ) from None
    raise FileNotFoundError(
        f"{text!r} is not a local path and no CLIP scorer could be fetched from the Hub under that id "
        f"(offline, or no config.json{' / ' + checkpoint_filename if checkpoint_filename else ''} there); {how_to}"
    )


def load_clip(
    path: str | Path,
    processor_path: str | Path | None = None,
    checkpoint_filename: str | None = None,
    weights_only_processor: str | None = None,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    need_tokenizer: bool = True,
    open_clip_options: dict[str, Any] | None = None,
    how_to: str = _HOW_TO_MAKE,
) -> LoadedClip:
    """The one loading path of every CLIP-family reward: frozen CLIPModel + tokenizer + processor config.

    path: a CLIPModel folder or Hub id (CLIPModel.from_pretrained), or an open_clip state-dict file
    (a local file, or `checkpoint_filename` inside a folder or Hub repo without config.json), converted
    with checkpoints.clip_from_open_clip. processor_path: where the tokenizer and
    preprocessor_config.json live when not next to the weights (PickScore); for an open_clip file, which
    holds weights only, `weights_only_processor` is the fallback.
    """
    from transformers import AutoTokenizer, CLIPModel

    kind, source = locate_weights(path, checkpoint_filename, how_to)
    torch_dtype = resolve_dtype(dtype)
    if kind == "pretrained":
        try:
            model = CLIPModel.from_pretrained(source, dtype=torch_dtype)
        except OSError as err:
            raise FileNotFoundError(f"could not load a CLIPModel from {source!r} ({err}); {how_to}") from err
        check_finite_weights(model.state_dict(), source)
    else:
        processor_path = processor_path or weights_only_processor
        if processor_path is None:
            raise ValueError(
                f"{source} holds weights only: pass processor_path, a folder or Hub id with the tokenizer "
                f"(e.g. {VIT_H_PROCESSOR}), or convert it once with `leapalign reward convert`"
            )
        state_dict = load_state_dict_file(
            source, "an open_clip CLIP state dict (e.g. HPS_v2.1_compressed.pt)"
        )
        model = clip_from_open_clip(state_dict, source, dtype=torch_dtype, **(open_clip_options or {}))
    processor_source = str(processor_path) if processor_path is not None else source
    tokenizer = None
    if need_tokenizer:
        try:
            tokenizer = AutoTokenizer.from_pretrained(processor_source)
        except (OSError, ValueError) as err:
            raise FileNotFoundError(
                f"no tokenizer could be loaded from {processor_source!r} ({err})"
            ) from err
        check_tokenizer(tokenizer, model, processor_source)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(device).eval().requires_grad_(False)
    return LoadedClip(model, tokenizer, read_preprocessor_config(processor_source), source)


def check_tokenizer(tokenizer: Any, model: CLIPModel, source: str) -> None:
    """The tokenizer's ids must fit the text tower and end each prompt with the token the model pools at."""
    text_config = model.config.text_config
    if len(tokenizer) > text_config.vocab_size:
        raise CheckpointError(
            f"tokenizer {source!r} has {len(tokenizer)} tokens but the text tower embeds {text_config.vocab_size}: "
            "use the tokenizer the weights were trained with"
        )
    if text_config.eos_token_id != 2 and tokenizer.eos_token_id != text_config.eos_token_id:
        raise CheckpointError(
            f"tokenizer {source!r} ends prompts with id {tokenizer.eos_token_id} but the model pools at "
            f"eos_token_id={text_config.eos_token_id}: use the tokenizer the weights were trained with"
        )


def parse_scale(scale: float | str | None, model: CLIPModel) -> tuple[float, bool]:
    """(multiplier, clip_negative) for a scale option: "logit", "cosine", "clipscore" or a number."""
    if scale is None or scale == "logit":
        return float(model.logit_scale.exp()), False
    if scale == "cosine":
        return 1.0, False
    if scale == "clipscore":  # torchmetrics' CLIPScore: 100 * max(cos, 0)
        return 100.0, True
    try:
        return float(scale), False
    except (TypeError, ValueError):
        raise ValueError(
            f"scale={scale!r}: use 'logit' (logit_scale.exp() * cos), 'cosine', 'clipscore' "
            "(100 * max(cos, 0)) or a number"
        ) from None


class ClipScore:
    """Frozen CLIPModel reward r = scale * cos(image, prompt); differentiable w.r.t. the images only.

    Options: path (CLIPModel folder or Hub id; default the shipped mini scorer), scale, processor_path
    (tokenizer + preprocessor_config.json when not in `path`), device (default cuda if available), dtype
    ("float32" default, "bfloat16", "float16", "float64").

    Scales: "logit" (default) = logit_scale.exp() * cos, CLIP's own logit (100 * cos for OpenAI CLIP);
    "cosine" = raw cos in [-1, 1]; "clipscore" = 100 * max(cos, 0), torchmetrics' CLIPScore convention
    (Hessel et al. use 2.5 * max(cos, 0)); its gradient is zero where cos < 0. A number multiplies cos.
    The paper has no CLIPScore run: pick the hinge lambda above the base model's typical reward (for
    openai/clip-vit-large-patch14, raw cosines of matching pairs sit around 0.2-0.35, so about 0.4 on
    the cosine scale, 40 on the logit / clipscore scales).

    Images follow the folder's CLIPImageProcessor (preprocessor_config.json; CLIP's defaults at the
    model's input size when there is none): resize the shorter side, centre crop, normalise.
    """

    name = "clip_score"

    def __init__(
        self,
        path: str | Path = MINI_SCORER_DIR,
        scale: float | str | None = "logit",
        device: str | None = None,
        dtype: str | None = None,
        processor_path: str | None = None,
    ):
        loaded = load_clip(path, processor_path=processor_path, device=device, dtype=dtype)
        image_size = int(loaded.model.config.vision_config.image_size)
        self.setup(loaded, scale, hf_image_transform(loaded.processor_config, image_size))

    def setup(self, loaded: LoadedClip, scale: float | str | None, transform: ImageTransform) -> None:
        """Shared by every CLIP cosine scorer once its weights are loaded."""
        self.model, self.tokenizer, self.source = loaded.model, loaded.tokenizer, loaded.source
        self.device = next(self.model.parameters()).device
        self.dtype = next(self.model.parameters()).dtype
        self.transform = transform
        self.image_mean = torch.tensor(transform.image_mean, device=self.device)  # [3], for inspection
        self.image_std = torch.tensor(transform.image_std, device=self.device)
        self.scale, self.clip_negative = parse_scale(scale, self.model)
        self.max_length = min(
            int(self.tokenizer.model_max_length), int(self.model.config.text_config.max_position_embeddings)
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
            ).pooler_output  # [M, hidden], at each prompt's end-of-text token
            text_embeds = F.normalize(self.model.text_projection(pooled), dim=-1)  # [M, D]
            self._text_embeds.update(zip(missing, text_embeds, strict=True))
        return torch.stack([self._text_embeds[p] for p in prompts])

    def encode_images(self, images: Tensor) -> Tensor:
        """Normalised image_embeds [B, D]; keeps the graph to the pixels."""
        pixel_values = self.transform(images.to(self.device)).to(self.dtype)  # [B, 3, S, S]
        pooled = self.model.vision_model(pixel_values=pixel_values).pooler_output  # [B, hidden]
        return F.normalize(self.model.visual_projection(pooled), dim=-1)

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """images [B, 3, H, W] in [0, 1], B prompts -> rewards [B] on the images' device."""
        prompts = check_prompts(prompts)
        check_images(images, len(prompts))
        cosine = (self.encode_images(images) * self.encode_prompts(prompts)).sum(dim=-1)  # [B]
        rewards = self.scale * (cosine.clamp_min(0.0) if self.clip_negative else cosine)
        check_model_output(rewards, self.name, self.dtype)
        return rewards.to(images.device, images.dtype)


def check_model_output(rewards: Tensor, name: str, dtype: torch.dtype) -> None:
    """Finite images in, non-finite rewards out: the model overflowed or holds bad weights."""
    bad = ~torch.isfinite(rewards.detach())
    if bad.any():  # CPU-GPU sync here: one per call, to stop a NaN where it is made
        raise RewardError(
            f"{name} returned non-finite rewards at batch index {bad.nonzero().flatten().tolist()} for finite "
            f"images: the model overflowed in {dtype} or its weights are corrupt; load it with "
            "dtype='float32' or check the checkpoint"
        )


class PickScore(ClipScore):
    """PickScore (Kirstain et al. 2023): a CLIP ViT-H-14 fine-tuned on Pick-a-Pic preferences.

    Original (PickScore README): CLIPProcessor of laion/CLIP-ViT-H-14-laion2B-s32B-b79K (bicubic resize
    of the shorter side to 224, centre crop 224, OpenAI mean/std), CLIPModel yuvalkirstain/PickScore_v1,
    score = logit_scale.exp() * cos (logit_scale.exp() = 100; typical images score about 21-23).

    scale="cosine" (default): the raw cosine (about 0.21-0.23), as DanceGRPO and LeapAlign use it; the
    paper's hinge lambda 0.4 is on this scale. scale="logit": the original PickScore number; the same
    hinge is lambda = 0.4 * logit_scale.exp() = 40.
    """

    name = "pickscore"

    def __init__(
        self,
        path: str = PICKSCORE_MODEL,
        processor_path: str = VIT_H_PROCESSOR,
        scale: str = "cosine",
        device: str | None = None,
        dtype: str | None = None,
    ):
        if scale not in ("cosine", "logit"):
            raise ValueError(
                f"pickscore scale={scale!r}: use 'cosine' (LeapAlign, lambda 0.4) or 'logit' (PickScore)"
            )
        how_to = f"pass a CLIPModel folder or the Hub id {PICKSCORE_MODEL}"
        loaded = load_clip(path, processor_path=processor_path, device=device, dtype=dtype, how_to=how_to)
        image_size = int(loaded.model.config.vision_config.image_size)
        self.setup(loaded, scale, hf_image_transform(loaded.processor_config, image_size))


class HPSv21(ClipScore):
    """HPSv2.1 (Wu et al. 2023): an open_clip ViT-H-14 fine-tuned on human preference pairs.

    Original (hpsv2.img_score.score): open_clip CLIP ViT-H-14 (GELU) with HPS_v2.1_compressed.pt,
    SimpleTokenizer (the byte-level BPE of `processor_path`'s CLIPTokenizer), score = raw cosine of the
    normalised features (about 0.25-0.45). The paper's hinge lambda 0.55 is on this scale.

    path: HPS_v2.1_compressed.pt itself, a folder or Hub repo holding it (default xswu/HPSv2), or a
    folder written by `leapalign reward convert` (faster to load, no tokenizer download).
    processor_path: the tokenizer; default: the converted folder's own, or laion/CLIP-ViT-H-14-laion2B-
    s32B-b79K next to a .pt file (open_clip's SimpleTokenizer vocabulary).
    resize_mode: "longest" (default): HPSv2's own scoring transform (longer side to 224, zero pad to a
    square); "shortest": open_clip's standard transform (shorter side, centre crop). Square images get
    the same pixels either way. vision_heads / text_heads / hidden_act: for open_clip files of other
    sizes (ViT-H-14: 16 / 16 / "gelu", inferred).
    """

    name = "hpsv2.1"

    def __init__(
        self,
        path: str = HPSV2_REPO,
        processor_path: str | None = None,
        checkpoint_filename: str = HPSV21_FILE,
        resize_mode: str = "longest",
        device: str | None = None,
        dtype: str | None = None,
        vision_heads: int | None = None,
        text_heads: int | None = None,
        hidden_act: str = "gelu",
    ):
        if resize_mode not in ("longest", "shortest"):
            raise ValueError(f"resize_mode={resize_mode!r}: use 'longest' (HPSv2) or 'shortest' (open_clip)")
        how_to = (
            f"download {HPSV21_FILE} from the Hub repo {HPSV2_REPO}, or convert it with "
            "`leapalign reward convert HPS_v2.1_compressed.pt DIR` and pass DIR"
        )
        loaded = load_clip(
            path,
            processor_path=processor_path,
            checkpoint_filename=checkpoint_filename,
            weights_only_processor=VIT_H_PROCESSOR,
            device=device,
            dtype=dtype,
            open_clip_options=dict(vision_heads=vision_heads, text_heads=text_heads, hidden_act=hidden_act),
            how_to=how_to,
        )
        image_size = int(loaded.model.config.vision_config.image_size)
        # OpenAI's mean / std, as open_clip's ViT-H-14 laion2b config (and so HPSv2) always uses.
        build = hpsv2_transform if resize_mode == "longest" else open_clip_transform
        self.setup(loaded, "cosine", build(image_size, CLIP_IMAGE_MEAN, CLIP_IMAGE_STD))
