"""The exact GenEval-like evaluator: ground truth scores 100 %, every single-attribute mutation fails."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from leapalign.world.judge import (
    DetectedObject,
    detect_objects,
    evaluate_batch,
    evaluate_image,
    label_components,
    relative_position,
    to_hwc_array,
)
from leapalign.world.prompts import PromptRecord
from leapalign.world.scenes import (
    CATEGORIES,
    COLORS,
    COUNT_WORDS,
    SHAPES,
    IntendedObject,
    ParsedCaption,
    Scene,
    SceneObject,
    format_caption,
    parse_caption,
    render_scene,
    sample_scene,
)

MUTATION_SEEDS = range(30)


def _scene(category: str, seed: int) -> Scene:
    return sample_scene(np.random.default_rng(seed), category)


def _other_color(color: str) -> str:
    return COLORS[(COLORS.index(color) + 1) % len(COLORS)]


def _with_objects(scene: Scene, objects: list[SceneObject]) -> Scene:
    return dataclasses.replace(scene, objects=tuple(objects))


def _assert_fails(scene: Scene, caption: str, what: str, resolution: int = 32) -> None:
    result = evaluate_image(render_scene(scene, resolution), caption)
    assert not result["correct"], f"{what}: {caption!r} still judged correct; checks={result['checks']}"


@pytest.mark.parametrize("resolution", [32, 64])
def test_ground_truth_scenes_score_100_percent(resolution):
    scenes = [_scene(CATEGORIES[seed % len(CATEGORIES)], seed) for seed in range(200)]
    images = [render_scene(scene, resolution) for scene in scenes]
    report = evaluate_batch(images, [scene.caption for scene in scenes])
    failures = [
        (scene.caption, evaluate_image(image, scene.caption)["checks"])
        for scene, image in zip(scenes, images, strict=True)
        if not evaluate_image(image, scene.caption)["correct"]
    ]
    assert report["overall"] == 1.0, (
        f"ground truth at {resolution} px scored {report['overall']}: {failures[:5]}"
    )
    assert report["n"] == 200, f"expected 200 evaluated images, got {report['n']}"
    assert set(report["per_category"]) == set(CATEGORIES), (
        f"categories seen: {sorted(report['per_category'])}"
    )


@pytest.mark.parametrize("resolution", [32, 64])
def test_detection_recovers_every_object_exactly(resolution):
    for seed in range(60):
        scene = _scene(CATEGORIES[seed % len(CATEGORIES)], seed)
        detected = detect_objects(render_scene(scene, resolution))
        found = sorted((obj.color, obj.shape) for obj in detected)
        drawn = sorted((obj.color, obj.shape) for obj in scene.objects)
        assert found == drawn, f"{scene.caption!r} at {resolution} px: detected {found}, drawn {drawn}"
        for obj in scene.objects:
            nearest = min(np.hypot(d.cx - obj.cx, d.cy - obj.cy) for d in detected)
            assert nearest < 1.5 / resolution + 1e-6, f"{obj} centre off by {nearest * resolution:.2f} px"


@pytest.mark.parametrize("category", ["single_object", "colors"])
def test_single_object_fails_with_wrong_colour_or_shape(category):
    for seed in MUTATION_SEEDS:
        scene = _scene(category, seed)
        (obj,) = scene.objects
        recoloured = dataclasses.replace(obj, color=_other_color(obj.color))
        _assert_fails(_with_objects(scene, [recoloured]), scene.caption, "colour changed")
        for shape in SHAPES:
            if shape != obj.shape:
                reshaped = dataclasses.replace(obj, shape=shape)
                _assert_fails(_with_objects(scene, [reshaped]), scene.caption, f"shape changed to {shape}")
        _assert_fails(_with_objects(scene, []), scene.caption, "object removed")


@pytest.mark.parametrize("category", ["two_objects", "attribute_binding"])
def test_two_objects_fail_when_either_object_changes(category):
    for seed in MUTATION_SEEDS:
        scene = _scene(category, seed)
        for index in range(2):
            objects = list(scene.objects)
            objects[index] = dataclasses.replace(objects[index], color=_other_color(objects[index].color))
            _assert_fails(_with_objects(scene, objects), scene.caption, f"colour of object {index} changed")
            used = {obj.shape for obj in scene.objects}
            (third_shape,) = set(SHAPES) - used
            objects = list(scene.objects)
            objects[index] = dataclasses.replace(objects[index], shape=third_shape)
            _assert_fails(_with_objects(scene, objects), scene.caption, f"shape of object {index} changed")
            _assert_fails(
                _with_objects(scene, [scene.objects[1 - index]]), scene.caption, "one object removed"
            )


def test_attribute_binding_fails_when_colours_are_swapped():
    for seed in MUTATION_SEEDS:
        scene = _scene("attribute_binding", seed)
        a, b = scene.objects
        swapped = [dataclasses.replace(a, color=b.color), dataclasses.replace(b, color=a.color)]
        _assert_fails(_with_objects(scene, swapped), scene.caption, "colours swapped between shapes")


def test_counting_requires_the_exact_count():
    for seed in range(60):
        scene = _scene("counting", seed)
        wanted = parse_caption(scene.caption).objects[0]
        fewer = list(scene.objects[1:])
        _assert_fails(_with_objects(scene, fewer), scene.caption, "one object removed")
        recoloured = [
            dataclasses.replace(scene.objects[0], color=_other_color(wanted.color)),
            *scene.objects[1:],
        ]
        _assert_fails(_with_objects(scene, recoloured), scene.caption, "one object recoloured")
        for count in COUNT_WORDS:
            if count != wanted.count:
                caption = format_caption(
                    ParsedCaption("counting", (IntendedObject(wanted.color, wanted.shape, count),))
                )
                _assert_fails(scene, caption, f"rendered {wanted.count} but asked for {count}")


def test_position_fails_when_objects_swap_places_or_relation_flips():
    opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
    for seed in range(60):
        scene = _scene("position", seed)
        parsed = parse_caption(scene.caption)
        a, b = scene.objects
        swapped = [
            dataclasses.replace(a, cx=b.cx, cy=b.cy, size=min(a.size, b.size)),
            dataclasses.replace(b, cx=a.cx, cy=a.cy, size=min(a.size, b.size)),
        ]
        _assert_fails(_with_objects(scene, swapped), scene.caption, "objects swapped places")
        flipped = format_caption(dataclasses.replace(parsed, relation=opposite[parsed.relation]))
        _assert_fails(scene, flipped, "relation flipped")
        recoloured = [dataclasses.replace(a, color=_other_color(a.color)), b]
        _assert_fails(_with_objects(scene, recoloured), scene.caption, "object A recoloured")


def test_position_requires_every_instance_pair_to_satisfy_the_relation():
    a = SceneObject("circle", "red", 0.2, 0.5, 0.25)
    b = SceneObject("square", "blue", 0.8, 0.5, 0.25)
    caption = "a red circle to the left of a blue square"
    scene = Scene((a, b), "position", caption)
    assert evaluate_image(render_scene(scene), caption)["correct"], (
        "the plain layout should satisfy the caption"
    )
    extra = SceneObject("circle", "red", 0.8, 0.15, 0.2)
    crowded = _with_objects(scene, [a, b, extra])
    _assert_fails(crowded, caption, "a second red circle not left of the square")


def test_extra_unrelated_objects_are_allowed():
    scene = Scene(
        (SceneObject("circle", "red", 0.25, 0.25, 0.3), SceneObject("square", "cyan", 0.7, 0.7, 0.3)),
        "single_object",
        "a red circle",
    )
    result = evaluate_image(render_scene(scene), "a red circle")
    assert result["correct"], f"an extra cyan square must not matter (GenEval rule): {result['checks']}"


def test_noise_and_tiny_specks_are_ignored():
    rng = np.random.default_rng(0)
    for seed in range(60):
        scene = _scene(CATEGORIES[seed % len(CATEGORIES)], seed)
        image = render_scene(scene, 32)
        noisy = np.clip(image + rng.normal(0.0, 0.05, image.shape), 0.0, 1.0).astype(np.float32)
        assert evaluate_image(noisy, scene.caption)["correct"], f"sigma=0.05 noise broke {scene.caption!r}"
        speckled = image.copy()
        speckled[0, 0] = (1.0, 0.0, 0.0)
        speckled[31, 31] = (0.0, 0.0, 1.0)
        speckled[0, 31] = (0.5, 0.5, 0.5)
        assert evaluate_image(speckled, scene.caption)["correct"], (
            f"single-pixel specks broke {scene.caption!r}"
        )


def test_mild_blur_at_64_px_keeps_almost_everything_correct():
    def box_blur(image):
        padded = np.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
        return sum(padded[i : i + 64, j : j + 64] for i in range(3) for j in range(3)) / 9

    scenes = [_scene(CATEGORIES[seed % len(CATEGORIES)], seed) for seed in range(120)]
    report = evaluate_batch([box_blur(render_scene(s, 64)) for s in scenes], [s.caption for s in scenes])
    assert report["image_accuracy"] >= 0.95, (
        f"3x3 blur at 64 px dropped accuracy to {report['image_accuracy']:.3f}"
    )


def test_image_conventions_are_converted_or_rejected():
    scene = _scene("two_objects", 3)
    image = render_scene(scene, 32)
    channels_first = np.transpose(image, (2, 0, 1))
    as_uint8 = (image * 255).round().astype(np.uint8)
    for variant in (channels_first, as_uint8):
        assert np.allclose(to_hwc_array(variant), image), (
            "CHW and uint8 inputs must convert to the HWC float image"
        )
        assert evaluate_image(variant, scene.caption)["correct"], "converted input must still score correct"
    with pytest.raises(ValueError, match=r"\(x \+ 1\) / 2"):
        evaluate_image(image * 2 - 1, scene.caption)
    with pytest.raises(ValueError, match="3 dimensions"):
        evaluate_image(image[..., 0], scene.caption)
    with pytest.raises(ValueError, match="NaN"):
        evaluate_image(np.full_like(image, np.nan), scene.caption)


def test_torch_tensor_input_matches_numpy():
    torch = pytest.importorskip("torch")
    scene = _scene("position", 5)
    image = render_scene(scene, 32)
    tensor = torch.from_numpy(np.ascontiguousarray(np.transpose(image, (2, 0, 1))))
    assert evaluate_image(tensor, scene.caption) == evaluate_image(image, scene.caption), (
        "tensor and array disagree"
    )
    batch = torch.stack([tensor, tensor])
    report = evaluate_batch(batch, [scene.caption, scene.caption])
    assert report["n"] == 2 and report["overall"] == 1.0, f"[B, 3, H, W] tensor batch misread: {report}"


def test_evaluate_batch_reports_per_category_accuracy():
    good = [_scene(category, 11) for category in CATEGORIES]
    images = [render_scene(scene) for scene in good]
    blank = np.ones((32, 32, 3), dtype=np.float32)
    prompts = [PromptRecord(s.caption, s.category, 0) for s in good] + [good[0].caption]
    report = evaluate_batch(np.stack([*images, blank]), prompts)
    assert report["n"] == 7, f"expected 7 images, got {report['n']}"
    assert report["per_category"]["single_object"] == 0.5, (
        f"1 of 2 single_object correct: {report['per_category']}"
    )
    assert report["per_category_n"]["single_object"] == 2, (
        f"per-category counts wrong: {report['per_category_n']}"
    )
    assert report["image_accuracy"] == pytest.approx(6 / 7), f"image accuracy {report['image_accuracy']}"
    assert report["overall"] == pytest.approx((5 + 0.5) / 6), (
        f"GenEval overall is the category mean: {report}"
    )
    with pytest.raises(ValueError, match="pair up"):
        evaluate_batch(images, [good[0].caption])
    with pytest.raises(ValueError, match="empty"):
        evaluate_batch([], [])
    with pytest.raises(ValueError, match="'purple'"):
        evaluate_image(images[0], "a purple circle")


def test_label_components_uses_4_connectivity():
    classes = np.full((6, 6), -1)
    classes[0, 0] = classes[1, 1] = 0
    classes[3:6, 3] = 2
    classes[5, 3:6] = 2
    classes[3, 5] = 1
    labels = label_components(classes)
    assert labels[0, 0] != labels[1, 1], "diagonal neighbours must be separate components"
    assert len({labels[r, 3] for r in range(3, 6)} | {labels[5, c] for c in range(3, 6)}) == 1, (
        "L-shape split"
    )
    assert (labels[classes < 0] == -1).all(), "unlabelled pixels must keep -1"
    assert len(np.unique(labels[labels >= 0])) == 4, f"expected 4 components, got {np.unique(labels)}"
    snake = np.full((9, 9), -1)
    snake[::2, :] = 0
    snake[1::4, -1] = 0
    snake[3::4, 0] = 0
    assert len(np.unique(label_components(snake)[snake >= 0])) == 1, "a serpentine component must stay whole"


def test_relative_position_follows_geneval_rule():
    def box(cx, cy):
        return DetectedObject("red", "square", cx, cy, 0.2, 0.2, 40, 1.0)

    assert relative_position(box(0.2, 0.5), box(0.8, 0.5)) == {"left of"}, "clear horizontal offset"
    assert relative_position(box(0.5, 0.2), box(0.5, 0.8)) == {"above"}, "y grows downwards"
    assert relative_position(box(0.5, 0.5), box(0.52, 0.5)) == set(), (
        "offsets within the margin mean no relation"
    )
    assert relative_position(box(0.2, 0.2), box(0.8, 0.8)) == {"left of", "above"}, "diagonal gives both"
