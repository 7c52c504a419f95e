"""The miniature world: coloured-shape scenes (`scenes`), their prompt sets (`prompts`), the world's exact
GenEval-like judge (`judge`), its learned scorer (`scorer`) and differentiable reward (`layout_reward`),
the miniature model's pretraining (`pretrain`) and the before/after accuracy of a run (`evaluate`).

What this package exports (scenes, prompts, judge) is plain numpy and pyarrow code (no torch, ray or
PIL), so CPU tests and the 32x32 miniature model can use it anywhere. See `scenes` for the palette and
coordinate conventions.
"""

from leapalign.world.judge import (
    DetectedObject,
    detect_objects,
    evaluate_batch,
    evaluate_image,
    relative_position,
    to_hwc_array,
)
from leapalign.world.prompts import (
    HELD_OUT_PAIRS,
    PromptRecord,
    build_prompt_sets,
    make_prompt_files,
    mentions_held_out,
    read_prompts,
    regenerate_scene,
    write_prompts,
)
from leapalign.world.scenes import (
    BACKGROUND_RGB,
    CATEGORIES,
    COLORS,
    COUNT_WORDS,
    PALETTE,
    RELATIONS,
    SHAPES,
    IntendedObject,
    ParsedCaption,
    Scene,
    SceneObject,
    format_caption,
    list_caption_words,
    parse_caption,
    place_objects,
    render_scene,
    sample_intent,
    sample_scene,
)

__all__ = [
    "BACKGROUND_RGB",
    "CATEGORIES",
    "COLORS",
    "COUNT_WORDS",
    "DetectedObject",
    "HELD_OUT_PAIRS",
    "IntendedObject",
    "PALETTE",
    "ParsedCaption",
    "PromptRecord",
    "RELATIONS",
    "SHAPES",
    "Scene",
    "SceneObject",
    "build_prompt_sets",
    "detect_objects",
    "evaluate_batch",
    "evaluate_image",
    "format_caption",
    "list_caption_words",
    "make_prompt_files",
    "mentions_held_out",
    "parse_caption",
    "place_objects",
    "read_prompts",
    "regenerate_scene",
    "relative_position",
    "render_scene",
    "sample_intent",
    "sample_scene",
    "to_hwc_array",
    "write_prompts",
]
