"""`world_layout`, the soft evaluator: high on ground truth, beats every hard negative, exact gradients."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from leapalign.rewards.base import REWARDS, build_reward
from leapalign.world.judge import evaluate_image
from leapalign.world.layout_reward import WorldLayoutReward, relation_holds
from leapalign.world.scenes import (
    CATEGORIES,
    COLORS,
    RELATIONS,
    SHAPES,
    IntendedObject,
    ParsedCaption,
    Scene,
    format_caption,
    parse_caption,
    place_objects,
    render_scene,
    sample_scene,
)

NUM_SCENES = 24  # per category
FLIP = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


@pytest.fixture(scope="module")
def reward() -> WorldLayoutReward:
    return WorldLayoutReward()


def _scenes(category: str, count: int = NUM_SCENES, offset: int = 0) -> list[Scene]:
    return [sample_scene(np.random.default_rng(10_000 + offset + seed), category) for seed in range(count)]


def _render(scenes: list[Scene], resolution: int = 32) -> torch.Tensor:
    arrays = np.stack([render_scene(scene, resolution) for scene in scenes])  # [B, H, W, 3]
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous()


def _other(values: tuple[str, ...], *taken: str) -> str:
    return next(value for value in values if value not in taken)


def _hard_negatives(scene: Scene) -> list[tuple[str, Scene, str]]:
    """(kind, image scene, caption) variants that the exact evaluator judges wrong for the scene."""
    parsed = parse_caption(scene.caption)
    objs = parsed.objects
    used_colors = {obj.color for obj in scene.objects}
    out = []

    def caption(*objects: IntendedObject, relation: str | None = parsed.relation) -> str:
        return format_caption(ParsedCaption(parsed.category, tuple(objects), relation))

    def removed(index: int) -> Scene:
        return dataclasses.replace(scene, objects=scene.objects[:index] + scene.objects[index + 1 :])

    a = objs[0]
    new_color = _other(COLORS, *used_colors)
    if parsed.category == "counting":
        if a.count < 3:
            out.append(("count+1", scene, caption(dataclasses.replace(a, count=a.count + 1))))
        if a.count > 1:
            out.append(("count-1", scene, caption(dataclasses.replace(a, count=a.count - 1))))
        out.append(("object removed", removed(0), scene.caption))
        out.append(("color changed", scene, caption(dataclasses.replace(a, color=new_color))))
        return out
    out.append(("object removed", removed(len(scene.objects) - 1), scene.caption))
    if len(objs) == 1:
        out.append(("color changed", scene, caption(dataclasses.replace(a, color=new_color))))
        out.append(("shape changed", scene, caption(dataclasses.replace(a, shape=_other(SHAPES, a.shape)))))
        return out
    b = objs[1]
    out.append(("color changed", scene, caption(dataclasses.replace(a, color=new_color), b)))
    if a.color != b.color:
        swapped = (dataclasses.replace(a, color=b.color), dataclasses.replace(b, color=a.color))
        out.append(("colors swapped", scene, caption(*swapped)))
    if parsed.relation is not None:
        out.append(("relation flipped", scene, caption(a, b, relation=FLIP[parsed.relation])))
        out.append(("objects swapped", scene, caption(b, a)))
    return out


def _win_rates(reward: WorldLayoutReward, scenes: list[Scene]) -> dict[str, tuple[float, float, int]]:
    """Per kind of hard negative: (fraction of scenes whose true (image, caption) scores strictly higher,
    mean reward gap true - negative, number of pairs)."""
    true_scores = reward(_render(scenes), [scene.caption for scene in scenes])
    rows = [(i, kind, image, text) for i, s in enumerate(scenes) for kind, image, text in _hard_negatives(s)]
    negative_scores = reward(_render([row[2] for row in rows]), [row[3] for row in rows])
    gaps: dict[str, list[float]] = {}
    for (i, kind, _, _), score in zip(rows, negative_scores.tolist(), strict=True):
        gaps.setdefault(kind, []).append(true_scores[i].item() - score)
    return {kind: (float(np.mean(np.array(v) > 0)), float(np.mean(v)), len(v)) for kind, v in gaps.items()}


@pytest.mark.parametrize("category", CATEGORIES)
def test_ground_truth_scores_high(reward, category):
    scenes = _scenes(category)
    with torch.no_grad():
        scores = reward(_render(scenes), [scene.caption for scene in scenes])
    worst = int(scores.argmin())
    assert scores.mean().item() > 0.93, (
        f"{category}: mean ground-truth reward {scores.mean().item():.3f} <= 0.93"
    )
    assert scores.min().item() > 0.6, (
        f"{category}: ground truth {scenes[worst].caption!r} scored {scores[worst].item():.3f} <= 0.6"
    )
    assert scores.max().item() <= 1.0, f"{category}: reward {scores.max().item()} above 1"


@pytest.mark.parametrize("category", CATEGORIES)
def test_ground_truth_beats_every_hard_negative(reward, category):
    scenes = _scenes(category)
    for scene in scenes:
        for kind, image, caption in _hard_negatives(scene):
            verdict = evaluate_image(render_scene(image, 32), caption)
            assert not verdict["correct"], (
                f"{kind} of {scene.caption!r} ({caption!r}) is no negative: {verdict}"
            )
    with torch.no_grad():
        rates = _win_rates(reward, scenes)
    expected = {
        "single_object": {"object removed", "color changed", "shape changed"},
        "colors": {"object removed", "color changed", "shape changed"},
        "counting": {"count+1", "count-1", "object removed", "color changed"},
        "two_objects": {"object removed", "color changed", "colors swapped"},
        "attribute_binding": {"object removed", "color changed", "colors swapped"},
        "position": {
            "object removed",
            "color changed",
            "colors swapped",
            "relation flipped",
            "objects swapped",
        },
    }[category]
    assert set(rates) == expected, f"{category}: negatives tried {sorted(rates)}, expected {sorted(expected)}"
    measured = ", ".join(
        f"{kind}: wins {rate:.3f}, mean gap {gap:.3f} (n={n})"
        for kind, (rate, gap, n) in sorted(rates.items())
    )
    assert all(rate >= 0.95 for rate, _, _ in rates.values()), f"{category}: win rate below 0.95: {measured}"
    assert all(gap >= 0.5 for _, gap, _ in rates.values()), f"{category}: mean gap below 0.5: {measured}"


def test_same_color_position_scenes_are_ranked_by_the_relation(reward):
    """Both objects red (a red circle left of a red square): shapes separate them, flips lose."""
    rng = np.random.default_rng(7)
    scenes = []
    for index in range(16):
        color = COLORS[index % len(COLORS)]
        shape_a, shape_b = SHAPES[index % 3], SHAPES[(index + 1) % 3]
        parsed = ParsedCaption(
            "position", (IntendedObject(color, shape_a), IntendedObject(color, shape_b)), RELATIONS[index % 4]
        )
        scenes.append(Scene(place_objects(rng, parsed), "position", format_caption(parsed)))
    with torch.no_grad():
        checks = reward.checks(_render(scenes), [scene.caption for scene in scenes])
        flipped = [
            format_caption(dataclasses.replace(p, relation=FLIP[p.relation]))
            for p in map(parse_caption, [scene.caption for scene in scenes])
        ]
        flipped_scores = reward(_render(scenes), flipped)
    wins = (checks["rule"] > flipped_scores).double().mean().item()
    assert wins == 1.0, f"same-colour position: true caption beat the flipped one in {wins:.3f} of 16 scenes"
    assert checks["relation"].min().item() > 0.9, f"relation on ground truth: {checks['relation'].tolist()}"
    # One blob cannot be both objects: a lone red circle for "a red circle and a red square".
    lone = Scene(scenes[0].objects[:1], "two_objects", "x")
    shape = scenes[0].objects[0].shape
    caption = (
        f"a {scenes[0].objects[0].color} {shape} and a {scenes[0].objects[0].color} {_other(SHAPES, shape)}"
    )
    with torch.no_grad():
        lone_checks = reward.checks(_render([lone]), [caption])
    assert lone_checks["presence_a"].item() > 0.9, f"{caption!r}: drawn object presence {lone_checks}"
    assert lone_checks["presence_b"].item() < 0.15, f"{caption!r}: absent object presence {lone_checks}"


def _model_like(images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """3x3 box blur plus a little noise, inside (0, 1) so no pixel sits on the clamp.

    The noise also breaks exact ties between boxes, which symmetric synthetic images have: at a tie the
    max is not differentiable (any one-sided derivative is a valid subgradient, finite differences
    average two of them).
    """
    blurred = F.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed), dtype=images.dtype)
    return (0.02 + 0.96 * blurred + 0.01 * noise).clamp(0.01, 0.99)


def test_gradients_reach_the_pixels_and_point_uphill(reward):
    scenes = [scene for category in CATEGORIES for scene in _scenes(category, count=3, offset=500)]
    prompts = [scene.caption for scene in scenes]
    images = _model_like(_render(scenes)).requires_grad_(True)
    rewards = reward(images, prompts)
    assert rewards.dtype == images.dtype and rewards.shape == (len(scenes),), (
        f"{rewards.dtype} {rewards.shape}"
    )
    rewards.sum().backward()
    assert torch.isfinite(images.grad).all(), "non-finite gradient with respect to the pixels"
    grad_norm = images.grad.flatten(1).norm(dim=1)  # [B]
    # The smallest is "one red square", drawn and counted right: saturated, but not zero.
    assert (grad_norm > 1e-6).all(), f"zero gradient: {dict(zip(prompts, grad_norm.tolist(), strict=True))}"
    # A small step along each image's own gradient raises each image's reward.
    step = 1e-3 * images.grad / grad_norm[:, None, None, None]
    with torch.no_grad():
        gain = reward(images + step, prompts) - rewards
    assert (gain > 0).all(), (
        f"uphill step lowered the reward: {dict(zip(prompts, gain.tolist(), strict=True))}"
    )


def test_a_clearly_wrong_relation_still_sends_a_gradient():
    """Scored against the flipped relation (direction ~ -0.9), the sharp sigmoid alone is flat; the dense
    term keeps a gradient that raises the reward."""
    scenes = _scenes("position", count=8, offset=900)
    flipped = [
        format_caption(dataclasses.replace(p, relation=FLIP[p.relation]))
        for p in map(parse_caption, [scene.caption for scene in scenes])
    ]
    norms = {}
    for dense_weight in (0.1, 0.0):
        layout = WorldLayoutReward(dense_weight=dense_weight)
        images = _model_like(_render(scenes)).requires_grad_(True)
        rewards = layout(images, flipped)
        rewards.sum().backward()
        norms[dense_weight] = images.grad.flatten(1).norm(dim=1)
        if dense_weight:
            step = 1e-2 * images.grad / norms[dense_weight][:, None, None, None]
            with torch.no_grad():
                gain = layout(images + step, flipped) - rewards
            assert (gain > 0).all(), f"uphill step lowered the reward: {gain.tolist()}"
    assert (norms[0.1] > 1e-5).all(), f"gradient norms with the dense term: {norms[0.1].tolist()}"
    ratio = (norms[0.1] / norms[0.0]).min().item()
    assert ratio > 100, f"dense term raised the smallest gradient only {ratio:.1f}x: {norms}"


def test_gradient_matches_finite_differences_in_float64(reward):
    captions = ["a red circle to the left of a blue square", "two green triangles", "a square that is cyan"]
    rng = np.random.default_rng(3)
    scenes = [
        Scene(place_objects(rng, parse_caption(caption)), parse_caption(caption).category, caption)
        for caption in captions
    ]
    images = _model_like(_render(scenes, resolution=16).double())  # [3, 3, 16, 16]
    images = images.detach().requires_grad_(True)
    (gradient,) = torch.autograd.grad(reward(images, captions).sum(), images)
    generator = torch.Generator().manual_seed(0)
    step = 1e-6
    for _ in range(3):
        direction = torch.randn(images.shape, generator=generator, dtype=torch.float64)
        with torch.no_grad():
            plus = reward(images + step * direction, captions).sum()
            minus = reward(images - step * direction, captions).sum()
        numeric = ((plus - minus) / (2 * step)).item()
        analytic = (gradient * direction).sum().item()
        assert abs(numeric - analytic) <= 1e-9 + 1e-6 * abs(analytic), (
            f"directional derivative: finite differences {numeric:.10f}, autograd {analytic:.10f}"
        )
    assert gradient.abs().sum().item() > 1e-3, f"gradient is ~zero: {gradient.abs().sum().item()}"


def test_relation_term_hand_values():
    """A at x=0.2, B at x=0.8 (same row), boxes 0.2 wide; GenEval threshold 0.1, temperature 0.05."""
    one = torch.ones(1, 1, dtype=torch.float64)
    extent = torch.full((1, 1, 2), 0.2, dtype=torch.float64)
    centre_a = torch.tensor([[[0.2, 0.5]]], dtype=torch.float64)
    centre_b = torch.tensor([[[0.8, 0.5]]], dtype=torch.float64)
    distinct = torch.tensor([False])

    def relation(key: str, **kwargs) -> float:
        index = torch.tensor([RELATIONS.index(key)])
        return relation_holds(one, centre_a, extent, one, centre_b, extent, index, distinct, **kwargs).item()

    # offset dx = -0.6; revised dx = -(0.6 - 0.1 * 0.4) = -0.56, dy = 0; direction = 0.56 / 0.6.
    direction = 0.56 / 0.6
    sigmoid = 1.0 / (1.0 + math.exp(-(direction - 0.5) / 0.05))  # sigmoid(8.667) = 0.999828
    assert relation("left of") == pytest.approx(0.9 * sigmoid + 0.1 * (1 + direction) / 2, rel=1e-9), (
        "left of: expected 0.9 * 0.999828 + 0.1 * 0.966667 = 0.996512"
    )
    assert relation("left of", dense_weight=0.0) == pytest.approx(sigmoid, rel=1e-9), "sharp term alone"
    right = 0.9 / (1.0 + math.exp((direction + 0.5) / 0.05)) + 0.1 * (1 - direction) / 2
    assert relation("right of") == pytest.approx(right, rel=1e-9), "right of: ~0.1 * 0.0333 = 0.00333"
    # Vertical relations: revised dy = 0, so the direction is 0 and only the dense half remains.
    above = 0.9 / (1.0 + math.exp(0.5 / 0.05)) + 0.05
    assert relation("above") == pytest.approx(above, rel=1e-9), "above: 0.9 * sigmoid(-10) + 0.05 = 0.050041"
    # A second A instance (score 0.5) at x = 0.9, right of B: the weighted geometric mean drops.
    scores_a = torch.tensor([[1.0, 0.5]], dtype=torch.float64)
    centres_a = torch.tensor([[[0.2, 0.5], [0.9, 0.5]]], dtype=torch.float64)
    extents_a = torch.full((1, 2, 2), 0.2, dtype=torch.float64)
    index = torch.tensor([RELATIONS.index("left of")])
    both = relation_holds(scores_a, centres_a, extents_a, one, centre_b, extent, index, distinct).item()
    # Second pair: dx = 0.1, revised 0.1 - 0.04 = 0.06, direction -0.6: r = 0.9 sigmoid(-22) + 0.1 * 0.2.
    r_second = 0.9 / (1.0 + math.exp(22.0)) + 0.02
    r_first = 0.9 * sigmoid + 0.1 * (1 + direction) / 2
    expected = math.exp((1.0 * math.log(r_first) + 0.5 * math.log(r_second)) / 1.5)
    assert both == pytest.approx(expected, rel=1e-9), f"two A instances: {both} vs {expected:.6f} (= 0.2698)"
    # Same colour: instance 0 of A and of B are one blob, and that pair is skipped.
    same = torch.tensor([True])
    scores_b = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    centres_b = torch.tensor([[[0.2, 0.5], [0.8, 0.5]]], dtype=torch.float64)
    scores_a = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    skipped = relation_holds(
        scores_a, centres_a, extents_a, scores_b, centres_b, extents_a, index, same
    ).item()
    assert skipped == pytest.approx(r_first, rel=1e-9), f"self pair not skipped: {skipped} vs {r_first:.6f}"


def test_bad_prompts_and_images_raise(reward):
    images = torch.full((1, 3, 32, 32), 1.0)
    for prompt in ["a purple circle", "a red circle to the left of a red circle", "four red circles", ""]:
        with pytest.raises(ValueError, match="outside the world's grammar"):
            reward(images, [prompt])
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        reward(torch.ones(1, 32, 32, 3), ["a red circle"])
    with pytest.raises(ValueError, match="must be in \\[0, 1\\]"):
        reward(images * 2 - 3.0, ["a red circle"])  # [-1, 1] images
    with pytest.raises(ValueError, match="pair up"):
        reward(images, ["a red circle", "a blue square"])
    with pytest.raises(ValueError, match="shape_temperature"):
        WorldLayoutReward(shape_temperature=0.0)


def test_registered_and_buildable_with_options():
    assert REWARDS["world_layout"] is WorldLayoutReward, f"registry holds {REWARDS.get('world_layout')}"
    built = build_reward("world_layout", {"relation_temperature": 0.1})
    assert isinstance(built, WorldLayoutReward) and built.relation_temperature == 0.1, f"built {built!r}"
    with pytest.raises(ValueError, match="bad reward.options"):
        build_reward("world_layout", {"temperature": 1.0})


def test_values_in_unit_interval_on_noise_and_dtype_follows_images(reward):
    generator = torch.Generator().manual_seed(0)
    prompts = [
        sample_scene(np.random.default_rng(i), category).caption for i, category in enumerate(CATEGORIES)
    ]
    for dtype in (torch.float32, torch.float64):
        images = torch.rand(6, 3, 32, 32, generator=generator).to(dtype)
        scores = reward(images, prompts)
        assert scores.dtype == dtype, f"reward dtype {scores.dtype} for {dtype} images"
        assert ((scores >= 0) & (scores <= 1)).all(), f"rewards outside [0, 1]: {scores.tolist()}"
        assert scores.max().item() < 0.2, (
            f"uniform noise scored like an image of the prompt: {scores.tolist()}"
        )


def test_clip_weight_adds_the_learned_scorer():
    from leapalign.rewards.clip_score import ClipScore

    scenes = _scenes("position", count=4)
    images, prompts = _render(scenes), [scene.caption for scene in scenes]
    combined = WorldLayoutReward(clip_weight=0.25)
    with torch.no_grad():
        expected = WorldLayoutReward()(images, prompts) + 0.25 * ClipScore(device="cpu")(images, prompts)
        got = combined(images, prompts)
    assert torch.allclose(got, expected, atol=1e-5), f"combined {got.tolist()} vs {expected.tolist()}"
