"""Train the miniature world's learned prompt-image scorer: a tiny CLIPModel, the PickScore/HPS analogue.

The exact evaluator (`judge.py`) is the GenEval analogue: rule-based, not differentiable. The
direct-gradient methods need a *learned, differentiable* reward instead, as PickScore/HPS are for Flux.
This module trains one: a real `transformers.CLIPModel` (ViT over 4 px patches of 32 px images, a
causal text transformer over the world's caption words) on generated data, and saves it as an HF
folder that `leapalign.rewards.clip_score.ClipScore` loads exactly as it would load PickScore.

Data (fresh every step, never a held-out pair):
  * images: training-split scenes (`sample_scene`, rejecting any that mention `HELD_OUT_PAIRS`)
    rendered at 32 px and degraded like an imperfect generator would (shift, blur, colour jitter,
    noise; `degrade_images`);
  * captions: the scene's own caption; `ScorerRecipe.hard_negatives` hard negatives, each the caption
    with ONE thing changed (an object's colour or shape, the count, the relation, or the two colours
    swapped: `sample_hard_negative`); and the other captions of the batch as random negatives. Hard
    negatives never mention held-out pairs either, so held-out combinations are absent from training
    text as well as images;
  * shape-only images (`render_muted`): scenes whose objects have random muted colours, far from every
    palette colour, used only by the auxiliary losses below.

Loss (`scorer_loss`), with logits = logit_scale.exp() * cos(image, caption):
  * CLIP's symmetric contrastive loss with *multi-positive* targets: a caption of another scene that
    is also true of this image ("a red circle", "a circle that is red", "one red circle") is a
    positive, not a negative (`caption_truth_matrix`); image -> text also ranks against every hard
    negative in the batch (NegCLIP). Random captions differ from the image in several attributes at
    once, so this term alone teaches words, not shapes, counts or binding;
  * a pairwise logistic (Bradley-Terry) term softplus(logit_neg - logit_match) per hard negative,
    i.e. BCE on the logit difference: it ranks the matching caption above captions one attribute
    away, which is what the held-out hard-negative AUC measures, and is the objective PickScore is
    trained with on human preference pairs;
  * a SigLIP-style sigmoid BCE against one learned threshold. The first two terms only compare
    captions of the same image (a per-image shift of all scores changes nothing); a reward, and a
    pooled ROC AUC, also compares images, so scores must share one scale.

Auxiliary losses (training-only heads, discarded; labels name a colour OR a shape, never a pair).
Without them the ViT learned shapes slowly and, worse, learned the training split's correlations:
no red object is ever a triangle, so "red" became evidence against "triangle" and a linear probe
for shape scored 3 % on held-out-pair images (chance 33 %) while scoring 92 % on training pairs:
  * per patch of each shape-only image, the fraction covered by each shape (colour says nothing
    about shape there, so shape features become colour-invariant: the probe rose to 97 % held-out);
  * from the pooled state: the number of objects of each colour (palette images) and of each shape
    (shape-only images), and the mean centre of each colour / shape, which counting and position
    captions need and which a cosine can read linearly.

Evaluation: ROC AUC (`roc_auc`, Mann-Whitney U with ties) on the held-out eval split of
`build_prompt_sets` (every prompt mentions a held-out pair), matching vs one hard negative and
matching vs one random (false) caption per image, overall, per category and per negative kind, on
degraded and clean renders. The scores come from `ClipScore` loading the saved folder, so the
figures describe what ships. Launch:

    python -m leapalign.world.scorer --out platform/leapalign/assets/mini-scorer

Why one file over 500 lines: a self-contained training script (data, model, loss, loop, its own
evaluation) for a shipped asset; nothing on the training path imports it.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from leapalign.world.judge import DetectedObject, relative_position
from leapalign.world.prompts import (
    HELD_OUT_PAIRS,
    PromptRecord,
    build_prompt_sets,
    mentions_held_out,
    regenerate_scene,
)
from leapalign.world.scenes import (
    CATEGORIES,
    COLORS,
    COUNT_WORDS,
    SHAPES,
    ParsedCaption,
    Scene,
    SceneObject,
    format_caption,
    list_caption_words,
    parse_caption,
    render_scene,
    sample_scene,
    shape_mask,
)

NEGATIVE_KINDS: tuple[str, ...] = ("color", "shape", "count", "relation", "swap")
FLIPPED_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
MAX_NEGATIVE_TRIES = 50
MAX_OBJECTS = 3  # most objects in any scene (counting: three; the others: at most two)
MUTED_LOW, MUTED_HIGH = 0.2, 0.8  # channel range of the shape-only images' random colours
POSITION_VARIANCE = 2 * 0.06  # ~ variance of an object's (cx, cy): scales the position loss to ~1 at chance
# Seed of the platform's prompt files (make_prompt_files' default): the eval split scored here is theirs.
PROMPT_SEED = 0


@dataclass(frozen=True)
class ScorerSpec:
    """Sizes of the tiny CLIPModel. Defaults: 0.33M parameters, a 1.3 MB safetensors file."""

    image_size: int = 32  # px; the world renders 32 px for the miniature policy
    patch_size: int = 4  # px; 8x8 patches, fine enough for a 7 px triangle's outline
    vision_hidden: int = 64
    vision_layers: int = 3
    vision_heads: int = 4
    text_hidden: int = 64
    text_layers: int = 3  # binding ("a circle that is red and ...") needs word order, not a bag of words
    text_heads: int = 4
    projection_dim: int = 64
    sincos_positions: bool = True  # start the ViT's position embeddings at 2D sin-cos (MAE), not noise

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}"
            )
        for hidden, heads in ((self.vision_hidden, self.vision_heads), (self.text_hidden, self.text_heads)):
            if hidden % heads:
                raise ValueError(f"hidden size {hidden} must be a multiple of its head count {heads}")


@dataclass(frozen=True)
class ScorerRecipe:
    """How the scorer is trained and evaluated."""

    steps: int = 1800  # optimizer steps; each sees a fresh batch
    batch_size: int = 32  # images per step (more steps beat bigger batches for a ViT this small)
    hard_negatives: int = 4  # hard-negative captions per image
    pair_weight: float = 1.0  # weight of the pairwise hard-negative term (contrastive term has weight 1)
    sigmoid_weight: float = 2.0  # weight of the calibrated sigmoid term
    dense_weight: float = 1.0  # weight of the auxiliary per-patch shape loss (0 turns it off)
    count_weight: float = 2.0  # weight of the auxiliary count and position losses (0: off)
    aux_batch_size: int = 32  # shape-only (muted random colour) images per step for the auxiliary losses
    # Relative odds of each hard-negative kind in training (NEGATIVE_KINDS order: colour, shape, count,
    # relation, swap). Colour edits are learned within a few hundred steps; counts and swaps need the
    # extra examples; relations stayed at chance in every recipe tried, so they get few.
    kind_weights: tuple[float, ...] = (0.4, 1.0, 2.0, 0.5, 3.0)
    lr: float = 3e-3  # AdamW peak learning rate
    weight_decay: float = 0.05  # on matrices only
    warmup_steps: int = 100  # linear warm-up, then cosine decay to 0
    max_logit_scale: float = 100.0  # CLIP's clamp on logit_scale.exp()
    n_eval: int = 600  # held-out eval images (the platform's eval split has 600 rows)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 2:
            raise ValueError(
                f"need steps >= 1 and batch_size >= 2 (contrastive), got {self.steps}, {self.batch_size}"
            )
        if self.hard_negatives < 1:
            raise ValueError(f"hard_negatives must be >= 1, got {self.hard_negatives}")
        if len(self.kind_weights) != len(NEGATIVE_KINDS) or min(self.kind_weights) <= 0:
            raise ValueError(f"kind_weights needs {len(NEGATIVE_KINDS)} positive numbers ({NEGATIVE_KINDS})")


@dataclass(frozen=True)
class Degradation:
    """Imperfections of a generator's 32 px output; each is applied to a random subset of images."""

    max_shift: int = 2  # px, whole image, background fill; small enough to keep objects in frame
    blur_sigma: tuple[float, float] = (0.3, 1.2)  # px, gaussian
    gain_jitter: float = 0.12  # per-channel multiplicative jitter, +/-
    offset_jitter: float = 0.08  # per-channel additive jitter, +/-
    noise_std: float = 0.08  # max per-pixel gaussian noise std
    prob: float = 0.7  # probability of each degradation


# ----------------------------------------------------------------------------------------------- model


def build_scorer_tokenizer():
    """The offline CLIP BPE tokenizer over the world's caption words (every caption word is one token)."""
    from leapalign.models.tiny import build_tokenizers

    return build_tokenizers(words=list_caption_words())[0]


def build_scorer_model(spec: ScorerSpec, vocab_size: int, seed: int = 0):
    """A randomly initialised transformers CLIPModel of `spec`'s sizes."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config=dict(
            vocab_size=vocab_size, hidden_size=spec.text_hidden, intermediate_size=4 * spec.text_hidden,
            num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads, max_position_embeddings=77,
            bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=spec.projection_dim,
        ),
        vision_config=dict(
            image_size=spec.image_size, patch_size=spec.patch_size, hidden_size=spec.vision_hidden,
            intermediate_size=4 * spec.vision_hidden, num_hidden_layers=spec.vision_layers,
            num_attention_heads=spec.vision_heads, projection_dim=spec.projection_dim,
        ),
        projection_dim=spec.projection_dim,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = CLIPModel(config)
    if spec.sincos_positions:
        # Fixed 2D codes as the start for "where" (relations, the position loss) instead of noise; in
        # short shape-learning probes it made no measurable difference. Row 0 (the CLS token) is kept.
        grid = spec.image_size // spec.patch_size
        with torch.no_grad():
            model.vision_model.embeddings.position_embedding.weight[1:] = sincos_2d(grid, spec.vision_hidden)
    return model


def sincos_2d(grid: int, dim: int) -> Tensor:
    """[grid*grid, dim] fixed 2D sine-cosine position codes, row-major patches (MAE, He et al. 2022)."""
    if dim % 4:
        raise ValueError(f"sin-cos position codes need a hidden size divisible by 4, got {dim}")
    frequencies = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))  # [dim/4]
    ys, xs = torch.meshgrid(
        torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij"
    )
    angles_x = xs.reshape(-1, 1) * frequencies  # [N, dim/4]
    angles_y = ys.reshape(-1, 1) * frequencies
    return torch.cat([angles_x.sin(), angles_x.cos(), angles_y.sin(), angles_y.cos()], dim=1)


def encode_images(model, pixel_values: Tensor) -> Tensor:
    """Normalised image_embeds [B, D] (projected pooled CLS state, as CLIPModel.forward computes it)."""
    return F.normalize(
        model.visual_projection(model.vision_model(pixel_values=pixel_values).pooler_output), dim=-1
    )


def encode_texts(model, tokenizer, texts: Sequence[str]) -> Tensor:
    """Normalised text_embeds [T, D] (projected pooled EOS state)."""
    tokens = tokenizer(list(texts), padding=True, return_tensors="pt")
    pooled = model.text_model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).pooler_output
    return F.normalize(model.text_projection(pooled), dim=-1)


# ------------------------------------------------------------------------------------------------ data


def _as_detected(obj: SceneObject) -> DetectedObject:
    return DetectedObject(obj.color, obj.shape, obj.cx, obj.cy, obj.size, obj.size, area=0, shape_iou=1.0)


def _holds(by_pair: dict[tuple[str, str], list[SceneObject]], parsed: ParsedCaption) -> bool:
    if parsed.category == "counting":
        wanted = parsed.objects[0]
        return len(by_pair.get(wanted.pair, ())) == wanted.count
    groups = [by_pair.get(obj.pair, []) for obj in parsed.objects]
    if not all(groups):
        return False
    if parsed.relation is None:
        return True
    return all(
        parsed.relation in relative_position(_as_detected(a), _as_detected(b))
        for a in groups[0]
        for b in groups[1]
    )


def _group_by_pair(scene: Scene) -> dict[tuple[str, str], list[SceneObject]]:
    by_pair: dict[tuple[str, str], list[SceneObject]] = {}
    for obj in scene.objects:
        by_pair.setdefault((obj.color, obj.shape), []).append(obj)
    return by_pair


def caption_holds(scene: Scene, parsed: ParsedCaption) -> bool:
    """True when the caption is true of the scene, by the evaluator's rules applied to the exact objects."""
    return _holds(_group_by_pair(scene), parsed)


def caption_truth_matrix(scenes: Sequence[Scene], captions: Sequence[ParsedCaption]) -> np.ndarray:
    """Bool [len(scenes), len(captions)]: caption j is true of scene i."""
    groups = [_group_by_pair(scene) for scene in scenes]
    return np.array([[_holds(by_pair, parsed) for parsed in captions] for by_pair in groups], dtype=bool)


def _other(options: Sequence, current, rng: np.random.Generator):
    choices = [option for option in options if option != current]
    return choices[int(rng.integers(len(choices)))]


def negative_kinds(parsed: ParsedCaption) -> list[str]:
    """The one-attribute edits that apply to a caption."""
    kinds = ["color", "shape"]
    if parsed.category == "counting":
        kinds.append("count")
    if parsed.relation is not None:
        kinds.append("relation")
    if len(parsed.objects) == 2 and parsed.objects[0].color != parsed.objects[1].color:
        kinds.append("swap")
    return kinds


def edit_caption(parsed: ParsedCaption, kind: str, rng: np.random.Generator) -> ParsedCaption:
    """The caption with ONE thing changed: an object's colour or shape, the count, the relation, or the colours swapped."""
    objects = list(parsed.objects)
    relation = parsed.relation
    index = int(rng.integers(len(objects)))
    if kind == "color":
        objects[index] = replace(objects[index], color=_other(COLORS, objects[index].color, rng))
    elif kind == "shape":
        objects[index] = replace(objects[index], shape=_other(SHAPES, objects[index].shape, rng))
    elif kind == "count":
        objects[0] = replace(objects[0], count=_other(tuple(COUNT_WORDS), objects[0].count, rng))
    elif kind == "relation":
        relation = FLIPPED_RELATION[parsed.relation]
    elif kind == "swap":
        first, second = objects
        objects = [replace(first, color=second.color), replace(second, color=first.color)]
    else:
        raise ValueError(f"unknown negative kind {kind!r}; choose one of {', '.join(NEGATIVE_KINDS)}")
    return ParsedCaption(parsed.category, tuple(objects), relation)


def sample_hard_negative(
    scene: Scene,
    parsed: ParsedCaption,
    rng: np.random.Generator,
    exclude_pairs: frozenset[tuple[str, str]] = frozenset(),
    kind_weights: Sequence[float] | None = None,
) -> tuple[str, str]:
    """(caption, kind): a caption one edit away from `parsed` that is FALSE of `scene`.

    The kind is drawn among those that apply, uniformly or with `kind_weights` (in `NEGATIVE_KINDS` order).
    """

    def valid(edited: ParsedCaption) -> bool:
        try:
            parse_caption(
                format_caption(edited)
            )  # e.g. a position caption may not relate an object to itself
        except ValueError:
            return False
        return not any(pair in exclude_pairs for pair in edited.pairs) and not caption_holds(scene, edited)

    kinds = negative_kinds(parsed)
    odds = np.array([1.0 if kind_weights is None else kind_weights[NEGATIVE_KINDS.index(k)] for k in kinds])
    for _ in range(MAX_NEGATIVE_TRIES):  # cheap rejection sampling first
        kind = kinds[int(rng.choice(len(kinds), p=odds / odds.sum()))]
        edited = edit_caption(parsed, kind, rng)
        if valid(edited):
            return format_caption(edited), kind
    # Rare (held-out exclusions can rule out most edits): pick among every valid single edit.
    options = [(kind, edited) for kind, edited in enumerate_edits(parsed) if valid(edited)]
    if not options:
        raise RuntimeError(
            f"no single edit of {scene.caption!r} gives a false caption outside {sorted(exclude_pairs)}"
        )
    kind, edited = options[int(rng.integers(len(options)))]
    return format_caption(edited), kind


def enumerate_edits(parsed: ParsedCaption) -> list[tuple[str, ParsedCaption]]:
    """Every single edit `edit_caption` can make, as (kind, edited caption)."""
    edits = []
    for index, obj in enumerate(parsed.objects):
        for color in COLORS:
            if color != obj.color:
                objects = list(parsed.objects)
                objects[index] = replace(obj, color=color)
                edits.append(("color", ParsedCaption(parsed.category, tuple(objects), parsed.relation)))
        for shape in SHAPES:
            if shape != obj.shape:
                objects = list(parsed.objects)
                objects[index] = replace(obj, shape=shape)
                edits.append(("shape", ParsedCaption(parsed.category, tuple(objects), parsed.relation)))
    kinds = negative_kinds(parsed)
    if "count" in kinds:
        for count in COUNT_WORDS:
            if count != parsed.objects[0].count:
                edits.append(
                    ("count", ParsedCaption(parsed.category, (replace(parsed.objects[0], count=count),)))
                )
    if "relation" in kinds:
        edits.append(
            ("relation", ParsedCaption(parsed.category, parsed.objects, FLIPPED_RELATION[parsed.relation]))
        )
    if "swap" in kinds:
        first, second = parsed.objects
        swapped = (replace(first, color=second.color), replace(second, color=first.color))
        edits.append(("swap", ParsedCaption(parsed.category, swapped, parsed.relation)))
    return edits


def sample_training_scene(rng: np.random.Generator, held_out: frozenset[tuple[str, str]]) -> Scene:
    """A scene of a uniformly drawn category that mentions no held-out pair (the train split's rule)."""
    category = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
    while True:
        scene = sample_scene(rng, category)
        if not mentions_held_out(parse_caption(scene.caption), held_out):
            return scene


def render_batch(scenes: Sequence[Scene], resolution: int) -> Tensor:
    """Clean renders [B, 3, H, W] in [0, 1]."""
    return torch.from_numpy(np.stack([render_scene(scene, resolution) for scene in scenes])).permute(
        0, 3, 1, 2
    )


def count_attributes(scene: Scene) -> list[int]:
    """Objects of each colour (COLORS order), then of each shape (SHAPES order)."""
    colors = [sum(obj.color == color for obj in scene.objects) for color in COLORS]
    return colors + [sum(obj.shape == shape for obj in scene.objects) for shape in SHAPES]


def object_centres(scenes: Sequence[Scene], attribute: str, values: Sequence[str]) -> tuple[Tensor, Tensor]:
    """Mean (cx, cy) of each scene's objects per attribute value [B, V, 2], and which values occur [B, V]."""
    centres = torch.zeros(len(scenes), len(values), 2)
    seen = torch.zeros(len(scenes), len(values), dtype=torch.bool)
    for b, scene in enumerate(scenes):
        for v, value in enumerate(values):
            objects = [obj for obj in scene.objects if getattr(obj, attribute) == value]
            if objects:
                centres[b, v] = torch.tensor(
                    [np.mean([o.cx for o in objects]), np.mean([o.cy for o in objects])]
                )
                seen[b, v] = True
    return centres, seen


def render_muted(scenes: Sequence[Scene], rng: np.random.Generator, resolution: int) -> Tensor:
    """[B, 3, H, W]: the scenes' shapes, each object in a random colour with every channel in
    [MUTED_LOW, MUTED_HIGH], which keeps it > 0.3 (the evaluator's match radius) from every palette
    colour and the background, so no image shows a palette (colour, shape) pair."""
    images = torch.ones(len(scenes), 3, resolution, resolution)
    for b, scene in enumerate(scenes):
        for obj in scene.objects:
            colour = torch.from_numpy(rng.uniform(MUTED_LOW, MUTED_HIGH, size=3)).float()
            images[b, :, torch.from_numpy(shape_mask(obj, resolution))] = colour[:, None]
    return images


def render_shape_maps(scenes: Sequence[Scene], resolution: int) -> Tensor:
    """One-hot [B, 1 + len(SHAPES), H, W]: channel 0 background, then which shape covers each pixel."""
    maps = torch.zeros(len(scenes), 1 + len(SHAPES), resolution, resolution)
    maps[:, 0] = 1.0
    for b, scene in enumerate(scenes):
        for obj in scene.objects:
            mask = torch.from_numpy(shape_mask(obj, resolution))
            maps[b, :, mask] = 0.0
            maps[b, 1 + SHAPES.index(obj.shape), mask] = 1.0
    return maps


def degrade_images(images: Tensor, generator: torch.Generator, spec: Degradation = Degradation()) -> Tensor:
    """Mimic an imperfect generator on [B, 3, H, W] in [0, 1]: shift, blur, colour jitter, noise (seeded)."""
    return degrade_with_maps(
        images, images.new_zeros(images.shape[0], 0, *images.shape[2:]), generator, spec
    )[0]


def degrade_with_maps(
    images: Tensor, maps: Tensor, generator: torch.Generator, spec: Degradation = Degradation()
) -> tuple[Tensor, Tensor]:
    """`degrade_images`, also shifting per-pixel label maps [B, C, H, W] (channel 0 = background) with the images."""
    batch, channels, height, width = images.shape

    def coin() -> Tensor:
        return (torch.rand(batch, generator=generator) < spec.prob).float()  # [B]

    # 1. Shift the whole image by up to max_shift px, filling with the white background.
    pad = spec.max_shift
    padded = F.pad(images, (pad, pad, pad, pad), value=1.0)
    padded_maps = F.pad(maps, (pad, pad, pad, pad), value=0.0)
    if maps.shape[1]:
        padded_maps[:, 0] = 1.0 - padded_maps[:, 1:].sum(1)  # the new border is background
    offsets = torch.randint(-pad, pad + 1, (batch, 2), generator=generator) * coin()[:, None].long() + pad
    windows = [(b, dy, dx) for b, (dy, dx) in enumerate(offsets.tolist())]
    images = torch.stack([padded[b, :, dy : dy + height, dx : dx + width] for b, dy, dx in windows])
    maps = torch.stack([padded_maps[b, :, dy : dy + height, dx : dx + width] for b, dy, dx in windows])
    # 2. Gaussian blur, separable, a different sigma per image (sigma ~0 is the identity kernel).
    low, high = spec.blur_sigma
    sigma = (low + (high - low) * torch.rand(batch, generator=generator)) * coin() + 1e-3  # [B]
    taps = torch.arange(-3, 4, dtype=images.dtype)  # [7]
    kernel = torch.exp(-(taps[None, :] ** 2) / (2 * sigma[:, None] ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(channels, 0)  # [B*3, 7]
    flat = F.pad(images.reshape(1, batch * channels, height, width), (3, 3, 3, 3), mode="replicate")
    flat = F.conv2d(flat, kernel[:, None, None, :], groups=batch * channels)
    flat = F.conv2d(flat, kernel[:, None, :, None], groups=batch * channels)
    images = flat.reshape(batch, channels, height, width)
    # 3. Colour jitter: per-channel gain and offset.
    jitter = coin()[:, None]
    gain = 1 + spec.gain_jitter * (2 * torch.rand(batch, channels, generator=generator) - 1) * jitter
    offset = spec.offset_jitter * (2 * torch.rand(batch, channels, generator=generator) - 1) * jitter
    images = images * gain[:, :, None, None] + offset[:, :, None, None]
    # 4. Pixel noise.
    noise_std = spec.noise_std * torch.rand(batch, generator=generator) * coin()
    images = images + noise_std[:, None, None, None] * torch.randn(images.shape, generator=generator)
    return images.clamp(0.0, 1.0), maps


def measure_image_stats(resolution: int, seed: int, n: int = 1024) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of clean training renders (rounded): the scorer's image_mean / image_std."""
    rng = np.random.default_rng(seed)
    held_out = frozenset(HELD_OUT_PAIRS)
    images = render_batch([sample_training_scene(rng, held_out) for _ in range(n)], resolution)
    mean, std = images.mean(dim=(0, 2, 3)), images.std(dim=(0, 2, 3))
    return [round(float(v), 4) for v in mean], [round(float(v), 4) for v in std]


# ------------------------------------------------------------------------------------------------ loss


def scorer_loss(
    logits: Tensor,
    bias: Tensor,
    pos_idx: Tensor,
    neg_idx: Tensor,
    truth: Tensor,
    recipe: ScorerRecipe,
) -> tuple[Tensor, dict[str, float]]:
    """Multi-positive contrastive + pairwise hard-negative + calibrated sigmoid loss.

    logits [B, T] = scale * cos(image b, text t) over every text of the batch (own captions and hard
    negatives); pos_idx [B] is each image's own caption, neg_idx [B, K] its hard negatives; truth
    [B, T] bool, text t is true of image b; bias [] a learnable offset used by the sigmoid term only.
    """
    targets = truth.to(logits.dtype)
    # 1. Contrastive. Image -> text over ALL texts (NegCLIP: other images' hard negatives are extra
    #    negatives); text -> image over the batch images for each image's own caption.
    image_to_text = -(targets / targets.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
    own = targets[:, pos_idx]  # [B, B]
    text_to_image = -(own / own.sum(0, keepdim=True) * logits[:, pos_idx].log_softmax(0)).sum(0).mean()
    contrastive = (image_to_text + text_to_image) / 2
    # 2. Pairwise (Bradley-Terry): each image's caption above each of its own one-edit negatives.
    match = logits.gather(1, pos_idx[:, None])  # [B, 1]
    hard = logits.gather(1, neg_idx)  # [B, K]
    pairwise = F.softplus(hard - match).mean()  # = BCE(sigmoid(match - hard), 1)
    # 3. Sigmoid (SigLIP-style BCE against one shared threshold): true pairs above it, false ones
    #    below. Steps 1-2 are invariant to a per-image shift of all its scores; this term is not, so
    #    scores of different images become comparable, which is what a reward (and a pooled ROC AUC)
    #    needs. Balanced: half the weight on true pairs, a quarter on the images' own hard negatives,
    #    a quarter on every other false pair (mostly easy, random captions).
    z = logits + bias
    own_hard = torch.zeros_like(truth).scatter_(1, neg_idx, True)
    sigmoid = (
        0.5 * F.softplus(-z)[truth].mean()
        + 0.25 * F.softplus(z)[own_hard].mean()
        + 0.25 * F.softplus(z)[~truth & ~own_hard].mean()
    )
    loss = contrastive + recipe.pair_weight * pairwise + recipe.sigmoid_weight * sigmoid
    return loss, {
        "loss": loss.item(),
        "loss/contrastive": contrastive.item(),
        "loss/pairwise": pairwise.item(),
        "loss/sigmoid": sigmoid.item(),
        "train/hard_win_rate": (match > hard).float().mean().item(),
    }


# ------------------------------------------------------------------------------------------- training


def _lr_factor(step: int, recipe: ScorerRecipe) -> float:
    if step < recipe.warmup_steps:
        return (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * progress))


def train_scorer(
    spec: ScorerSpec = ScorerSpec(),
    recipe: ScorerRecipe = ScorerRecipe(),
    image_stats: tuple[list[float], list[float]] | None = None,
    progress: bool = True,
):
    """Train a scorer from scratch; returns (model, tokenizer, image_stats, history: list of metric dicts)."""
    from tqdm.auto import tqdm

    from leapalign.rewards.clip_score import preprocess_images

    held_out = frozenset(HELD_OUT_PAIRS)
    data_seq, stats_seq = np.random.SeedSequence(recipe.seed).spawn(2)
    rng = np.random.default_rng(data_seq)
    generator = torch.Generator().manual_seed(recipe.seed)
    if image_stats is None:
        image_stats = measure_image_stats(spec.image_size, seed=int(stats_seq.generate_state(1)[0]))
    image_mean, image_std = (torch.tensor(values) for values in image_stats)
    tokenizer = build_scorer_tokenizer()
    model = build_scorer_model(spec, len(tokenizer), seed=recipe.seed).train()
    # Training-only parameters, not saved: the sigmoid term's threshold and the per-patch shape head.
    bias = torch.nn.Parameter(torch.zeros(()))
    shape_head = torch.nn.Linear(spec.vision_hidden, 1 + len(SHAPES))
    count_head = torch.nn.Linear(spec.vision_hidden, (len(COLORS) + len(SHAPES)) * (MAX_OBJECTS + 1))
    where_head = torch.nn.Linear(spec.vision_hidden, (len(COLORS) + len(SHAPES)) * 2)
    max_count = MAX_OBJECTS + 1
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    decay += [shape_head.weight, count_head.weight, where_head.weight]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    no_decay += [bias, shape_head.bias, count_head.bias, where_head.bias]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, recipe))
    history: list[dict[str, float]] = []
    bar = tqdm(range(recipe.steps), desc="scorer", disable=not progress, mininterval=2.0)
    for step in bar:
        # 1. A fresh batch: training-split scenes, their captions, one-edit hard negatives.
        scenes = [sample_training_scene(rng, held_out) for _ in range(recipe.batch_size)]
        parsed = [parse_caption(scene.caption) for scene in scenes]
        negatives = [
            [
                sample_hard_negative(s, p, rng, held_out, recipe.kind_weights)[0]
                for _ in range(recipe.hard_negatives)
            ]
            for s, p in zip(scenes, parsed, strict=True)
        ]
        texts = list(dict.fromkeys([s.caption for s in scenes] + [c for row in negatives for c in row]))
        text_index = {text: i for i, text in enumerate(texts)}
        pos_idx = torch.tensor([text_index[s.caption] for s in scenes])  # [B]
        neg_idx = torch.tensor([[text_index[c] for c in row] for row in negatives])  # [B, K]
        truth = torch.from_numpy(caption_truth_matrix(scenes, [parse_caption(t) for t in texts]))  # [B, T]
        images = degrade_images(render_batch(scenes, spec.image_size), generator)  # [B, 3, H, W]
        # Shape-only images: scenes of any category with every object in a random muted colour (no
        # palette colour, hence no held-out pair). In the palette images colour predicts shape (no red
        # object is ever a triangle) and a ViT learns that shortcut; here colour says nothing about shape.
        aux_scenes = [
            sample_scene(rng, CATEGORIES[int(rng.integers(len(CATEGORIES)))])
            for _ in range(recipe.aux_batch_size)
        ]
        aux_images, aux_maps = degrade_with_maps(
            render_muted(aux_scenes, rng, spec.image_size),
            render_shape_maps(aux_scenes, spec.image_size),
            generator,
        )  # [A, 3, H, W], [A, 1 + len(SHAPES), H, W]
        # 2. One ViT pass over both; scores of every palette image against every caption in the batch.
        pixel_values = preprocess_images(
            torch.cat([images, aux_images]), spec.image_size, image_mean, image_std
        )
        vision = model.vision_model(pixel_values=pixel_values)
        batch = len(scenes)
        image_embeds = F.normalize(model.visual_projection(vision.pooler_output[:batch]), dim=-1)  # [B, D]
        text_embeds = encode_texts(model, tokenizer, texts)  # [T, D]
        logits = model.logit_scale.exp() * image_embeds @ text_embeds.T  # [B, T]
        loss, metrics = scorer_loss(logits, bias, pos_idx, neg_idx, truth, recipe)
        # 3. Auxiliary losses through training-only heads; labels are colours OR shapes, never pairs.
        # Dense: each patch token of a shape-only image predicts the fraction of its pixels covered by
        # each shape (soft cross-entropy), weighted by coverage so empty patches do not dominate.
        # Contrastive and pairwise signals reach the ViT through one pooled vector per image and teach
        # shapes slowly; 64 labelled patches per image teach them fast.
        patch_targets = F.avg_pool2d(aux_maps, spec.patch_size).flatten(2).transpose(1, 2)  # [A, N, 1 + S]
        patch_logits = shape_head(vision.last_hidden_state[batch:, 1:])  # [A, N, 1 + S]
        weight = 1.1 - patch_targets[..., 0]  # [A, N]: 0.1 + covered fraction
        patch_ce = -(patch_targets * patch_logits.log_softmax(-1)).sum(-1)  # [A, N]
        dense = (patch_ce * weight).sum() / weight.sum()
        # Counts from the pooled state (what counting captions need): objects of each colour in the
        # palette images, objects of each shape in the shape-only images.
        count_logits = count_head(vision.pooler_output).view(-1, len(COLORS) + len(SHAPES), max_count)
        colour_counts = torch.tensor([count_attributes(scene)[: len(COLORS)] for scene in scenes])  # [B, C]
        shape_counts = torch.tensor(
            [count_attributes(scene)[len(COLORS) :] for scene in aux_scenes]
        )  # [A, S]
        count = F.cross_entropy(
            torch.cat(
                [
                    count_logits[:batch, : len(COLORS)].flatten(0, 1),
                    count_logits[batch:, len(COLORS) :].flatten(0, 1),
                ]
            ),
            torch.cat([colour_counts.flatten(), shape_counts.flatten()]),
        )
        # Where: the mean centre (x, y) of the objects of each colour (palette images) and of each
        # shape (shape-only images), squared error where present. Relations compare such positions,
        # and a pooled vector that holds them linearly lets a cosine score "A left of B".
        where = where_head(vision.pooler_output).view(-1, len(COLORS) + len(SHAPES), 2)
        colour_xy, colour_seen = object_centres(scenes, "color", COLORS)  # [B, C, 2], [B, C]
        shape_xy, shape_seen = object_centres(aux_scenes, "shape", SHAPES)  # [A, S, 2], [A, S]
        where_error = torch.cat([
            ((where[:batch, : len(COLORS)] - colour_xy) ** 2).sum(-1)[colour_seen],
            ((where[batch:, len(COLORS) :] - shape_xy) ** 2).sum(-1)[shape_seen],
        ])  # fmt: skip
        position = where_error.mean() / POSITION_VARIANCE
        loss = loss + recipe.dense_weight * dense + recipe.count_weight * (count + position)
        metrics["loss/dense"] = dense.item()
        metrics["loss/count"] = count.item()
        metrics["loss/position"] = position.item()
        metrics["loss"] = loss.item()
        # 4. Update; clamp the temperature as CLIP does.
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(max=math.log(recipe.max_logit_scale))
        metrics["logit_scale"] = model.logit_scale.exp().item()
        history.append(metrics)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", win=f"{metrics['train/hard_win_rate']:.2f}")
    model.eval()
    return model, tokenizer, image_stats, history


# ----------------------------------------------------------------------------------------- evaluation


def roc_auc(positive_scores: Sequence[float], negative_scores: Sequence[float]) -> float:
    """P(score of a random positive > score of a random negative), ties counting 1/2 (Mann-Whitney U / n+ n-)."""
    pos = np.asarray(positive_scores, dtype=np.float64).ravel()
    neg = np.asarray(negative_scores, dtype=np.float64).ravel()
    if pos.size == 0 or neg.size == 0:
        raise ValueError(f"AUC needs at least one positive and one negative, got {pos.size} and {neg.size}")
    if not (np.all(np.isfinite(pos)) and np.all(np.isfinite(neg))):
        raise ValueError("AUC scores must be finite")
    scores = np.concatenate([pos, neg])
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    # Average 1-based rank within each run of tied scores.
    run_starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    run_ends = np.r_[run_starts[1:], scores.size]
    average_rank = (run_starts + run_ends + 1) / 2.0  # mean of ranks start+1 .. end
    ranks = np.empty(scores.size)
    ranks[order] = np.repeat(average_rank, run_ends - run_starts)
    u_statistic = ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2.0
    return float(u_statistic / (pos.size * neg.size))


def build_eval_pairs(n_eval: int, seed: int) -> list[dict]:
    """Held-out eval scenes, each with one hard negative and one random FALSE caption from the eval prompts."""
    _, evaluation = build_prompt_sets(PROMPT_SEED, 1, n_eval)
    rows = evaluation.to_pylist()
    prompts = [row["prompt"] for row in rows]
    rng = np.random.default_rng(seed)
    pairs = []
    for row in rows:
        scene = regenerate_scene(PromptRecord(row["prompt"], row["category"], row["seed"]))
        parsed = parse_caption(scene.caption)
        hard, kind = sample_hard_negative(scene, parsed, rng)
        while True:
            random_caption = prompts[int(rng.integers(len(prompts)))]
            if not caption_holds(scene, parse_caption(random_caption)):
                break
        pairs.append({"scene": scene, "hard": hard, "kind": kind, "random": random_caption})
    return pairs


def evaluate_scorer(
    score_fn: Callable[[Tensor, Sequence[str]], Tensor],
    pairs: Sequence[dict],
    resolution: int = 32,
    degrade: bool = True,
    seed: int = 0,
    batch_size: int = 200,
) -> dict:
    """AUCs of matching vs hard-negative and vs random captions: overall, per category, per negative kind."""
    generator = torch.Generator().manual_seed(seed)
    scores: dict[str, list[float]] = {"match": [], "hard": [], "random": []}
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        images = render_batch([p["scene"] for p in chunk], resolution)
        if degrade:
            images = degrade_images(images, generator)
        with torch.no_grad():
            scores["match"] += score_fn(images, [p["scene"].caption for p in chunk]).tolist()
            scores["hard"] += score_fn(images, [p["hard"] for p in chunk]).tolist()
            scores["random"] += score_fn(images, [p["random"] for p in chunk]).tolist()
    match, hard, rand = (np.array(scores[key]) for key in ("match", "hard", "random"))

    def summary(mask: np.ndarray, with_random: bool = True) -> dict[str, float]:
        out = {
            "hard_negative_auc": roc_auc(match[mask], hard[mask]),
            "hard_negative_win_rate": float(np.mean(match[mask] > hard[mask])),
            "n": int(mask.sum()),
        }
        if with_random:
            out["random_auc"] = roc_auc(match[mask], rand[mask])
        return out

    categories = np.array([p["scene"].category for p in pairs])
    kinds = np.array([p["kind"] for p in pairs])
    return {
        **summary(np.ones(len(pairs), dtype=bool)),
        "mean_margin_hard": float(np.mean(match - hard)),
        "per_category": {c: summary(categories == c) for c in CATEGORIES if (categories == c).any()},
        "per_negative_kind": {k: summary(kinds == k, False) for k in NEGATIVE_KINDS if (kinds == k).any()},
    }


# --------------------------------------------------------------------------------------------- saving


def write_preprocessor_config(
    folder: Path, image_size: int, image_stats: tuple[list[float], list[float]]
) -> None:
    """A CLIPImageProcessor-format preprocessor_config.json (also readable by AutoImageProcessor)."""
    mean, std = image_stats
    config = {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": image_size},
        "resample": 2,  # bilinear, as ClipScore resizes
        "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": mean,
        "image_std": std,
        "do_convert_rgb": True,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _check_destination(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(
            f"{out_dir} exists and is not an empty folder: choose a new folder or remove it first"
        )


def train_and_save(
    out_dir: str | Path,
    spec: ScorerSpec = ScorerSpec(),
    recipe: ScorerRecipe = ScorerRecipe(),
    progress: bool = True,
) -> dict:
    """Train, save (model, tokenizer, preprocessor config, metrics.json) atomically to `out_dir`; returns the metrics."""
    from leapalign.rewards.clip_score import ClipScore

    out_dir = Path(out_dir)
    _check_destination(out_dir)  # before training, not after 8 minutes of it
    started = time.perf_counter()
    model, tokenizer, image_stats, history = train_scorer(spec, recipe, progress=progress)
    train_s = time.perf_counter() - started
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_preprocessor_config(tmp, spec.image_size, image_stats)
        for written in tmp.iterdir():
            written.chmod(0o644)  # safetensors writes 0600; this folder ships inside the package
        # Score through the reward's own loading path: the figures describe the saved folder.
        reward = ClipScore(tmp, device="cpu")
        pairs = build_eval_pairs(recipe.n_eval, seed=recipe.seed + 1)
        last = history[-50:]
        metrics = {
            "eval_split": f"build_prompt_sets(seed={PROMPT_SEED}) eval rows, held-out pairs {list(HELD_OUT_PAIRS)}",
            "degraded": evaluate_scorer(reward, pairs, spec.image_size, degrade=True, seed=recipe.seed + 2),
            "clean": evaluate_scorer(reward, pairs, spec.image_size, degrade=False),
            "train": {
                "wall_s": round(train_s, 1),
                "final_loss_mean_last_50": float(np.mean([h["loss"] for h in last])),
                "final_hard_win_rate_last_50": float(np.mean([h["train/hard_win_rate"] for h in last])),
                "logit_scale": history[-1]["logit_scale"],
                "parameters": sum(p.numel() for p in model.parameters()),
            },
            "spec": asdict(spec),
            "recipe": asdict(recipe),
            "degradation": asdict(Degradation()),
            "image_mean": image_stats[0],
            "image_std": image_stats[1],
        }
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        _check_destination(out_dir)
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    """python -m leapalign.world.scorer --out DIR [--steps N --seed S --batch-size B --threads T]."""
    parser = argparse.ArgumentParser(
        description="Train the miniature world's CLIP-style prompt-image scorer."
    )
    parser.add_argument("--out", required=True, help="new (or empty) folder for the HF CLIPModel + tokenizer")
    parser.add_argument("--steps", type=int, default=ScorerRecipe.steps)
    parser.add_argument("--seed", type=int, default=ScorerRecipe.seed)
    parser.add_argument("--batch-size", type=int, default=ScorerRecipe.batch_size)
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads; 1 (default) was fastest for this tiny model on 2 shared cores, and a fixed "
        "count keeps reruns on one machine bit-identical",
    )  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="hide the tqdm bar")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    recipe = ScorerRecipe(steps=args.steps, seed=args.seed, batch_size=args.batch_size)
    metrics = train_and_save(args.out, recipe=recipe, progress=not args.no_progress)
    for view in ("degraded", "clean"):
        m = metrics[view]
        print(f"{view}: hard-negative AUC {m['hard_negative_auc']:.3f}, random AUC {m['random_auc']:.3f}")
        for category, c in m["per_category"].items():
            print(
                f"  {category:18s} hard {c['hard_negative_auc']:.3f}  random {c['random_auc']:.3f}  n={c['n']}"
            )
        print(
            "  per negative kind: "
            + ", ".join(f"{k} {v['hard_negative_auc']:.3f}" for k, v in m["per_negative_kind"].items())
        )
    print(f"train {metrics['train']['wall_s']} s; saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
