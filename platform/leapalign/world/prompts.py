"""Train / held-out prompt sets for the miniature world, and validated prompt-file I/O.

Held-out split (compositional generalisation, the point of the eval set): a fixed set of
(colour, shape) pairs, `HELD_OUT_PAIRS`, never appears in training. Every training prompt mentions
only non-held-out pairs; every eval prompt mentions at least one held-out pair (the other object,
if any, may be anything). Each held-out colour and shape still occurs in training with other
partners, so the eval set measures whether the model *combines* known attributes, not whether it
knows a word. Both sets cycle through `CATEGORIES`, so category counts differ by at most one.

Files are Parquet with columns ``prompt`` (string), ``category`` (string), ``seed`` (int64),
``objects`` (JSON list of ``{"color", "shape", "count"}``) and ``relation`` (string or null). A row's
ground-truth scene is ``sample_scene(np.random.default_rng(seed), category)`` (see `regenerate_scene`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from leapalign.world.scenes import (
    CATEGORIES,
    COLORS,
    SHAPES,
    IntendedObject,
    ParsedCaption,
    Scene,
    parse_caption,
    sample_scene,
)

HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("red", "triangle"),
    ("green", "square"),
    ("blue", "circle"),
    ("yellow", "triangle"),
)
GENERIC_CATEGORY = "generic"
DEFAULT_N_TRAIN = 6000
DEFAULT_N_EVAL = 600
# Candidate scenes drawn per row before giving up; an eval row needs a held-out pair, which a
# single-object scene hits with probability 4/18, so 1000 draws never fail in practice.
MAX_SPLIT_ATTEMPTS = 1000
_MAX_ROW_SEED = 2**62

PROMPT_SCHEMA = pa.schema(
    [
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("category", pa.string(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("objects", pa.string(), nullable=False),
        pa.field("relation", pa.string(), nullable=True),
    ]
)
_REGENERATE_HINT = "regenerate it with leapalign.world.prompts.make_prompt_files(out_dir)"


@dataclass(frozen=True)
class PromptRecord:
    """One validated prompt. Generic (non-world) prompts have category "generic" and no objects."""

    prompt: str
    category: str
    seed: int
    objects: tuple[IntendedObject, ...] = ()
    relation: str | None = None


def _check_held_out(held_out_pairs: Iterable[tuple[str, str]]) -> frozenset[tuple[str, str]]:
    pairs = frozenset((str(color), str(shape)) for color, shape in held_out_pairs)
    for color, shape in pairs:
        if color not in COLORS or shape not in SHAPES:
            raise ValueError(
                f"held-out pair ({color!r}, {shape!r}) is outside the vocabulary; "
                f"colors: {', '.join(COLORS)}; shapes: {', '.join(SHAPES)}"
            )
    if not pairs or len(pairs) >= len(COLORS) * len(SHAPES):
        raise ValueError(f"hold out between 1 and {len(COLORS) * len(SHAPES) - 1} pairs, got {len(pairs)}")
    return pairs


def mentions_held_out(
    parsed: ParsedCaption, held_out_pairs: Iterable[tuple[str, str]] = HELD_OUT_PAIRS
) -> bool:
    """True when the caption mentions at least one held-out (colour, shape) pair."""
    held_out = frozenset(held_out_pairs)
    return any(pair in held_out for pair in parsed.pairs)


def _objects_json(parsed: ParsedCaption) -> str:
    return json.dumps(
        [{"color": obj.color, "shape": obj.shape, "count": obj.count} for obj in parsed.objects],
        separators=(",", ":"),
    )


def _build_split(
    rng: np.random.Generator,
    n_rows: int,
    want_held_out: bool,
    held_out: frozenset[tuple[str, str]],
    exclude: frozenset[str] = frozenset(),
) -> pa.Table:
    columns: dict[str, list] = {name: [] for name in PROMPT_SCHEMA.names}
    for row in range(n_rows):
        category = CATEGORIES[row % len(CATEGORIES)]
        fallback = None  # a scene that obeys the rule but repeats an excluded caption
        for _ in range(MAX_SPLIT_ATTEMPTS):
            row_seed = int(rng.integers(0, _MAX_ROW_SEED))
            scene = sample_scene(np.random.default_rng(row_seed), category)
            parsed = parse_caption(scene.caption)
            if mentions_held_out(parsed, held_out) == want_held_out:
                if scene.caption not in exclude:
                    break
                fallback = fallback or (row_seed, scene, parsed)
        else:
            if fallback is None:
                raise RuntimeError(
                    f"no {category} scene satisfied the split rule in {MAX_SPLIT_ATTEMPTS} draws; "
                    "hold out fewer (or more) pairs"
                )
            # A category with few captions (single objects of a held-out pair: 4 captions) cannot avoid
            # them all: the caption repeats, with a scene (seed) of its own.
            row_seed, scene, parsed = fallback
        columns["prompt"].append(scene.caption)
        columns["category"].append(category)
        columns["seed"].append(row_seed)
        columns["objects"].append(_objects_json(parsed))
        columns["relation"].append(parsed.relation)
    return pa.table(columns, schema=PROMPT_SCHEMA)


def build_prompt_sets(
    seed: int,
    n_train: int,
    n_eval: int,
    held_out_pairs: Sequence[tuple[str, str]] = HELD_OUT_PAIRS,
) -> tuple[pa.Table, pa.Table]:
    """Build the (train, eval) prompt tables; deterministic in ``seed``.

    Rule: no train prompt mentions a pair in ``held_out_pairs``; every eval prompt mentions at least
    one. Rows cycle through `CATEGORIES` (balanced to within one row). Each table's schema metadata
    records the split name and the held-out pairs.
    """
    if n_train < 1 or n_eval < 1:
        raise ValueError(f"n_train and n_eval must be >= 1, got {n_train} and {n_eval}")
    held_out = _check_held_out(held_out_pairs)
    train_seq, eval_seq = np.random.SeedSequence(seed).spawn(2)
    metadata_pairs = json.dumps(sorted(held_out))
    train = _build_split(np.random.default_rng(train_seq), n_train, False, held_out)
    evaluation = _build_split(np.random.default_rng(eval_seq), n_eval, True, held_out)
    return (
        train.replace_schema_metadata({"split": "train", "held_out_pairs": metadata_pairs}),
        evaluation.replace_schema_metadata({"split": "eval", "held_out_pairs": metadata_pairs}),
    )


DEFAULT_N_VALIDATION = 600


def build_validation_set(
    seed: int, n_rows: int, evaluation: pa.Table, held_out_pairs: Sequence[tuple[str, str]] = HELD_OUT_PAIRS
) -> pa.Table:
    """A validation split for choosing hyperparameters: built like the eval split (every prompt mentions a
    held-out pair) from its own seed stream, avoiding the captions of `evaluation` (the reported test split)
    wherever its category has others (a single held-out object has only 4 captions: those repeat)."""
    held_out = _check_held_out(held_out_pairs)
    validation_seq = np.random.SeedSequence(seed).spawn(3)[2]  # children 0, 1: train and eval
    exclude = frozenset(evaluation.column("prompt").to_pylist())
    table = _build_split(np.random.default_rng(validation_seq), n_rows, True, held_out, exclude)
    metadata = {"split": "validation", "held_out_pairs": json.dumps(sorted(held_out))}
    return table.replace_schema_metadata(metadata)


def write_prompts(table: pa.Table, path: str | os.PathLike[str]) -> Path:
    """Write ``table`` to Parquet atomically: a temp file in the same directory, then ``os.replace``.

    A failure at any point leaves a previous file at ``path`` untouched and removes the temp file,
    so readers never see a half-written prompt file.
    """
    target = Path(path)
    if not isinstance(table, pa.Table):
        raise TypeError(f"write_prompts needs a pyarrow.Table, got {type(table).__name__}")
    if "prompt" not in table.column_names:
        raise ValueError(
            f"refusing to write {target}: the table has no 'prompt' column ({table.column_names})"
        )
    if table.num_rows == 0:
        raise ValueError(f"refusing to write {target}: the table has zero rows")
    target.parent.mkdir(parents=True, exist_ok=True)
    # A fresh unique name (not mkstemp, which would create the file mode 0600 regardless of umask).
    temp_name = target.parent / f".{target.name}.{uuid.uuid4().hex}.tmp"
    try:
        pq.write_table(table, temp_name)
        with open(temp_name, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        raise
    return target


def _read_text_prompts(path: Path) -> tuple[list[object], dict[str, list[object]]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"prompt file {path} is not UTF-8 text ({error}); save it as UTF-8") from error
    prompts: list[object] = [line.strip() for line in text.splitlines() if line.strip()]
    return prompts, {}


def _read_parquet_prompts(path: Path) -> tuple[list[object], dict[str, list[object]]]:
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as error:
        raise ValueError(
            f"prompt file {path} is not a readable Parquet file ({error}); {_REGENERATE_HINT}, "
            "or use a .txt file with one prompt per line"
        ) from error
    if "prompt" not in table.column_names:
        raise ValueError(
            f"prompt file {path} has no 'prompt' column (columns: {table.column_names}); "
            f"add a string column named 'prompt' or {_REGENERATE_HINT}"
        )
    extra = {
        name: table.column(name).to_pylist() for name in ("category", "seed") if name in table.column_names
    }
    return table.column("prompt").to_pylist(), extra


def _to_record(
    path: Path, row: int, prompt: object, extra: dict[str, list[object]], validate_world: bool
) -> PromptRecord:
    where = f"prompt file {path} row {row}"
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: prompt is {prompt!r}; every row needs a non-empty string prompt")
    seed_value = extra["seed"][row] if "seed" in extra else row
    if not isinstance(seed_value, int):
        raise ValueError(f"{where}: seed is {seed_value!r}; the seed column must hold integers")
    declared = extra["category"][row] if "category" in extra else None
    if not validate_world:
        return PromptRecord(prompt=prompt, category=str(declared or GENERIC_CATEGORY), seed=seed_value)
    try:
        parsed = parse_caption(prompt)
    except ValueError as error:
        raise ValueError(
            f"{where}: {error}. Fix or remove this prompt, or pass validate_world=False for non-world prompts"
        ) from error
    if declared is not None and declared != parsed.category:
        raise ValueError(
            f"{where}: category column says {declared!r} but the prompt {prompt!r} reads as "
            f"{parsed.category!r}; fix the category or {_REGENERATE_HINT}"
        )
    return PromptRecord(prompt, parsed.category, seed_value, parsed.objects, parsed.relation)


def read_prompts(path: str | os.PathLike[str], validate_world: bool = True) -> list[PromptRecord]:
    """Load and validate a prompt file: Parquet, or ``.txt`` with one prompt per line (blank lines skipped).

    With ``validate_world`` every prompt must parse as a miniature-world caption (and agree with a
    ``category`` column if present); without it prompts are taken as generic text. Text files get
    the line's index among non-blank lines as seed. Raises ``FileNotFoundError`` for a missing file
    and ``ValueError`` naming the file (and row) for empty, corrupt or invalid content.
    """
    source = Path(path)
    if not source.exists():
        raise FileNotFoundError(f"prompt file {source} does not exist; {_REGENERATE_HINT} or fix the path")
    if not source.is_file():
        raise ValueError(f"prompt file {source} is not a regular file")
    if source.stat().st_size == 0:
        raise ValueError(f"prompt file {source} is empty (0 bytes); {_REGENERATE_HINT}")
    is_text = source.suffix.lower() == ".txt"
    prompts, extra = _read_text_prompts(source) if is_text else _read_parquet_prompts(source)
    if not prompts:
        raise ValueError(f"prompt file {source} contains no prompts; add at least one or {_REGENERATE_HINT}")
    return [_to_record(source, row, prompt, extra, validate_world) for row, prompt in enumerate(prompts)]


def regenerate_scene(record: PromptRecord) -> Scene:
    """The ground-truth scene of a world prompt row, rebuilt from its seed and category.

    Raises ``ValueError`` when the regenerated caption differs from the record's prompt, which means
    the file came from a different version of the scene sampler.
    """
    if record.category not in CATEGORIES:
        raise ValueError(f"record {record.prompt!r} has category {record.category!r}, not a world category")
    scene = sample_scene(np.random.default_rng(record.seed), record.category)
    if scene.caption != record.prompt:
        raise ValueError(
            f"seed {record.seed} regenerates {scene.caption!r}, not {record.prompt!r}; the prompt file "
            f"was built by a different scene sampler; {_REGENERATE_HINT}"
        )
    return scene


def make_prompt_files(
    out_dir: str | os.PathLike[str],
    seed: int = 0,
    n_train: int = DEFAULT_N_TRAIN,
    n_eval: int = DEFAULT_N_EVAL,
    n_validation: int = DEFAULT_N_VALIDATION,
) -> tuple[Path, Path, Path]:
    """Write ``train.parquet``, ``eval.parquet`` (the test split) and ``validation.parquet`` into
    ``out_dir``; returns their paths.

    Every table is built completely before any file is written, and each write is atomic.
    """
    train, evaluation = build_prompt_sets(seed, n_train, n_eval)
    validation = build_validation_set(seed, n_validation, evaluation)
    directory = Path(out_dir)
    train_path = write_prompts(train, directory / "train.parquet")
    eval_path = write_prompts(evaluation, directory / "eval.parquet")
    validation_path = write_prompts(validation, directory / "validation.parquet")
    return train_path, eval_path, validation_path


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m leapalign.world.prompts --out-dir DIR [--seed S --n-train N --n-eval M]``."""
    parser = argparse.ArgumentParser(description="Write miniature-world train/eval/validation prompt files.")
    parser.add_argument("--out-dir", required=True, help="directory for train/eval/validation .parquet")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=DEFAULT_N_TRAIN)
    parser.add_argument("--n-eval", type=int, default=DEFAULT_N_EVAL)
    parser.add_argument("--n-validation", type=int, default=DEFAULT_N_VALIDATION)
    args = parser.parse_args(argv)
    for written in make_prompt_files(args.out_dir, args.seed, args.n_train, args.n_eval, args.n_validation):
        print(written)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
