"""Scene sampling, captions and rendering of the miniature world."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from leapalign.world import scenes
from leapalign.world.scenes import (
    BACKGROUND_RGB,
    CATEGORIES,
    COLORS,
    GAP,
    MARGIN,
    PALETTE,
    SHAPES,
    IntendedObject,
    ParsedCaption,
    Scene,
    SceneObject,
    format_caption,
    list_caption_words,
    parse_caption,
    render_scene,
    sample_intent,
    sample_scene,
)

N_SEEDS = 120


def _scenes(n: int = N_SEEDS) -> list[Scene]:
    return [
        sample_scene(np.random.default_rng(seed), CATEGORIES[seed % len(CATEGORIES)]) for seed in range(n)
    ]


def test_palette_and_background_are_far_apart():
    colours = [PALETTE[name] for name in COLORS] + [BACKGROUND_RGB]
    distances = [np.linalg.norm(np.subtract(a, b)) for a, b in itertools.combinations(colours, 2)]
    assert min(distances) >= 1.0, (
        f"closest palette pair is only {min(distances):.3f} apart; segmentation needs >= 1.0"
    )
    assert len(set(COLORS)) == 6, f"expected six distinct colour names, got {COLORS}"


@pytest.mark.parametrize("resolution", [32, 64])
def test_render_uses_only_exact_palette_colours(resolution):
    allowed = {tuple(np.float32(PALETTE[name])) for name in COLORS} | {tuple(np.float32(BACKGROUND_RGB))}
    for scene in _scenes(60):
        image = render_scene(scene, resolution)
        assert image.shape == (resolution, resolution, 3), f"bad shape {image.shape} for {scene.caption!r}"
        assert image.dtype == np.float32, f"expected float32, got {image.dtype}"
        found = {tuple(pixel) for pixel in image.reshape(-1, 3)}
        assert found <= allowed, (
            f"{scene.caption!r}: non-palette colours {found - allowed} (anti-aliasing leaked)"
        )
        drawn = {tuple(np.float32(PALETTE[obj.color])) for obj in scene.objects}
        assert drawn <= found, f"{scene.caption!r}: an object colour is missing from the render"


def test_sampling_and_rendering_are_deterministic():
    first, second = _scenes(60), _scenes(60)
    assert first == second, "the same seeds produced different scenes"
    for a, b in zip(first, second, strict=True):
        assert np.array_equal(render_scene(a), render_scene(b)), f"renders of {a.caption!r} differ"
    other = [sample_scene(np.random.default_rng(seed + 1000), "position") for seed in range(10)]
    assert len({scene.caption for scene in other}) > 1, "different seeds should give different captions"


def test_caption_round_trip_through_parse_caption():
    for seed in range(300):
        category = CATEGORIES[seed % len(CATEGORIES)]
        intent = sample_intent(np.random.default_rng(seed), category)
        caption = format_caption(intent)
        parsed = parse_caption(caption)
        assert parsed == intent, f"parse_caption({caption!r}) = {parsed}, expected {intent}"
        assert parsed.category == category, (
            f"{caption!r} read back as {parsed.category!r}, expected {category!r}"
        )
        assert format_caption(parsed) == caption, f"format/parse are not inverse for {caption!r}"


def test_caption_words_cover_every_caption():
    words = list_caption_words()
    assert len(words) == len(set(words)), f"duplicate words in {words}"
    used = {word for scene in _scenes(300) for word in scene.caption.split()}
    assert used <= set(words), f"captions use words outside list_caption_words(): {used - set(words)}"
    assert {"left", "triangles", "three", "that"} <= set(words), f"template words missing from {words}"


def test_every_category_has_a_distinct_template():
    examples = {
        "a red circle": ParsedCaption("single_object", (IntendedObject("red", "circle"),)),
        "a circle that is red": ParsedCaption("colors", (IntendedObject("red", "circle"),)),
        "three blue squares": ParsedCaption("counting", (IntendedObject("blue", "square", 3),)),
        "a red circle and a blue square": ParsedCaption(
            "two_objects", (IntendedObject("red", "circle"), IntendedObject("blue", "square"))
        ),
        "a circle that is red and a square that is blue": ParsedCaption(
            "attribute_binding", (IntendedObject("red", "circle"), IntendedObject("blue", "square"))
        ),
        "a blue circle to the left of a green triangle": ParsedCaption(
            "position", (IntendedObject("blue", "circle"), IntendedObject("green", "triangle")), "left of"
        ),
        "a cyan square below a cyan circle": ParsedCaption(
            "position", (IntendedObject("cyan", "square"), IntendedObject("cyan", "circle")), "below"
        ),
    }
    for caption, expected in examples.items():
        assert parse_caption(caption) == expected, f"{caption!r} parsed as {parse_caption(caption)}"
    assert parse_caption("  A Red   Circle. ") == examples["a red circle"], (
        "case/space/full stop should not matter"
    )


@pytest.mark.parametrize(
    ("caption", "words"),
    [
        ("a purple circle", ["'purple'", "allowed colors: red, green, blue, yellow, magenta, cyan"]),
        ("a red hexagon", ["'hexagon'", "allowed shapes: square, circle, triangle"]),
        ("two red hexagons", ["'hexagons'", "allowed shapes"]),
        ("a circle that is orange", ["'orange'", "allowed colors"]),
        ("a red circle to the left of a pink square", ["'pink'", "allowed colors"]),
        ("a red circle and a blue star", ["'star'", "allowed shapes"]),
    ],
)
def test_unknown_words_raise_and_name_the_word(caption, words):
    with pytest.raises(ValueError) as raised:
        parse_caption(caption)
    for word in words:
        assert word in str(raised.value), f"error for {caption!r} should mention {word}: {raised.value}"


@pytest.mark.parametrize(
    "caption",
    [
        "",
        "   ",
        "four red circles",
        "red circle",
        "a red circle and a blue square and a green triangle",
        "a red circle and a square that is blue",
        "a red circle to the left of a red circle",
        "hello world",
    ],
)
def test_malformed_captions_raise(caption):
    with pytest.raises(ValueError):
        parse_caption(caption)


def test_objects_stay_inside_and_apart():
    for scene in _scenes(300):
        for obj in scene.objects:
            half = obj.size / 2
            inside = MARGIN - 1e-9 <= obj.cx - half and obj.cx + half <= 1 - MARGIN + 1e-9
            inside = inside and MARGIN - 1e-9 <= obj.cy - half and obj.cy + half <= 1 - MARGIN + 1e-9
            assert inside, f"{scene.caption!r}: {obj} leaves the {MARGIN} border"
        for a, b in itertools.combinations(scene.objects, 2):
            reach = (a.size + b.size) / 2 + GAP - 1e-9
            assert abs(a.cx - b.cx) >= reach or abs(a.cy - b.cy) >= reach, (
                f"{scene.caption!r}: {a} overlaps {b}"
            )


def test_scene_content_matches_caption():
    for scene in _scenes(300):
        parsed = parse_caption(scene.caption)
        wanted = sorted(obj.pair for obj in parsed.objects for _ in range(obj.count))
        drawn = sorted((obj.color, obj.shape) for obj in scene.objects)
        assert drawn == wanted, f"{scene.caption!r} drew {drawn}, expected {wanted}"
        if parsed.category == "attribute_binding":
            (a, b) = parsed.objects
            assert a.color != b.color and a.shape != b.shape, (
                f"binding needs swap-sensitive colours: {scene.caption!r}"
            )
        if parsed.category in ("two_objects", "attribute_binding"):
            assert parsed.objects[0].shape != parsed.objects[1].shape, (
                f"shapes must differ: {scene.caption!r}"
            )


def test_position_scenes_make_the_relation_true():
    for seed in range(200):
        scene = sample_scene(np.random.default_rng(seed), "position")
        relation = parse_caption(scene.caption).relation
        a, b = scene.objects
        dx, dy = a.cx - b.cx, a.cy - b.cy
        on_axis, off_axis = {
            "left of": (-dx, dy),
            "right of": (dx, dy),
            "above": (-dy, dx),
            "below": (dy, dx),
        }[relation]
        need = (a.size + b.size) / 2 + GAP - 1e-9
        assert on_axis >= need, f"{scene.caption!r}: on-axis offset {on_axis:.3f} < {need:.3f}"
        assert abs(off_axis) <= 0.5 * on_axis + 1e-9, (
            f"{scene.caption!r}: off-axis offset {off_axis:.3f} too large"
        )


def test_object_sizes_are_7_to_13_pixels_at_32():
    for scene in _scenes(120):
        image = render_scene(scene, 32)
        for obj in scene.objects:
            rows, cols = np.nonzero(scenes.shape_mask(obj, 32))
            extent = max(rows.max() - rows.min(), cols.max() - cols.min()) + 1
            assert 6 <= extent <= 13, f"{obj} spans {extent} px at 32 px, expected about 7-13"
        assert image.min() >= 0.0 and image.max() <= 1.0, "render must stay in [0, 1]"


def test_shapes_fill_their_box_as_expected():
    fills = {}
    for shape in SHAPES:
        mask = scenes.shape_mask(SceneObject(shape, "red", 0.5, 0.5, 0.5), 64)
        fills[shape] = mask.sum() / (32 * 32)
    assert abs(fills["square"] - 1.0) < 0.07, f"square fill {fills['square']:.3f}"
    assert abs(fills["circle"] - np.pi / 4) < 0.05, f"circle fill {fills['circle']:.3f}"
    assert abs(fills["triangle"] - 0.5) < 0.05, f"triangle fill {fills['triangle']:.3f}"
    triangle = scenes.shape_mask(SceneObject("triangle", "red", 0.5, 0.5, 0.5), 64)
    rows = np.nonzero(triangle.any(axis=1))[0]
    assert triangle[rows[0]].sum() < triangle[rows[-1]].sum(), "triangle apex must point up (narrow top row)"


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="unknown category"):
        sample_scene(np.random.default_rng(0), "texture")
    with pytest.raises(ValueError, match="resolution"):
        render_scene(_scenes(1)[0], 8)
    with pytest.raises(ValueError, match="allowed shapes"):
        SceneObject("hexagon", "red", 0.5, 0.5, 0.3)
    with pytest.raises(ValueError, match="allowed colors"):
        IntendedObject("purple", "circle")


def test_placement_gives_up_after_bounded_attempts(monkeypatch):
    monkeypatch.setattr(scenes, "MIN_SIZE", 0.9)
    monkeypatch.setattr(scenes, "MAX_SIZE", 0.9)
    with pytest.raises(RuntimeError, match="could not place"):
        sample_scene(np.random.default_rng(0), "two_objects")
    with pytest.raises(RuntimeError, match="could not place"):
        sample_scene(np.random.default_rng(0), "position")
