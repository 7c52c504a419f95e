"""`world_layout`: a differentiable, soft version of the world's exact evaluator, with a layout signal.

Flow-GRPO trains on GenEval's rule-based verdict, which only needs values. LeapAlign back-propagates
the reward into the pixels, so every step of `judge.py` is replaced here by a smooth counterpart.

1. Colour (evaluator: the nearest palette colour within `COLOR_MATCH_THRESHOLD`, else "unknown"). Per
   pixel, a softmax over the six palette colours, the background and an unknown class, with logits
   ``-||pixel - colour||^2 / color_temperature`` and ``-match_radius^2 / color_temperature``: a pixel
   is half "red" exactly at the evaluator's threshold. The red probabilities form the soft mask m.
2. Shapes (evaluator: 4-connected components, then the best template IoU in the component's bounding
   box, at least `MIN_SHAPE_IOU`). Components are not differentiable, so every box is tried instead:
   boxes of k x k, k x (k+1) and (k+1) x k pixels, k from ``min_size`` to ``max_size`` of the image,
   at every position, each holding the evaluator's own binary templates (box, ellipse, upright
   triangle, each also drawn up to one pixel larger). One conv2d per box size gives, per shape s,

       IoU_s = <m, T_s> / (|T_s| + <m, box> - <m, T_s>)     (box = the template's box grown by 1 px)

   so paint outside the shape, or in the ring around the box, counts against the fit.
3. Objects (evaluator: one per component). Greedy non-maximum suppression: keep the box whose best
   shape fits best, drop every box overlapping it (they form its cluster), repeat ``max_instances``
   times. Instance k detects shape s with probability

       d_k(s) = sigmoid((IoU*_s - iou_threshold) / iou_temperature)
                * softmax_s'(IoU*_s' / shape_temperature)[s]

   where IoU*_s is the best IoU of s in the cluster: the shape must fit (the evaluator's 0.6) AND beat
   the other shapes on the same blob (the evaluator's argmax). Its position is the centroid of the
   colour mass in its grown box, which moves with the pixels, so the relation term can push an object
   sideways; its extent is the box. The NMS choices are piecewise constant; gradients flow through
   the chosen IoUs and centroids, as in any detector.
4. Category rules (evaluator: `_check_caption`), each check in [0, 1], multiplied (soft AND):

   * single_object, colors:           presence(A)
   * two_objects, attribute_binding:  presence(A) * presence(B)
   * counting:                        count_score(sum_k d_k(A), n)
   * position:                        presence(A) * presence(B) * relation(A, B)

   with lam = dense_weight, K = max_instances, a0 = the smallest world object's area (MIN_SIZE^2 / 2):

       presence(A)    = (1 - lam) max_k d_k(A) + lam (1 - exp(-mean(m of A's colour) / a0))
       count_score    = (1 - lam) exp(-(count - n)^2 / (2 count_sigma^2)) + lam (1 - |count - n| / K)
       relation(A, B) = exp(sum_ij w_ij log r_ij / sum_ij w_ij),   w_ij = d_i(A) d_j(B)
       r_ij           = (1 - lam) sigmoid((q_ij - 0.5) / relation_temperature) + lam (1 + q_ij) / 2

   q_ij is the direction of GenEval's `relative_position` rule: for "A left of B", offset = c(A_i) -
   c(B_j), revised = sign(offset) relu(|offset| - position_threshold (extent_i + extent_j)) per axis,
   q = -revised_x / ||offset|| in [-1, 1]; the evaluator's rule is q > 0.5.

   The weighted geometric mean is a soft "EVERY detected pair satisfies the relation": one confident
   pair that fails drags it to ~0, a pair with a doubtful instance counts in proportion to its
   weight, and it does not shrink just because both detections are unsure (presence says that). The
   lam terms keep a gradient where the sharp terms are flat: no blob of the colour yet (IoU ~ 0), a
   count far off, a relation clearly wrong (sigmoid(-15) has no slope left).

Two objects of the SAME colour (allowed in two_objects and position captions, which then differ in
shape) share one colour mask and one set of instances; the shape softmax keeps them apart, because on
one blob d_k(circle) + d_k(square) <= 1, so one blob cannot pass as both. In the relation, instance k
of A and instance k of B are then the same blob and that pair is skipped: the evaluator never relates
a component to itself (it has one shape).

Optionally ``clip_weight * clip_score`` (the learned scorer, `ClipScore`) is added, for a reward that
also reflects what a learned model sees.

Cost per 32 px image on one CPU thread: ~10 ms forward, ~25 ms backward. The box bank grows with the
fourth power of the side, so larger images are scored on masks area-pooled to
about ``detect_resolution`` (32): at 64 px ground truth then scores ~0.8-0.9 instead of ~0.97, and
``detect_resolution=64`` restores that at ~10x the cost.

What it does not capture: objects that touch merge into one component for the evaluator but may be
found as two instances here (or, overlapping, as one); blobs wider than ``max_size``, smaller than
``min_size`` or far from square are not matched (the evaluator calls a 4 x 2 pixel blob a square);
rasterised circles of ~7 px are nearly squares and get a split shape score, as their IoUs differ by
only ~0.05; and the centroid gradient moves colour within an instance's box, it does not carry an
object across the image.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from leapalign.rewards.base import register_reward
from leapalign.rewards.clip_score import MINI_SCORER_DIR, check_images
from leapalign.world.judge import COLOR_MATCH_THRESHOLD, MIN_SHAPE_IOU, POSITION_THRESHOLD
from leapalign.world.scenes import (
    BACKGROUND_RGB,
    COLORS,
    MIN_SIZE,
    PALETTE,
    RELATIONS,
    SHAPES,
    ParsedCaption,
    parse_caption,
)

# As `evaluator._TEMPLATE_PADDING`: each template is also tried drawn this many pixels larger.
_TEMPLATE_PADDING: tuple[float, ...] = (0.0, 0.5, 1.0)
# Image fraction covered by the smallest world object (a MIN_SIZE triangle); the dense presence term
# reaches 1 - 1/e at this much colour.
_OBJECT_AREA = MIN_SIZE**2 / 2
# Added to the colour mass in a box before dividing, so an empty box's centroid is its centre.
_EPS = 1e-6
# Far colours would get probabilities near 1e-40, float32 denormals, which make CPU convolutions ~30x
# slower; clamped logits keep them normal numbers (e^-60 ~ 1e-26) and change nothing else.
_MIN_LOGIT = -60.0
# "A <relation> B" holds when A's offset from B points along this (x, y) direction (y grows downwards).
_RELATION_DIRECTIONS = {
    "left of": (-1.0, 0.0),
    "right of": (1.0, 0.0),
    "above": (0.0, -1.0),
    "below": (0.0, 1.0),
}


@dataclass(frozen=True)
class Instances:
    """The ``max_instances`` best non-overlapping detections in each colour mask, best first."""

    shape_score: Tensor  # [Q, K, 3] d_k(s): instance k is a detected object of shape s (order of SHAPES)
    centre: Tensor  # [Q, K, 2] (x, y) centroid of the colour mass in the instance's box, in [0, 1]
    extent: Tensor  # [Q, K, 2] (width, height) of the instance's box, normalised


def soft_color_masks(images: Tensor, temperature: float, match_radius: float) -> Tensor:
    """images [B, 3, H, W] -> probabilities [B, 8, H, W] of the 6 palette colours, background, unknown."""
    colours = torch.tensor(
        [PALETTE[c] for c in COLORS] + [BACKGROUND_RGB], dtype=images.dtype, device=images.device
    )  # [7, 3]
    distance2 = ((images[:, None] - colours[None, :, :, None, None]) ** 2).sum(dim=2)  # [B, 7, H, W]
    unknown = torch.full_like(distance2[:, :1], match_radius**2)  # [B, 1, H, W]
    logits = -torch.cat([distance2, unknown], dim=1) / temperature  # [B, 8, H, W]
    return torch.softmax(logits.clamp(min=_MIN_LOGIT), dim=1)


@functools.lru_cache(maxsize=256)
def shape_templates(height: int, width: int) -> tuple[Tensor, tuple[int, ...]]:
    """Binary templates [T, height, width] (float64) and the index into `SHAPES` of each.

    The evaluator's templates (`evaluator._shape_templates`), copied: the filled box, the inscribed
    ellipse and the upright isosceles triangle, stretched to the box, each also drawn up to one pixel
    larger and cropped to the box, because a shape of side s rasterises to a box of s - 1 to s pixels
    (without the padded ellipse, a 9 px circle that rasterises to an 8 x 8 box missing five corner
    pixels matches the square better).
    """
    templates, shapes = [], []
    for padding in _TEMPLATE_PADDING:
        ys = (torch.arange(height, dtype=torch.float64) + 0.5 - height / 2) / (height + padding) + 0.5
        xs = (torch.arange(width, dtype=torch.float64) + 0.5 - width / 2) / (width + padding) + 0.5
        y, x = ys[:, None], xs[None, :]
        inside = {
            "square": torch.ones(height, width, dtype=torch.bool),
            "circle": (x - 0.5) ** 2 + (y - 0.5) ** 2 <= 0.25,
            "triangle": (y >= 0.0) & ((x - 0.5).abs() <= 0.5 * y),
        }
        for index, shape in enumerate(SHAPES):
            if shape == "square" and padding:
                continue  # a padded box is still the box
            templates.append(inside[shape])
            shapes.append(index)
    return torch.stack(templates).double(), tuple(shapes)


def box_shapes(resolution: int, min_size: float, max_size: float) -> list[tuple[int, int]]:
    """(height, width) in pixels of the boxes tried: k x k, k x (k+1) and (k+1) x k for every integer k
    from min_size to max_size of the image (a rasterised shape's box is often one pixel longer one way)."""
    low = max(2, math.floor(min_size * resolution))
    high = min(resolution - 1, math.ceil(max_size * resolution))
    return [box for k in range(low, high + 1) for box in ((k, k), (k, k + 1), (k + 1, k))]


def template_ious(masks: Tensor, boxes: Sequence[tuple[int, int]]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """IoU of every shape in every box position with the soft masks [Q, H, W] (module docstring, step 2).

    Returns iou [Q, 3, N] (each shape's best template), centroid [Q, 2, N] (x, y of the colour mass in
    the grown box), box centre [2, N] and box size [2, N] (width, height), normalised to the image; N
    runs over (box, row, column).
    """
    _, height, width = masks.shape
    dtype, device = masks.dtype, masks.device
    rows = (torch.arange(height, dtype=dtype, device=device) + 0.5) / height
    cols = (torch.arange(width, dtype=dtype, device=device) + 0.5) / width
    # The grown box may stick out of the image by its one-pixel ring.
    padded = F.pad(masks[:, None], (1, 1, 1, 1))  # [Q, 1, H+2, W+2]
    moments = F.pad(
        torch.stack([masks * cols, masks * rows[:, None]], dim=1), (1, 1, 1, 1)
    )  # [Q, 2, H+2, W+2]
    ious, centroids, centres, sizes = [], [], [], []
    for box_h, box_w in boxes:
        templates, shape_of = shape_templates(box_h, box_w)  # [T, h, w]
        kernels = torch.zeros(len(shape_of) + 1, 1, box_h + 2, box_w + 2, dtype=dtype, device=device)
        kernels[:-1, 0, 1:-1, 1:-1] = templates.to(device, dtype)
        kernels[-1] = 1.0  # the grown box
        sums = F.conv2d(padded, kernels).flatten(2)  # [Q, T + 1, N_box]
        in_template, in_box = sums[:, :-1], sums[:, -1:]
        area = templates.sum(dim=(1, 2)).to(device, dtype)[None, :, None]  # [1, T, 1]
        iou = in_template / (area + in_box - in_template)  # [Q, T, N_box]
        by_shape = [[t for t, of in enumerate(shape_of) if of == s] for s in range(len(SHAPES))]
        ious.append(
            torch.stack([iou[:, members].amax(dim=1) for members in by_shape], dim=1)
        )  # [Q, 3, N_box]
        box_kernel = kernels[-1:].expand(2, 1, -1, -1).contiguous()
        mass_xy = F.conv2d(moments, box_kernel, groups=2).flatten(2)  # [Q, 2, N_box]
        # Output (i, j) is the box whose template covers rows i..i+h-1 and columns j..j+w-1.
        centre_y = (torch.arange(height - box_h + 1, dtype=dtype, device=device) + box_h / 2) / height
        centre_x = (torch.arange(width - box_w + 1, dtype=dtype, device=device) + box_w / 2) / width
        centre = torch.stack(torch.meshgrid(centre_x, centre_y, indexing="xy")).flatten(1)  # [2, N_box]
        # An empty box's centroid falls back to its centre instead of 0 / 0.
        centroids.append((mass_xy + _EPS * centre) / (in_box + _EPS))
        centres.append(centre)
        size = torch.tensor([box_w / width, box_h / height], dtype=dtype, device=device)
        sizes.append(size[:, None].expand_as(centre))
    return (
        torch.cat(ious, dim=2),
        torch.cat(centroids, dim=2),
        torch.cat(centres, dim=1),
        torch.cat(sizes, dim=1),
    )


def detect_instances(
    masks: Tensor,
    boxes: Sequence[tuple[int, int]],
    *,
    iou_threshold: float,
    iou_temperature: float,
    shape_temperature: float,
    max_instances: int,
) -> Instances:
    """Objects in each soft colour mask [Q, H, W]: template IoUs, greedy NMS, soft shape scores (step 3).

    NMS ranks boxes by their best shape's IoU, so a blob is claimed by the box and shape that fit it
    best (a circle by its tight ellipse box, not by a triangle in a larger box).
    """
    iou, centroid, centre, size = template_ious(masks, boxes)  # [Q, 3, N], [Q, 2, N], [2, N], [2, N]
    # Greedy NMS. The choices are piecewise constant, so they are made without a graph.
    rank = iou.detach().amax(dim=1)  # [Q, N]
    available = torch.ones_like(rank, dtype=torch.bool)
    picked, valid, clusters = [], [], []
    for _ in range(max_instances):
        index = torch.where(available, rank, torch.full_like(rank, -1.0)).argmax(dim=1)  # [Q]
        valid.append(available.gather(1, index[:, None])[:, 0])
        picked.append(index)
        reach = (size[:, None, :] + size[:, index, None]) / 2  # [2, Q, N]
        overlaps = ((centre[:, None, :] - centre[:, index, None]).abs() < reach).all(dim=0)  # [Q, N]
        clusters.append(available & overlaps)
        available = available & ~overlaps
    index = torch.stack(picked, dim=1)  # [Q, K]
    keep = torch.stack(valid, dim=1).to(masks.dtype)  # [Q, K]: 0 once every box is taken
    cluster = torch.stack(clusters, dim=1)  # [Q, K, N]
    # IoU*: each shape's best IoU within the instance's cluster, [Q, K, 3].
    best = torch.where(cluster[:, :, None, :], iou[:, None], torch.zeros_like(iou[:, None])).amax(dim=3)
    fits = torch.sigmoid((best - iou_threshold) / iou_temperature)
    wins = torch.softmax(best / shape_temperature, dim=2)
    rows = torch.arange(masks.shape[0], device=masks.device)[:, None]
    return Instances(
        shape_score=fits * wins * keep[:, :, None],
        centre=centroid[rows, :, index],  # [Q, K, 2]
        extent=size[:, index].permute(1, 2, 0),
    )


def relation_holds(
    score_a: Tensor,
    centre_a: Tensor,
    extent_a: Tensor,
    score_b: Tensor,
    centre_b: Tensor,
    extent_b: Tensor,
    relation: Tensor,
    same_color: Tensor,
    *,
    threshold: float = POSITION_THRESHOLD,
    temperature: float = 0.05,
    dense_weight: float = 0.1,
) -> Tensor:
    """Soft "every detected (A, B) pair satisfies the relation" [P] (module docstring, step 4).

    score [P, K] is each instance's detection probability, centre [P, K, 2] its (x, y), extent [P, K, 2]
    its (width, height); relation [P] indexes `RELATIONS`; same_color [P] skips the pairs (k, k), which
    are one blob when A and B come from one colour mask.
    """
    offset = centre_a[:, :, None, :] - centre_b[:, None, :, :]  # [P, K, K, 2]: (dx, dy), y down
    extent = extent_a[:, :, None, :] + extent_b[:, None, :, :]  # [P, K, K, 2]
    revised = torch.sign(offset) * torch.relu(offset.abs() - threshold * extent)
    norm = torch.sqrt((offset**2).sum(dim=-1) + _EPS**2)  # [P, K, K]
    directions = torch.tensor(
        [_RELATION_DIRECTIONS[key] for key in RELATIONS], dtype=offset.dtype, device=offset.device
    )[relation]  # [P, 2]
    direction = (revised * directions[:, None, None, :]).sum(dim=-1) / norm  # [P, K, K] in [-1, 1]
    pair_ok = (1.0 - dense_weight) * torch.sigmoid((direction - 0.5) / temperature) + dense_weight * (
        1.0 + direction
    ) / 2.0
    weight = score_a[:, :, None] * score_b[:, None, :]  # [P, K, K]
    itself = torch.eye(*weight.shape[1:], dtype=torch.bool, device=weight.device) & same_color[:, None, None]
    weight = weight.masked_fill(itself, 0.0).flatten(1)
    log_ok = torch.log(pair_ok.clamp(min=_EPS)).flatten(1)
    # With no detections at all the mean is 0 / tiny = 0: relation 1, and presence says the rest.
    total = weight.sum(dim=1).clamp(min=torch.finfo(weight.dtype).tiny)
    return torch.exp((weight * log_ok).sum(dim=1) / total)


class WorldLayoutReward:
    """Soft, differentiable counterpart of the world's exact evaluator (see the module docstring).

    __call__(images [B, 3, H, W] in [0, 1], prompts) -> rewards [B] in [0, 1] (plus clip_weight times
    the learned scorer when clip_weight > 0), on the images' device and dtype, differentiable with
    respect to the images.
    """

    def __init__(
        self,
        color_temperature: float = 0.02,  # on squared RGB distance; palette colours are >= 1 apart
        match_radius: float = COLOR_MATCH_THRESHOLD,  # RGB distance where a pixel is half "unknown"
        iou_threshold: float = MIN_SHAPE_IOU,  # template IoU at which a shape is half detected, [0, 1)
        iou_temperature: float = 0.05,  # sigmoid width around iou_threshold
        shape_temperature: float = 0.02,  # softmax over the shapes' IoUs on one blob (a 7 px circle vs
        # square differs by ~0.05)
        min_size: float = 0.15,  # smallest box side tried, fraction of the image (world objects: 0.22)
        max_size: float = 0.5,  # largest box side tried (world objects: at most 0.40)
        max_instances: int = 4,  # instances kept per colour: counts go up to 3, one more sees extras
        detect_resolution: int = 32,  # larger images are scored on area-pooled masks of about this side
        position_threshold: float = POSITION_THRESHOLD,  # GenEval's offset shrink, times summed extents
        relation_temperature: float = 0.05,  # sigmoid width around GenEval's 0.5 direction cut
        count_sigma: float = 0.5,  # width of the counting score exp(-(count - n)^2 / (2 sigma^2))
        dense_weight: float = 0.1,  # share of the dense terms that keep gradients far from correct, [0, 1)
        clip_weight: float = 0.0,  # > 0 adds clip_weight * clip_score (~[-20, 7] on world images)
        clip_path: str | Path = MINI_SCORER_DIR,  # CLIPModel folder or Hub id for clip_score
    ):
        positive = {
            "color_temperature": color_temperature,
            "match_radius": match_radius,
            "iou_temperature": iou_temperature,
            "shape_temperature": shape_temperature,
            "min_size": min_size,
            "relation_temperature": relation_temperature,
            "count_sigma": count_sigma,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"world_layout: {name} must be > 0, got {value}")
        if not min_size <= max_size < 1.0:
            raise ValueError(f"world_layout: need 0 < min_size <= max_size < 1, got {min_size}, {max_size}")
        if not 0.0 <= iou_threshold < 1.0:
            raise ValueError(f"world_layout: iou_threshold must be in [0, 1), got {iou_threshold}")
        if not 0.0 <= dense_weight < 1.0:
            raise ValueError(f"world_layout: dense_weight must be in [0, 1), got {dense_weight}")
        if max_instances < 2:
            raise ValueError(f"world_layout: max_instances must be >= 2 (two objects), got {max_instances}")
        if detect_resolution < 16:
            raise ValueError(f"world_layout: detect_resolution must be >= 16, got {detect_resolution}")
        if position_threshold < 0:
            raise ValueError(f"world_layout: position_threshold must be >= 0, got {position_threshold}")
        if clip_weight < 0:
            raise ValueError(f"world_layout: clip_weight must be >= 0, got {clip_weight}")
        self.color_temperature = color_temperature
        self.match_radius = match_radius
        self.iou_threshold = iou_threshold
        self.iou_temperature = iou_temperature
        self.shape_temperature = shape_temperature
        self.min_size = min_size
        self.max_size = max_size
        self.max_instances = max_instances
        self.detect_resolution = detect_resolution
        self.position_threshold = position_threshold
        self.relation_temperature = relation_temperature
        self.count_sigma = count_sigma
        self.dense_weight = dense_weight
        self.clip_weight = clip_weight
        self.clip_score = None
        if clip_weight > 0:
            from leapalign.rewards.clip_score import ClipScore

            self.clip_score = ClipScore(path=clip_path)

    def _parse(self, prompts: Sequence[str]) -> list[ParsedCaption]:
        parsed = []
        for index, prompt in enumerate(prompts):
            try:
                parsed.append(parse_caption(prompt))
            except ValueError as err:
                raise ValueError(
                    f"world_layout reward: prompt {index} is outside the world's grammar: {err}"
                ) from None
        return parsed

    def checks(self, images: Tensor, prompts: Sequence[str]) -> dict[str, Tensor]:
        """Every soft check [B] and the rule score [B]; NaN where a check does not apply to a prompt.

        Keys: presence_a, presence_b, count (sum_k d_k(A)), count_score, relation, rule.
        """
        prompts = list(prompts)
        check_images(images, len(prompts))
        parsed = self._parse(prompts)
        device, dtype, lam = images.device, images.dtype, self.dense_weight
        # 1. Soft colour masks, one per (image, colour) that the prompts name.
        probs = soft_color_masks(images.clamp(0.0, 1.0), self.color_temperature, self.match_radius)
        queries = list(
            dict.fromkeys((b, COLORS.index(o.color)) for b, p in enumerate(parsed) for o in p.objects)
        )
        query_image, query_color = (
            torch.tensor(column, device=device) for column in zip(*queries, strict=True)
        )
        masks = probs[query_image, query_color]  # [Q, H, W]
        # Larger images are scored at about detect_resolution: the box bank grows with the fourth power
        # of the side. Area pooling of the masks keeps each colour's mass.
        factor = math.ceil(max(masks.shape[-2:]) / self.detect_resolution)
        if factor > 1:
            size = (math.ceil(masks.shape[-2] / factor), math.ceil(masks.shape[-1] / factor))
            masks = F.interpolate(masks[:, None], size=size, mode="area")[:, 0]
        # 2-3. Template IoUs, NMS and shape scores for all masks at once.
        found = detect_instances(
            masks,
            box_shapes(max(masks.shape[-2:]), self.min_size, self.max_size),
            iou_threshold=self.iou_threshold,
            iou_temperature=self.iou_temperature,
            shape_temperature=self.shape_temperature,
            max_instances=self.max_instances,
        )
        color_presence = 1.0 - torch.exp(-masks.mean(dim=(1, 2)) / _OBJECT_AREA)  # [Q]
        # Object A and B of every prompt read their shape's score from their colour's instances. A
        # one-object prompt repeats A as B; those B values are masked below.
        query_of = {query: q for q, query in enumerate(queries)}
        roles = []
        for role in (0, 1):
            objects = [p.objects[min(role, len(p.objects) - 1)] for p in parsed]
            rows = torch.tensor(
                [query_of[(b, COLORS.index(o.color))] for b, o in enumerate(objects)], device=device
            )
            shapes = torch.tensor([SHAPES.index(o.shape) for o in objects], device=device)
            score = found.shape_score[rows, :, shapes]  # [B, K]
            presence = (1.0 - lam) * score.amax(dim=1) + lam * color_presence[rows]  # [B]
            roles.append((score, found.centre[rows], found.extent[rows], presence))
        (score_a, centre_a, extent_a, presence_a), (score_b, centre_b, extent_b, presence_b) = roles
        # 4. Category rules, each check in [0, 1].
        two = torch.tensor([len(p.objects) == 2 for p in parsed], device=device)
        is_position = torch.tensor([p.relation is not None for p in parsed], device=device)
        is_counting = torch.tensor([p.category == "counting" for p in parsed], device=device)
        count = score_a.sum(dim=1)
        error = count - torch.tensor([p.objects[0].count for p in parsed], dtype=dtype, device=device)
        count_score = (1.0 - lam) * torch.exp(-(error**2) / (2 * self.count_sigma**2)) + lam * (
            1.0 - error.abs() / self.max_instances
        )
        relation = relation_holds(
            score_a,
            centre_a,
            extent_a,
            score_b,
            centre_b,
            extent_b,
            torch.tensor([RELATIONS.index(p.relation or RELATIONS[0]) for p in parsed], device=device),
            torch.tensor([p.objects[0].color == p.objects[-1].color for p in parsed], device=device),
            threshold=self.position_threshold,
            temperature=self.relation_temperature,
            dense_weight=lam,
        )
        ones = torch.ones_like(presence_a)
        rule = torch.where(
            is_counting,
            count_score,
            presence_a * torch.where(two, presence_b, ones) * torch.where(is_position, relation, ones),
        )
        nan = torch.full_like(presence_a, float("nan"))
        return {
            "presence_a": presence_a,
            "presence_b": torch.where(two, presence_b, nan),
            "count": count,
            "count_score": count_score,
            "relation": torch.where(is_position, relation, nan),
            "rule": rule,
        }

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """images [B, 3, H, W] in [0, 1], B prompts -> rewards [B], differentiable w.r.t. the images."""
        rewards = self.checks(images, prompts)["rule"]
        if self.clip_score is not None:
            rewards = rewards + self.clip_weight * self.clip_score(images, prompts)
        return rewards


register_reward("world_layout")(WorldLayoutReward)
