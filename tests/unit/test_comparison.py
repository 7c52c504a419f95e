"""The comparison report on hand-made run folders: per-seed values and counts, intervals and verdicts that
match values computed by hand, failed runs and NaN cells named, compute-to-target per seed; and compare
specs whose overrides (the spec's and the command line's) reach every run, file-based or inline."""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from leapalign.comparison import collect_runs, summarise, write_report
from leapalign.config import ConfigError
from leapalign.experiments import load_compare_spec
from tests.conftest import REPO

CATEGORIES = ["colors", "counting", "position"]


def make_run(folder, per_category: dict[str, float], curve: list[tuple[float, float]], clipped=(0.0, 1.0)):
    """A run folder as training writes it: metrics.jsonl (an evaluation at each curve point, updates in
    between) and the last evaluation's per-image table (4 prompts per category, each scoring the category's
    value: prompt resampling then changes nothing and the bootstrap is over seeds alone)."""
    folder.mkdir(parents=True)
    records, step = [], 0
    for i, (flops, value) in enumerate(curve):
        if i:
            for flag in clipped:
                step += 1
                records.append({"step": step, "loss": 1.0, "grad_norm": 2.0, "optim/clipped": flag,
                                "compute/flops_total": flops, "compute/nfe_total": flops / 1e9})  # fmt: skip
        records.append({"step": step, "eval/overall": value, "compute/flops_total": flops,
                        "compute/nfe_total": flops / 1e9, "time/wall_s": 10.0 * step})  # fmt: skip
    final = records[-1]
    final.update({f"eval/{c}": v for c, v in per_category.items()})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    rows = [(c, per_category[c]) for c in CATEGORIES for _ in range(4)]
    table = {"index": list(range(12)), "prompt": [f"p{i}" for i in range(12)], "category": [c for c, _ in rows],
             "correct": [v for _, v in rows]}  # fmt: skip
    (folder / "heldout").mkdir()
    pq.write_table(pa.table(table), folder / "heldout" / f"step_{final['step']:06d}.parquet")


def flat(value):
    return dict.fromkeys(CATEGORIES, value)


def test_report_on_hand_made_runs(tmp_path):
    # LeapAlign seeds 0.8 / 0.9, ReFL 0.1 / 0.2 (separated), GRPO 0.0 / 1.0 vs LeapAlign... and a third seed
    # of each: ReFL's failed, GRPO's NaN. Base 0.0 at compute 0.
    entries = []
    specs = {
        ("LeapAlign", 0): (flat(0.8), [(0, 0.0), (1e12, 0.5), (2e12, 0.8)]),
        ("LeapAlign", 1): (flat(0.9), [(0, 0.0), (1e12, 0.6), (2e12, 0.9)]),
        ("ReFL", 0): (flat(0.1), [(0, 0.0), (2e12, 0.1)]),
        ("ReFL", 1): (flat(0.2), [(0, 0.0), (2e12, 0.2)]),
        ("GRPO", 0): (flat(0.0), [(0, 0.0), (2e12, 0.0)]),
        ("GRPO", 1): (flat(1.0), [(0, 0.0), (2e12, 1.0)]),
    }
    for (label, seed), (categories, curve) in specs.items():
        folder = tmp_path / f"{label}-{seed}"
        make_run(folder, categories, curve)
        entries.append((label, seed, folder, None))
    entries.append(("ReFL", 2, tmp_path / "never", "RayTaskError: worker died"))
    nan_run = tmp_path / "GRPO-2"
    make_run(nan_run, flat(0.5), [(0, 0.0), (2e12, float("nan"))])
    entries.append(("GRPO", 2, nan_run, None))

    runs = collect_runs(entries, "eval/overall")
    summary = summarise(runs, "eval/overall", reference="LeapAlign", unit="flops", n_resamples=4000)
    rows = {row.label: row for row in summary.rows}
    assert rows["LeapAlign"].per_seed == {0: 0.8, 1: 0.9}, "per-seed values"
    assert sorted(rows["ReFL"].per_seed) == [0, 1] and sorted(rows["GRPO"].per_seed) == [0, 1], (
        "the failed run and the NaN cell are not counted as seeds"
    )
    assert any("ReFL seed 2" in f and "worker died" in f for f in rows["ReFL"].failed), rows["ReFL"].failed
    assert any("GRPO seed 2" in f for f in rows["GRPO"].failed), rows["GRPO"].failed
    refl, grpo = rows["ReFL"].difference, rows["GRPO"].difference
    # By hand (tests/unit/test_stats.py): ReFL - LeapAlign in [-0.8, -0.6], mean -0.7, p = 1/4001.
    assert refl.mean == pytest.approx(-0.7) and (refl.low, refl.high) == pytest.approx((-0.8, -0.6)), (
        f"{refl}"
    )
    # GRPO seeds {0, 1} vs LeapAlign {0.8, 0.9}: GRPO's mean is 0, 0.5 or 1 (1/4, 1/2, 1/4), LeapAlign's 0.8,
    # 0.85 or 0.9: the difference spans [-0.9, 0.2] and P(d <= 0) = 3/4, P(d >= 0) = 1/4: p = 1/2.
    assert grpo.mean == pytest.approx(-0.35) and (grpo.low, grpo.high) == pytest.approx((-0.9, 0.2)), (
        f"{grpo}"
    )
    assert grpo.p_value == pytest.approx(0.5, abs=0.03), f"GRPO p {grpo.p_value}"
    # Holm over two rows: ReFL 2/4001 -> worse; GRPO min(1, max(2/4001, 1 x 0.5)) -> not separated.
    assert (refl.verdict, grpo.verdict) == ("worse", "not separated"), (refl.verdict, grpo.verdict)
    assert grpo.p_holm == pytest.approx(grpo.p_value) and refl.p_holm == pytest.approx(2 / 4001)
    assert rows["ReFL"].difference.prob_improvement == 0.0 and grpo.prob_improvement == pytest.approx(0.5)
    # Target: base 0 + 50% of the best mean gain (LeapAlign 0.85) = 0.425; LeapAlign's seeds cross at their
    # first evaluation above it (1e12 both); ReFL never; GRPO's seed 1 at 2e12, seed 0 never.
    assert summary.target == pytest.approx(0.425)
    assert rows["LeapAlign"].crossing.per_seed == [1e12, 1e12]
    assert rows["ReFL"].crossing.reached == 0 and rows["GRPO"].crossing.per_seed == [math.inf, 2e12]
    assert rows["LeapAlign"].diagnostics["clip_rate"] == pytest.approx(0.5), "clip rate over the updates"

    report = write_report(summary, runs, tmp_path / "report", title="hand-made", budget="2 TFLOPs per run.")
    text = report.read_text()
    for fragment in ("| LeapAlign | 85.0 ± 7.1 (2) | s0 80.0, s1 90.0 |", "-70.0 [-80.0, -60.0]", "worse",
                     "not separated", "ReFL seed 2: RayTaskError: worker died", "GRPO seed 2", "1.00 T"):  # fmt: skip
        assert fragment in text, f"report lacks {fragment!r}:\n{text}"
    assert (tmp_path / "report" / "curves.png").stat().st_size > 1000, "the curves"
    assert json.loads((tmp_path / "report" / "summary.json").read_text())["reference"] == "LeapAlign"


def test_compute_target_lives_on_the_curves_prompts(tmp_path):
    """Curves are scored on fewer prompts than the final evaluation: the target is the base model's first
    curve point plus half the best method's gain on the curves (last points), not its final score."""
    entries = []
    for label, categories, curve in (
        ("A", flat(0.9), [(0, 0.1), (1e12, 0.5)]),
        ("B", flat(0.2), [(0, 0.1), (1e12, 0.35)]),
    ):
        make_run(tmp_path / label, categories, curve)
        entries.append((label, 0, tmp_path / label, None))
    summary = summarise(collect_runs(entries, "eval/overall"), "eval/overall", reference="A", n_resamples=200)
    assert summary.base == pytest.approx(0.1) and summary.target == pytest.approx(0.3), (
        f"0.1 + (0.5 - 0.1) / 2 = 0.3 on the curves (the final 0.9 would give 0.5): {summary.target}"
    )
    assert {row.label: row.crossing.per_seed for row in summary.rows} == {"A": [1e12], "B": [1e12]}


def test_compare_overrides_reach_every_run(tiny_flux_dir, tmp_path):
    own = tmp_path / "method.yaml"
    own.write_text(yaml.safe_dump({"base": str(REPO / "experiments" / "tiny_demo.yaml"),
                                   "method": {"name": "refl"}, "eval": {"every_nfe": 5000}}))  # fmt: skip
    spec = {
        "name": "overrides",
        "base": str(REPO / "experiments" / "tiny_demo.yaml"),
        "overrides": {
            "model.path": str(tiny_flux_dir),
            "eval.prompts": "assets/prompts/world/eval.parquet",
            "eval.every_nfe": 200,
            "train.iterations": 500,
            "eval.every_num_prompts": 7,
        },  # fmt: skip
        "budget_nfe": 2000,
        "seeds": [3, 4],
        "runs": {"file": str(own), "inline": {"method.name": "drtune"}},
    }
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(spec))
    loaded = load_compare_spec(path, config_overrides=["eval.every_num_prompts=33", "optim.lr=0.002"])
    for label in ("file", "inline"):
        for seed in (3, 4):
            cfg = loaded.run_config(label, seed)
            assert cfg.eval.every_nfe == 200, f"{label}: the spec's override beats the method file's 5000"
            assert cfg.eval.every_num_prompts == 33 and cfg.optim.lr == 0.002, f"{label}: the command line's"
            assert cfg.train.seed == seed and cfg.train.max_nfe == 2000, f"{label}: seed and budget"
    assert loaded.run_config("file", 3).method.name == "refl", "the file's own settings stay"
    spec["overrides"]["eval.every_nfe"] = 2500  # coarser than every 2k NFE and than 10 points per run
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="too coarse for compute-to-target"):
        load_compare_spec(path)
