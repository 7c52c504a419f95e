"""The world's judge: an exact, rule-based evaluator of miniature-world images, the GenEval analogue
(evaluation only; leapalign.evaluation samples the images it judges).

GenEval detects objects with a Mask2Former detector and checks each prompt category with fixed
rules. Here detection is exact instead of learned, because the world's palette is known:

1. every pixel is assigned to the nearest palette colour or the background, or to "unknown" when it
   is further than `COLOR_MATCH_THRESHOLD` from all of them (blurred edges, wrong colours);
2. pixels of the same colour are grouped into 4-connected components; components smaller than
   `MIN_COMPONENT_FRACTION` of the image are noise and dropped;
3. each component's shape is the template (square, inscribed ellipse, upright triangle) with the
   highest IoU against the component inside its bounding box; below `MIN_SHAPE_IOU` it is "unknown";
4. the category rule is applied (see `evaluate_image`), with relations decided by GenEval's own
   `relative_position` rule on bounding-box centres.

The evaluator never imports torch: tensors are converted through their ``numpy()`` method.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from leapalign.world.scenes import BACKGROUND_RGB, COLORS, PALETTE, ParsedCaption, parse_caption

# Euclidean RGB distance (channels in [0, 1]) within which a pixel counts as a palette colour. All
# palette/background pairs are >= 1.0 apart, so 0.3 leaves a wide dead zone for ambiguous pixels.
COLOR_MATCH_THRESHOLD: float = 0.3
# Components below this fraction of the image area are noise: the smallest real object (a 7 px
# triangle at 32 px) covers ~2.4 % of the image, five times this.
MIN_COMPONENT_FRACTION: float = 0.005
# A component must match its best shape template at least this well to count as that shape.
MIN_SHAPE_IOU: float = 0.6
# GenEval's POSITION_THRESHOLD: offsets smaller than this fraction of the summed object sizes are
# ignored when deciding relations.
POSITION_THRESHOLD: float = 0.1
# Outside this value range the image is in the wrong convention (e.g. [-1, 1] or [0, 255] floats).
_VALUE_TOLERANCE: float = 0.5

_UNKNOWN = -1
_BACKGROUND = len(COLORS)
_PALETTE_ARRAY = np.array([PALETTE[color] for color in COLORS] + [BACKGROUND_RGB], dtype=np.float32)


@dataclass(frozen=True)
class DetectedObject:
    """One connected component of a single palette colour; coordinates normalised like `SceneObject`."""

    color: str
    shape: str
    cx: float
    cy: float
    width: float
    height: float
    area: int
    shape_iou: float


def to_hwc_array(image: Any) -> np.ndarray:
    """Convert a numpy [H, W, 3] / [3, H, W] array or a torch tensor [3, H, W] into float32 [H, W, 3] in [0, 1].

    uint8 inputs are divided by 255. Float inputs must already be in [0, 1] (small overshoot is
    clipped); a clearly different range raises instead of silently scoring garbage.
    """
    if hasattr(image, "detach") and hasattr(image, "cpu"):
        image = image.detach().cpu().float().numpy()
    array = np.asarray(image)
    if array.ndim != 3:
        raise ValueError(f"image must have 3 dimensions ([H, W, 3] or [3, H, W]), got shape {array.shape}")
    if array.shape[-1] != 3 and array.shape[0] == 3:
        array = np.transpose(array, (1, 2, 0))
    if array.shape[-1] != 3:
        raise ValueError(f"image must have 3 colour channels, got shape {array.shape}")
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    array = array.astype(np.float32)
    if not np.all(np.isfinite(array)):
        raise ValueError("image contains NaN or infinite values")
    low, high = float(array.min()), float(array.max())
    if low < -_VALUE_TOLERANCE or high > 1.0 + _VALUE_TOLERANCE:
        raise ValueError(
            f"image values span [{low:.3f}, {high:.3f}] but must be in [0, 1]; "
            "map [-1, 1] outputs with (x + 1) / 2 and [0, 255] floats with x / 255"
        )
    return np.clip(array, 0.0, 1.0)


def classify_pixels(image: np.ndarray) -> np.ndarray:
    """Int [H, W] map: index into `COLORS`, `len(COLORS)` for background, -1 for unknown pixels."""
    distances = np.linalg.norm(image[:, :, np.newaxis, :] - _PALETTE_ARRAY, axis=-1)
    nearest = np.argmin(distances, axis=-1)
    matched = (
        np.take_along_axis(distances, nearest[..., np.newaxis], axis=-1)[..., 0] <= COLOR_MATCH_THRESHOLD
    )
    return np.where(matched, nearest, _UNKNOWN)


def label_components(classes: np.ndarray) -> np.ndarray:
    """Label 4-connected components of equal, non-negative class with the smallest flat index in them.

    Pixels with a negative class get -1. Works by alternating min-propagation between neighbours
    with pointer jumping, which converges in a few dozen vectorised steps for compact blobs and
    avoids a scipy dependency.
    """
    height, width = classes.shape
    valid = classes >= 0
    labels = np.where(valid, np.arange(height * width).reshape(height, width), height * width)
    same_down = valid[:-1, :] & valid[1:, :] & (classes[:-1, :] == classes[1:, :])
    same_right = valid[:, :-1] & valid[:, 1:] & (classes[:, :-1] == classes[:, 1:])
    sentinel = np.append(np.arange(height * width), height * width)
    while True:
        updated = labels.copy()
        updated[:-1, :] = np.where(same_down, np.minimum(updated[:-1, :], labels[1:, :]), updated[:-1, :])
        updated[1:, :] = np.where(same_down, np.minimum(updated[1:, :], labels[:-1, :]), updated[1:, :])
        updated[:, :-1] = np.where(same_right, np.minimum(updated[:, :-1], labels[:, 1:]), updated[:, :-1])
        updated[:, 1:] = np.where(same_right, np.minimum(updated[:, 1:], labels[:, :-1]), updated[:, 1:])
        sentinel[:-1] = updated.ravel()
        updated = sentinel[updated]
        if np.array_equal(updated, labels):
            break
        labels = updated
    return np.where(valid, labels, -1)


# Extra extents (in pixels) tried for each template: a shape of true side s rasterises to a bounding
# box of roughly s - 1 to s pixels, so a template fitted exactly to the box is often slightly too
# small, which at 7 px is enough to make a circle look like a square.
_TEMPLATE_PADDING: tuple[float, ...] = (0.0, 0.5, 1.0)


def _shape_templates(height: int, width: int, padding: float) -> dict[str, np.ndarray]:
    y = ((np.arange(height) + 0.5 - height / 2) / (height + padding) + 0.5)[:, np.newaxis]
    x = ((np.arange(width) + 0.5 - width / 2) / (width + padding) + 0.5)[np.newaxis, :]
    return {
        "square": np.ones((height, width), dtype=bool),
        "circle": (x - 0.5) ** 2 + (y - 0.5) ** 2 <= 0.25,
        "triangle": (y >= 0.0) & (np.abs(x - 0.5) <= 0.5 * y),
    }


def classify_shape(mask: np.ndarray) -> tuple[str, float]:
    """Best-matching shape for a component cropped to its bounding box, with its IoU.

    Templates are fitted to the bounding box (plus up to one pixel of padding), so the decision
    depends on how the component fills the box (square ~100 %, circle ~79 %, triangle ~50 %, and
    where), not on its size.
    """
    best_shape, best_iou = "unknown", 0.0
    for padding in _TEMPLATE_PADDING:
        for shape, template in _shape_templates(*mask.shape, padding).items():
            union = np.count_nonzero(mask | template)
            iou = np.count_nonzero(mask & template) / union if union else 0.0
            if iou > best_iou:
                best_shape, best_iou = shape, iou
    return (best_shape if best_iou >= MIN_SHAPE_IOU else "unknown"), float(best_iou)


def detect_objects(image: Any) -> list[DetectedObject]:
    """All coloured objects in ``image``, ordered by their top-left pixel (row-major)."""
    array = to_hwc_array(image)
    height, width, _ = array.shape
    classes = classify_pixels(array)
    foreground = np.where(classes == _BACKGROUND, _UNKNOWN, classes)
    labels = label_components(foreground)
    ids, areas = np.unique(labels[labels >= 0], return_counts=True)
    min_area = MIN_COMPONENT_FRACTION * height * width
    objects = []
    for label, area in zip(ids.tolist(), areas.tolist(), strict=True):
        if area < min_area:
            continue
        rows, cols = np.nonzero(labels == label)
        top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        shape, iou = classify_shape(labels[top:bottom, left:right] == label)
        objects.append(
            DetectedObject(
                color=COLORS[int(foreground.flat[label])],
                shape=shape,
                cx=float(left + right) / (2 * width),
                cy=float(top + bottom) / (2 * height),
                width=float(right - left) / width,
                height=float(bottom - top) / height,
                area=int(area),
                shape_iou=iou,
            )
        )
    return objects


def relative_position(obj_a: DetectedObject, obj_b: DetectedObject) -> set[str]:
    """Relations that hold for "A <relation> B", with GenEval's rule (y grows downwards).

    Each axis offset between bounding-box centres is shrunk by `POSITION_THRESHOLD` times the summed
    object extents; a relation holds when the shrunk offset is more than half of the full offset's
    length, i.e. it clearly dominates.
    """
    offset = np.array([obj_a.cx - obj_b.cx, obj_a.cy - obj_b.cy])
    extent = np.array([obj_a.width + obj_b.width, obj_a.height + obj_b.height])
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * extent, 0.0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def _check_caption(parsed: ParsedCaption, detected: list[DetectedObject]) -> dict[str, bool]:
    def matching(color: str, shape: str) -> list[DetectedObject]:
        return [obj for obj in detected if obj.color == color and obj.shape == shape]

    checks: dict[str, bool] = {}
    if parsed.category == "counting":
        wanted = parsed.objects[0]
        found = len(matching(wanted.color, wanted.shape))
        checks[f"count[{wanted.color} {wanted.shape}]=={wanted.count}"] = found == wanted.count
        return checks
    for wanted in parsed.objects:
        checks[f"present[{wanted.color} {wanted.shape}]"] = bool(matching(wanted.color, wanted.shape))
    if parsed.relation is not None:
        group_a = matching(parsed.objects[0].color, parsed.objects[0].shape)
        group_b = matching(parsed.objects[1].color, parsed.objects[1].shape)
        holds = bool(group_a and group_b) and all(
            parsed.relation in relative_position(a, b) for a in group_a for b in group_b
        )
        checks[f"relation[{parsed.relation}]"] = holds
    return checks


def evaluate_image(image: Any, prompt: str) -> dict[str, Any]:
    """Score one image against its world prompt, GenEval-style.

    Rules per category (extra, unrelated objects are allowed, as in GenEval):

    * single_object, colors: an object of the right colour AND shape exists;
    * two_objects, attribute_binding: each object exists with its own colour;
    * counting: exactly ``count`` objects of that (colour, shape);
    * position: both exist and EVERY (A, B) instance pair satisfies the relation.

    Returns ``{"prompt", "category", "correct", "checks": {name: bool}, "detected": [dict, ...]}``.
    Raises ``ValueError`` for a prompt outside the world's grammar or a malformed image.
    """
    parsed = parse_caption(prompt)
    detected = detect_objects(image)
    checks = _check_caption(parsed, detected)
    return {
        "prompt": prompt,
        "category": parsed.category,
        "correct": all(checks.values()),
        "checks": checks,
        "detected": [asdict(obj) for obj in detected],
    }


def _split_batch(images: Any) -> list[Any]:
    if hasattr(images, "ndim") and images.ndim == 4:
        return [images[index] for index in range(images.shape[0])]
    return list(images)


def evaluate_batch(images: Any, prompts: Sequence[Any]) -> dict[str, Any]:
    """Score a batch; ``images`` is a sequence of images or one [B, ...] array/tensor.

    ``prompts`` holds strings or objects with a ``prompt`` attribute (e.g. `PromptRecord`).
    ``overall`` is GenEval's score: the mean of the per-category accuracies over the categories
    present. ``image_accuracy`` is the plain fraction of correct images. ``correct`` and ``category``
    give each image's result, in order.
    """
    image_list = _split_batch(images)
    prompt_list = [getattr(prompt, "prompt", prompt) for prompt in prompts]
    if len(image_list) != len(prompt_list):
        raise ValueError(f"got {len(image_list)} images but {len(prompt_list)} prompts; they must pair up")
    if not image_list:
        raise ValueError("cannot evaluate an empty batch")
    correct: dict[str, list[bool]] = {}
    images_correct, images_category = [], []
    for image, prompt in zip(image_list, prompt_list, strict=True):
        result = evaluate_image(image, prompt)
        correct.setdefault(result["category"], []).append(result["correct"])
        images_correct.append(bool(result["correct"]))
        images_category.append(result["category"])
    per_category = {category: float(np.mean(values)) for category, values in correct.items()}
    total_correct = sum(sum(values) for values in correct.values())
    return {
        "overall": float(np.mean(list(per_category.values()))),
        "image_accuracy": total_correct / len(image_list),
        "per_category": per_category,
        "per_category_n": {category: len(values) for category, values in correct.items()},
        "n": len(image_list),
        "correct": images_correct,  # per image, in order (what paired statistics resample)
        "category": images_category,
    }
