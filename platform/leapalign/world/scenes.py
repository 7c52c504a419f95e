"""The miniature world: a tiny, fully specified visual domain of coloured shapes.

Why it exists: the real LeapAlign experiments fine-tune Flux and score it with GenEval, which needs
an object detector and hours of GPU time. The miniature world keeps the same *structure* (categories,
captions, a rule-based correctness check) but every image is exactly described by a `Scene`, so a
small model trained at 32x32 can be evaluated exactly and in milliseconds.

Conventions (shared with `judge.py`):

* Coordinates are normalised to [0, 1]; x grows to the right, y grows DOWNWARDS (image rows), so
  "above" means a smaller ``cy``. ``cx, cy`` is the centre of the object's bounding square and
  ``size`` is its side length, as a fraction of the image side.
* Colours are the six saturated corners of the RGB cube (`PALETTE`); the background is pure white
  (`BACKGROUND_RGB`). Every pair of these seven colours is at least 1.0 apart (Euclidean, RGB in
  [0, 1]), which is what makes colour segmentation exact.
* Rendering samples each pixel at its centre with no anti-aliasing, so a rendered image contains
  only palette and background colours.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import numpy as np

SHAPES: tuple[str, ...] = ("square", "circle", "triangle")

PALETTE: types.MappingProxyType[str, tuple[float, float, float]] = types.MappingProxyType(
    {
        "red": (1.0, 0.0, 0.0),
        "green": (0.0, 1.0, 0.0),
        "blue": (0.0, 0.0, 1.0),
        "yellow": (1.0, 1.0, 0.0),
        "magenta": (1.0, 0.0, 1.0),
        "cyan": (0.0, 1.0, 1.0),
    }
)
COLORS: tuple[str, ...] = tuple(PALETTE)
BACKGROUND_RGB: tuple[float, float, float] = (1.0, 1.0, 1.0)

CATEGORIES: tuple[str, ...] = (
    "single_object",
    "two_objects",
    "counting",
    "colors",
    "position",
    "attribute_binding",
)

# Relation key -> the phrase used in captions. The key is what `ParsedCaption.relation` holds.
RELATION_PHRASES: types.MappingProxyType[str, str] = types.MappingProxyType(
    {
        "left of": "to the left of",
        "right of": "to the right of",
        "above": "above",
        "below": "below",
    }
)
RELATIONS: tuple[str, ...] = tuple(RELATION_PHRASES)

COUNT_WORDS: types.MappingProxyType[int, str] = types.MappingProxyType({1: "one", 2: "two", 3: "three"})
MAX_COUNT: int = max(COUNT_WORDS)

# Object side lengths as a fraction of the image side: 7-13 px at 32 px, 14-26 px at 64 px. Below
# ~7 px a rasterised circle and square become hard to tell apart.
MIN_SIZE: float = 0.22
MAX_SIZE: float = 0.40
# Distance from the image border and minimum gap between objects' bounding squares: two pixels at
# 32 px, so objects never touch and stay separate connected components.
MARGIN: float = 0.03
GAP: float = 0.06
# Relation scenes keep the off-axis offset at most this fraction of the on-axis offset, so the
# caption's relation is the dominant one and survives the evaluator's margins.
MAX_OFF_AXIS_RATIO: float = 0.5
MAX_PLACEMENT_ATTEMPTS: int = 100
# Tries to place one more object next to the already placed ones before a layout attempt restarts.
_TRIES_PER_OBJECT: int = 20
MIN_RESOLUTION: int = 16

_ARTICLE = "a"
_COLOR_FOCUS_WORDS = ("that", "is")


@dataclass(frozen=True)
class SceneObject:
    """One filled shape: ``cx, cy`` is the centre and ``size`` the side of its bounding square."""

    shape: str
    color: str
    cx: float
    cy: float
    size: float

    def __post_init__(self) -> None:
        _check_shape(self.shape, context="SceneObject")
        _check_color(self.color, context="SceneObject")
        if not 0.0 < self.size <= 1.0:
            raise ValueError(f"SceneObject size must be in (0, 1], got {self.size}")


@dataclass(frozen=True)
class IntendedObject:
    """What a caption asks for: ``count`` objects of one (colour, shape)."""

    color: str
    shape: str
    count: int = 1

    def __post_init__(self) -> None:
        _check_shape(self.shape, context="IntendedObject")
        _check_color(self.color, context="IntendedObject")
        if not 1 <= self.count <= MAX_COUNT:
            raise ValueError(f"IntendedObject count must be in 1..{MAX_COUNT}, got {self.count}")

    @property
    def pair(self) -> tuple[str, str]:
        """The (colour, shape) pair, the unit the held-out split is defined on."""
        return (self.color, self.shape)


@dataclass(frozen=True)
class ParsedCaption:
    """The meaning of a caption. For ``position`` the relation reads ``objects[0] <relation> objects[1]``."""

    category: str
    objects: tuple[IntendedObject, ...]
    relation: str | None = None

    def __post_init__(self) -> None:
        if self.category not in CATEGORIES:
            raise ValueError(f"unknown category {self.category!r}; allowed: {', '.join(CATEGORIES)}")
        if (self.relation is None) != (self.category != "position"):
            raise ValueError(f"category {self.category!r} with relation {self.relation!r} is inconsistent")
        if self.relation is not None and self.relation not in RELATION_PHRASES:
            raise ValueError(f"unknown relation {self.relation!r}; allowed: {', '.join(RELATIONS)}")
        expected = 2 if self.category in ("two_objects", "position", "attribute_binding") else 1
        if len(self.objects) != expected:
            raise ValueError(
                f"category {self.category!r} needs {expected} object(s), got {len(self.objects)}"
            )
        if self.category != "counting" and any(obj.count != 1 for obj in self.objects):
            raise ValueError(f"only the counting category may ask for more than one object of a kind: {self}")

    @property
    def pairs(self) -> tuple[tuple[str, str], ...]:
        """All (colour, shape) pairs the caption mentions."""
        return tuple(obj.pair for obj in self.objects)


@dataclass(frozen=True)
class Scene:
    """A complete, renderable world state together with the caption that is true of it."""

    objects: tuple[SceneObject, ...]
    category: str
    caption: str


def _check_shape(word: str, context: str) -> None:
    if word not in SHAPES:
        raise ValueError(f"{context}: unknown shape word {word!r}; allowed shapes: {', '.join(SHAPES)}")


def _check_color(word: str, context: str) -> None:
    if word not in PALETTE:
        raise ValueError(f"{context}: unknown color word {word!r}; allowed colors: {', '.join(COLORS)}")


def _plural(shape: str, count: int) -> str:
    return shape if count == 1 else f"{shape}s"


def _phrase_plain(obj: IntendedObject) -> str:
    return f"{_ARTICLE} {obj.color} {obj.shape}"


def _phrase_color_focus(obj: IntendedObject) -> str:
    return f"{_ARTICLE} {obj.shape} {' '.join(_COLOR_FOCUS_WORDS)} {obj.color}"


def format_caption(parsed: ParsedCaption) -> str:
    """Render a `ParsedCaption` with the category's template; `parse_caption` is its exact inverse.

    Every category has its own template so that the category can be recovered from the caption
    alone (the evaluator only receives the prompt string):

    * single_object:     "a red circle"
    * colors:            "a circle that is red"
    * counting:          "two red circles" (count words one..three)
    * two_objects:       "a red circle and a blue square"
    * attribute_binding: "a circle that is red and a square that is blue"
    * position:          "a red circle to the left of a blue square" (also right of / above / below)
    """
    objs = parsed.objects
    if parsed.category == "single_object":
        return _phrase_plain(objs[0])
    if parsed.category == "colors":
        return _phrase_color_focus(objs[0])
    if parsed.category == "counting":
        obj = objs[0]
        return f"{COUNT_WORDS[obj.count]} {obj.color} {_plural(obj.shape, obj.count)}"
    if parsed.category == "two_objects":
        return f"{_phrase_plain(objs[0])} and {_phrase_plain(objs[1])}"
    if parsed.category == "attribute_binding":
        return f"{_phrase_color_focus(objs[0])} and {_phrase_color_focus(objs[1])}"
    assert parsed.relation is not None
    return f"{_phrase_plain(objs[0])} {RELATION_PHRASES[parsed.relation]} {_phrase_plain(objs[1])}"


_TEMPLATE_HELP = (
    "expected one of: 'a <color> <shape>', 'a <shape> that is <color>', '<one|two|three> <color> <shape(s)>', "
    "'a <color> <shape> and a <color> <shape>', 'a <shape> that is <color> and a <shape> that is <color>', "
    "'a <color> <shape> <to the left of|to the right of|above|below> a <color> <shape>'"
)


def _template_error(caption: str, detail: str) -> ValueError:
    return ValueError(f"caption {caption!r} {detail}; {_TEMPLATE_HELP}")


def _parse_shape(word: str, caption: str, plural_ok: bool = False) -> str:
    if word in SHAPES:
        return word
    if plural_ok and word.endswith("s") and word[:-1] in SHAPES:
        return word[:-1]
    raise ValueError(
        f"unknown shape word {word!r} in caption {caption!r}; allowed shapes: {', '.join(SHAPES)}"
    )


def _parse_color(word: str, caption: str) -> str:
    if word in PALETTE:
        return word
    raise ValueError(
        f"unknown color word {word!r} in caption {caption!r}; allowed colors: {', '.join(COLORS)}"
    )


def _parse_phrase(phrase: str, caption: str) -> tuple[str, IntendedObject]:
    """Parse one 'a <color> <shape>' (form "plain") or 'a <shape> that is <color>' (form "focus")."""
    tokens = phrase.split()
    if len(tokens) == 3 and tokens[0] == _ARTICLE:
        color = _parse_color(tokens[1], caption)
        return "plain", IntendedObject(color=color, shape=_parse_shape(tokens[2], caption))
    if len(tokens) == 5 and tokens[0] == _ARTICLE and tuple(tokens[2:4]) == _COLOR_FOCUS_WORDS:
        shape = _parse_shape(tokens[1], caption)
        return "focus", IntendedObject(color=_parse_color(tokens[4], caption), shape=shape)
    raise _template_error(caption, f"has an object phrase {phrase!r} that matches no template")


def _parse_count_phrase(tokens: list[str], caption: str) -> IntendedObject:
    words_to_count = {word: count for count, word in COUNT_WORDS.items()}
    if len(tokens) != 3:
        raise _template_error(caption, "is not a counting phrase '<count> <color> <shape(s)>'")
    color = _parse_color(tokens[1], caption)
    shape = _parse_shape(tokens[2], caption, plural_ok=True)
    return IntendedObject(color=color, shape=shape, count=words_to_count[tokens[0]])


def normalize_caption(caption: str) -> str:
    """Lower-case, collapse whitespace and drop one trailing full stop, so trivial variants parse alike."""
    text = " ".join(caption.lower().split())
    return text[:-1].rstrip() if text.endswith(".") else text


def parse_caption(caption: str) -> ParsedCaption:
    """Invert `format_caption`: recover category, intended objects and relation from a caption.

    Raises ``ValueError`` naming the offending word and the allowed vocabulary when a colour or shape
    word is unknown, and listing the templates when the caption has no recognised structure.
    """
    if not isinstance(caption, str):
        raise ValueError(f"caption must be a string, got {type(caption).__name__}")
    text = normalize_caption(caption)
    if not text:
        raise ValueError("caption is empty; " + _TEMPLATE_HELP)
    for relation, phrase in RELATION_PHRASES.items():
        separator = f" {phrase} "
        if separator in text:
            left, right = text.split(separator, 1)
            (form_a, obj_a), (form_b, obj_b) = _parse_phrase(left, caption), _parse_phrase(right, caption)
            if form_a != "plain" or form_b != "plain":
                raise _template_error(caption, "uses 'that is' inside a position caption")
            if obj_a.pair == obj_b.pair:
                raise ValueError(
                    f"caption {caption!r} relates a {obj_a.color} {obj_a.shape} to itself; "
                    "the two objects of a position caption must differ in color or shape"
                )
            return ParsedCaption("position", (obj_a, obj_b), relation)
    parts = text.split(" and ")
    if len(parts) == 2:
        (form_a, obj_a), (form_b, obj_b) = _parse_phrase(parts[0], caption), _parse_phrase(parts[1], caption)
        if form_a != form_b:
            raise _template_error(caption, "mixes the 'a <color> <shape>' and 'that is' forms")
        category = "two_objects" if form_a == "plain" else "attribute_binding"
        return ParsedCaption(category, (obj_a, obj_b))
    if len(parts) > 2:
        raise _template_error(caption, "mentions more than two objects")
    tokens = text.split()
    if tokens[0] in COUNT_WORDS.values():
        return ParsedCaption("counting", (_parse_count_phrase(tokens, caption),))
    form, obj = _parse_phrase(text, caption)
    return ParsedCaption("single_object" if form == "plain" else "colors", (obj,))


def list_caption_words() -> tuple[str, ...]:
    """Every word any caption template can produce, in a fixed order.

    The miniature model's tokenizer is built from a word list; giving it exactly this one makes every
    world caption tokenize into whole words.
    """
    words = [_ARTICLE, "and", *_COLOR_FOCUS_WORDS, *COLORS, *SHAPES, *(f"{shape}s" for shape in SHAPES)]
    words += [
        *COUNT_WORDS.values(),
        *(word for phrase in RELATION_PHRASES.values() for word in phrase.split()),
    ]
    return tuple(dict.fromkeys(words))


def _sample_pair(rng: np.random.Generator) -> tuple[str, str]:
    return COLORS[int(rng.integers(len(COLORS)))], SHAPES[int(rng.integers(len(SHAPES)))]


def sample_intent(rng: np.random.Generator, category: str) -> ParsedCaption:
    """Draw what a scene of ``category`` should contain (before any placement).

    two_objects uses two different shapes with independently drawn colours (they may coincide);
    attribute_binding uses two different shapes AND two different colours, so swapping the colours
    produces a different, wrong scene; position uses two objects that differ in colour or shape.
    """
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; allowed: {', '.join(CATEGORIES)}")
    if category in ("single_object", "colors"):
        color, shape = _sample_pair(rng)
        return ParsedCaption(category, (IntendedObject(color, shape),))
    if category == "counting":
        color, shape = _sample_pair(rng)
        count = int(rng.integers(1, MAX_COUNT + 1))
        return ParsedCaption(category, (IntendedObject(color, shape, count),))
    shape_a, shape_b = (SHAPES[int(i)] for i in rng.choice(len(SHAPES), size=2, replace=False))
    if category == "two_objects":
        color_a, color_b = (COLORS[int(i)] for i in rng.integers(len(COLORS), size=2))
        return ParsedCaption(category, (IntendedObject(color_a, shape_a), IntendedObject(color_b, shape_b)))
    if category == "attribute_binding":
        color_a, color_b = (COLORS[int(i)] for i in rng.choice(len(COLORS), size=2, replace=False))
        return ParsedCaption(category, (IntendedObject(color_a, shape_a), IntendedObject(color_b, shape_b)))
    all_pairs = [(color, shape) for color in COLORS for shape in SHAPES]
    index_a, index_b = rng.choice(len(all_pairs), size=2, replace=False)
    relation = RELATIONS[int(rng.integers(len(RELATIONS)))]
    obj_a = IntendedObject(*all_pairs[int(index_a)])
    obj_b = IntendedObject(*all_pairs[int(index_b)])
    return ParsedCaption(category, (obj_a, obj_b), relation)


def _boxes_apart(a: SceneObject, b: SceneObject) -> bool:
    """True when the bounding squares are separated by at least `GAP` along x or y."""
    reach = (a.size + b.size) / 2 + GAP
    return abs(a.cx - b.cx) >= reach or abs(a.cy - b.cy) >= reach


def _sample_size(rng: np.random.Generator) -> float:
    return float(rng.uniform(MIN_SIZE, MAX_SIZE))


def _sample_centre(rng: np.random.Generator, size: float) -> float:
    return float(rng.uniform(MARGIN + size / 2, 1.0 - MARGIN - size / 2))


def _place_free(rng: np.random.Generator, kinds: list[tuple[str, str]]) -> tuple[SceneObject, ...] | None:
    placed: list[SceneObject] = []
    for color, shape in kinds:
        size = _sample_size(rng)
        for _ in range(_TRIES_PER_OBJECT):
            candidate = SceneObject(shape, color, _sample_centre(rng, size), _sample_centre(rng, size), size)
            if all(_boxes_apart(candidate, other) for other in placed):
                placed.append(candidate)
                break
        else:
            return None
    return tuple(placed)


def _place_related(
    rng: np.random.Generator, obj_a: IntendedObject, obj_b: IntendedObject, relation: str
) -> tuple[SceneObject, SceneObject] | None:
    """Place A and B so that "A <relation> B" holds with a clear margin, by construction.

    Along the relation's axis the object with the smaller coordinate ("first") is separated from the
    other by both half sizes plus `GAP`; the off-axis offset is at most `MAX_OFF_AXIS_RATIO` times
    the on-axis one.
    """
    size_a, size_b = _sample_size(rng), _sample_size(rng)
    a_first = relation in ("left of", "above")
    size_first, size_second = (size_a, size_b) if a_first else (size_b, size_a)
    need = (size_first + size_second) / 2 + GAP
    low_first = MARGIN + size_first / 2
    high_second = 1.0 - MARGIN - size_second / 2
    if low_first + need > high_second:
        return None
    on_first = float(rng.uniform(low_first, high_second - need))
    on_second = float(rng.uniform(on_first + need, high_second))
    reach = MAX_OFF_AXIS_RATIO * (on_second - on_first)
    off_first = _sample_centre(rng, size_first)
    low = max(MARGIN + size_second / 2, off_first - reach)
    high = min(1.0 - MARGIN - size_second / 2, off_first + reach)
    if low > high:
        return None
    off_second = float(rng.uniform(low, high))
    on_a, on_b = (on_first, on_second) if a_first else (on_second, on_first)
    off_a, off_b = (off_first, off_second) if a_first else (off_second, off_first)
    horizontal = relation in ("left of", "right of")
    xy_a = (on_a, off_a) if horizontal else (off_a, on_a)
    xy_b = (on_b, off_b) if horizontal else (off_b, on_b)
    return (
        SceneObject(obj_a.shape, obj_a.color, xy_a[0], xy_a[1], size_a),
        SceneObject(obj_b.shape, obj_b.color, xy_b[0], xy_b[1], size_b),
    )


def place_objects(rng: np.random.Generator, parsed: ParsedCaption) -> tuple[SceneObject, ...]:
    """Lay out the objects a caption asks for so that the caption is true and nothing overlaps.

    Raises ``RuntimeError`` after `MAX_PLACEMENT_ATTEMPTS` failed layouts rather than looping forever.
    """
    for _ in range(MAX_PLACEMENT_ATTEMPTS):
        if parsed.relation is not None:
            layout = _place_related(rng, parsed.objects[0], parsed.objects[1], parsed.relation)
        else:
            kinds = [obj.pair for obj in parsed.objects for _ in range(obj.count)]
            layout = _place_free(rng, kinds)
        if layout is not None:
            return layout
    raise RuntimeError(
        f"could not place the objects of {format_caption(parsed)!r} without overlap in "
        f"{MAX_PLACEMENT_ATTEMPTS} attempts; reduce MAX_SIZE or GAP"
    )


def sample_scene(rng: np.random.Generator, category: str) -> Scene:
    """Draw a random scene of ``category`` whose caption is true of it; deterministic given ``rng``'s state."""
    parsed = sample_intent(rng, category)
    return Scene(objects=place_objects(rng, parsed), category=category, caption=format_caption(parsed))


def shape_mask(obj: SceneObject, resolution: int) -> np.ndarray:
    """Boolean [H, W] mask of the pixels whose centres fall inside ``obj`` (no anti-aliasing)."""
    centres = (np.arange(resolution, dtype=np.float64) + 0.5) / resolution
    x = centres[np.newaxis, :]
    y = centres[:, np.newaxis]
    half = obj.size / 2
    if obj.shape == "square":
        return (np.abs(x - obj.cx) <= half) & (np.abs(y - obj.cy) <= half)
    if obj.shape == "circle":
        return (x - obj.cx) ** 2 + (y - obj.cy) ** 2 <= half**2
    # Upright isosceles triangle: apex at the top centre of the bounding square, base along its bottom.
    depth = (y - (obj.cy - half)) / obj.size
    return (depth >= 0.0) & (depth <= 1.0) & (np.abs(x - obj.cx) <= depth * half)


def render_scene(scene: Scene, resolution: int = 32) -> np.ndarray:
    """Rasterise ``scene`` to a float32 [H, W, 3] image in [0, 1] containing only exact palette colours.

    Objects are painted in order, later ones on top (scenes from `sample_scene` never overlap).
    """
    if not isinstance(resolution, int | np.integer) or resolution < MIN_RESOLUTION:
        raise ValueError(f"resolution must be an integer >= {MIN_RESOLUTION}, got {resolution!r}")
    resolution = int(resolution)
    image = np.empty((resolution, resolution, 3), dtype=np.float32)
    image[...] = BACKGROUND_RGB
    for obj in scene.objects:
        image[shape_mask(obj, resolution)] = PALETTE[obj.color]
    return image
