"""Prompt sets (held-out split, balance, determinism) and validated, atomic prompt-file I/O."""

from __future__ import annotations

import collections
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from leapalign.data import prompt_split
from leapalign.world import prompts
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
from leapalign.world.scenes import CATEGORIES, COLORS, SHAPES, parse_caption


@pytest.fixture(scope="module")
def prompt_sets() -> tuple[pa.Table, pa.Table]:
    return build_prompt_sets(seed=0, n_train=600, n_eval=120)


def _pairs(prompt: str) -> set[tuple[str, str]]:
    return set(parse_caption(prompt).pairs)


def test_no_train_prompt_mentions_a_held_out_pair(prompt_sets):
    train, _ = prompt_sets
    held_out = set(HELD_OUT_PAIRS)
    leaks = [p for p in train.column("prompt").to_pylist() if _pairs(p) & held_out]
    assert not leaks, f"{len(leaks)} train prompts use held-out pairs, e.g. {leaks[:3]}"


def test_every_eval_prompt_mentions_a_held_out_pair(prompt_sets):
    _, evaluation = prompt_sets
    held_out = set(HELD_OUT_PAIRS)
    missing = [p for p in evaluation.column("prompt").to_pylist() if not _pairs(p) & held_out]
    assert not missing, f"{len(missing)} eval prompts lack a held-out pair, e.g. {missing[:3]}"


def test_held_out_attributes_still_occur_in_training(prompt_sets):
    train, _ = prompt_sets
    seen = set().union(*(_pairs(p) for p in train.column("prompt").to_pylist()))
    for color, shape in HELD_OUT_PAIRS:
        assert any(c == color for c, _ in seen), (
            f"colour {color!r} never trained, so the split tests vocabulary"
        )
        assert any(s == shape for _, s in seen), f"shape {shape!r} never trained"
    expected = {(c, s) for c in COLORS for s in SHAPES} - set(HELD_OUT_PAIRS)
    assert seen == expected, (
        f"train should cover all {len(expected)} allowed pairs, missing {expected - seen}"
    )


@pytest.mark.parametrize("n_rows", [7, 13, 120])
def test_categories_are_balanced(n_rows):
    for table in build_prompt_sets(seed=1, n_train=n_rows, n_eval=n_rows):
        counts = collections.Counter(table.column("category").to_pylist())
        spread = max(counts.values()) - min(counts[c] for c in CATEGORIES)
        assert table.num_rows == n_rows, f"asked for {n_rows} rows, got {table.num_rows}"
        assert spread <= 1, f"category counts {dict(counts)} differ by {spread} (> 1)"


def test_table_columns_are_consistent(prompt_sets):
    for table in prompt_sets:
        assert table.schema.names == ["prompt", "category", "seed", "objects", "relation"], table.schema.names
        assert table.schema.field("seed").type == pa.int64(), "seed must be int64"
        for row in table.slice(0, 60).to_pylist():
            parsed = parse_caption(row["prompt"])
            objects = [(o["color"], o["shape"], o["count"]) for o in json.loads(row["objects"])]
            assert objects == [(o.color, o.shape, o.count) for o in parsed.objects], (
                f"objects column wrong: {row}"
            )
            assert row["category"] == parsed.category, f"category column wrong: {row}"
            assert row["relation"] == parsed.relation, f"relation column wrong: {row}"


def test_prompt_sets_are_deterministic(prompt_sets):
    again = build_prompt_sets(seed=0, n_train=600, n_eval=120)
    for first, second in zip(prompt_sets, again, strict=True):
        assert first.equals(second, check_metadata=True), "the same seed must give identical tables"
    other, _ = build_prompt_sets(seed=1, n_train=600, n_eval=120)
    assert not other.equals(prompt_sets[0]), "a different seed should give a different train table"


def test_row_seed_regenerates_the_ground_truth_scene(prompt_sets, tmp_path):
    path = write_prompts(prompt_sets[1], tmp_path / "eval.parquet")
    for record in read_prompts(path)[:30]:
        scene = regenerate_scene(record)
        assert scene.caption == record.prompt, f"seed {record.seed} regenerated {scene.caption!r}"
    tampered = PromptRecord("a red circle", "single_object", 12345)
    with pytest.raises(ValueError, match="different scene sampler"):
        regenerate_scene(tampered)


def test_write_then_read_round_trips(prompt_sets, tmp_path):
    path = write_prompts(prompt_sets[0], tmp_path / "nested" / "train.parquet")
    records = read_prompts(path)
    table = prompt_sets[0]
    assert [r.prompt for r in records] == table.column("prompt").to_pylist(), "prompts changed on disk"
    assert [r.seed for r in records] == table.column("seed").to_pylist(), "seeds changed on disk"
    assert [r.category for r in records] == table.column("category").to_pylist(), "categories changed on disk"
    assert os.listdir(path.parent) == ["train.parquet"], f"temp files left behind: {os.listdir(path.parent)}"


def test_make_prompt_files_and_cli(tmp_path):
    train_path, eval_path, validation_path = make_prompt_files(
        tmp_path, seed=3, n_train=24, n_eval=12, n_validation=18
    )
    assert sorted(os.listdir(tmp_path)) == ["eval.parquet", "train.parquet", "validation.parquet"], (
        os.listdir(tmp_path)
    )
    assert len(read_prompts(train_path)) == 24 and len(read_prompts(eval_path)) == 12, "wrong row counts"
    validation = read_prompts(validation_path)
    assert len(validation) == 18 and all(mentions_held_out(parse_caption(r.prompt)) for r in validation), (
        "validation prompts test the same compositions as the test split"
    )
    assert [prompt_split(p) for p in (train_path, eval_path, validation_path)] == [
        "train",
        "eval",
        "validation",
    ]
    test_captions = {r.prompt for r in read_prompts(eval_path)}
    shared = {r.category for r in validation if r.prompt in test_captions}
    assert shared <= {"single_object", "colors", "counting"}, (
        f"only categories with a handful of held-out captions may repeat a test caption: {shared}"
    )
    assert (
        prompts.main(
            ["--out-dir", str(tmp_path / "cli"), "--n-train", "6", "--n-eval", "6", "--n-validation", "6"]
        )
        == 0
    ), "CLI failed"
    assert len(read_prompts(tmp_path / "cli" / "eval.parquet")) == 6, "CLI eval file has the wrong size"


def test_the_shipped_validation_split_is_the_generators():
    from leapalign.data import PACKAGE_DIR

    folder = PACKAGE_DIR / "assets" / "prompts" / "world"
    train, evaluation = prompts.build_prompt_sets(0, prompts.DEFAULT_N_TRAIN, prompts.DEFAULT_N_EVAL)
    assert (
        evaluation.column("prompt").to_pylist()
        == pq.read_table(folder / "eval.parquet").column("prompt").to_pylist()
    )
    # Rows are drawn one after another from one stream: the first 60 of the 600 are the 60-row build's. (All
    # 600 take about 12 s: a single held-out object has 4 captions, so its rows exhaust their draws.)
    shipped = pq.read_table(folder / "validation.parquet")
    assert shipped.num_rows == prompts.DEFAULT_N_VALIDATION, f"shipped validation rows: {shipped.num_rows}"
    validation = prompts.build_validation_set(0, 60, evaluation)
    assert validation.column("seed").to_pylist() == shipped.column("seed").to_pylist()[:60], (
        "regenerated = shipped"
    )


def _write_raw(path, columns: dict[str, list]) -> None:
    pq.write_table(pa.table(columns), path)


def test_unknown_word_in_prompt_file_names_word_and_row(tmp_path):
    path = tmp_path / "bad.parquet"
    _write_raw(path, {"prompt": ["a red circle", "a purple circle"]})
    with pytest.raises(ValueError) as raised:
        read_prompts(path)
    message = str(raised.value)
    for fragment in ("'purple'", "row 1", str(path), "allowed colors", "validate_world=False"):
        assert fragment in message, f"error should mention {fragment!r}: {message}"
    _write_raw(path, {"prompt": ["two red hexagons"]})
    with pytest.raises(ValueError, match="'hexagons'.*allowed shapes"):
        read_prompts(path)


def test_missing_empty_and_corrupt_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_prompts(tmp_path / "absent.parquet")
    empty = tmp_path / "empty.parquet"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty \(0 bytes\)"):
        read_prompts(empty)
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(np.random.default_rng(0).bytes(2048))
    with pytest.raises(ValueError, match="not a readable Parquet file"):
        read_prompts(corrupt)
    with pytest.raises(ValueError, match="not a regular file"):
        read_prompts(tmp_path)


def test_invalid_parquet_contents_give_clear_errors(tmp_path):
    path = tmp_path / "p.parquet"
    _write_raw(path, {"text": ["a red circle"]})
    with pytest.raises(ValueError, match="no 'prompt' column"):
        read_prompts(path)
    pq.write_table(pa.table({"prompt": pa.array([], type=pa.string())}), path)
    with pytest.raises(ValueError, match="contains no prompts"):
        read_prompts(path)
    _write_raw(path, {"prompt": ["a red circle", None]})
    with pytest.raises(ValueError, match="row 1: prompt is None"):
        read_prompts(path)
    _write_raw(path, {"prompt": ["a red circle"], "category": ["counting"]})
    with pytest.raises(ValueError, match="category column says 'counting'"):
        read_prompts(path)


def test_text_prompt_files(tmp_path):
    generic = tmp_path / "generic.txt"
    generic.write_text("a photo of a cat\n\n   \nan astronaut riding a horse\n", encoding="utf-8")
    records = read_prompts(generic, validate_world=False)
    assert [r.prompt for r in records] == ["a photo of a cat", "an astronaut riding a horse"], records
    assert [r.category for r in records] == ["generic", "generic"], "non-world prompts are 'generic'"
    assert [r.seed for r in records] == [0, 1], "text prompts are seeded by their index"
    with pytest.raises(ValueError, match="row 0: .*validate_world=False"):
        read_prompts(generic)
    world = tmp_path / "world.txt"
    world.write_text("a red circle\nthree blue squares\n", encoding="utf-8")
    assert [r.category for r in read_prompts(world)] == ["single_object", "counting"], "world .txt misread"
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="contains no prompts"):
        read_prompts(blank, validate_world=False)


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(prompt_sets, tmp_path, monkeypatch):
    path = write_prompts(prompt_sets[1], tmp_path / "eval.parquet")
    before = path.read_bytes()

    def write_half_then_fail(table, where, **kwargs):
        with open(where, "wb") as handle:
            handle.write(b"PAR1 half written")
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        write_prompts(prompt_sets[0], path)
    monkeypatch.undo()
    assert path.read_bytes() == before, "a failed write must leave the previous file untouched"
    assert os.listdir(tmp_path) == ["eval.parquet"], f"temp files left behind: {os.listdir(tmp_path)}"
    with pytest.raises(ValueError, match="no 'prompt' column"):
        write_prompts(pa.table({"text": ["x"]}), path)
    with pytest.raises(ValueError, match="zero rows"):
        write_prompts(prompt_sets[0].slice(0, 0), path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["eval.parquet"], (
        "rejected writes touched disk"
    )


def test_held_out_pairs_are_validated():
    with pytest.raises(ValueError, match="outside the vocabulary"):
        build_prompt_sets(0, 6, 6, held_out_pairs=[("purple", "circle")])
    with pytest.raises(ValueError, match="hold out between"):
        build_prompt_sets(0, 6, 6, held_out_pairs=[])
    with pytest.raises(ValueError, match=">= 1"):
        build_prompt_sets(0, 0, 6)
    custom = [("cyan", "square")]
    train, evaluation = build_prompt_sets(0, 30, 30, held_out_pairs=custom)
    assert all(
        mentions_held_out(parse_caption(p), custom) for p in evaluation.column("prompt").to_pylist()
    ), "custom held-out pairs must drive the eval split"
    assert not any(mentions_held_out(parse_caption(p), custom) for p in train.column("prompt").to_pylist()), (
        "custom held-out pairs leaked into training"
    )
