"""`leapalign seeds`: held-out accuracy over seeds of one config, checked against values computed by hand."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from leapalign.reports import format_seed_summary, seed_summary
from tests.conftest import REPO, leapalign_main

AFTER = [0.30, 0.20, 0.25, 0.35, 0.40]  # overall, per seed


def write_runs(tmp_path, after=AFTER):
    dirs = []
    for seed, overall in enumerate(after):
        run = tmp_path / f"seed{seed}"
        run.mkdir()
        stage = lambda o: {"overall": o, "image_accuracy": o, "per_category": {"colors": 2 * o}, "n": 600}  # noqa: E731
        (run / "eval.json").write_text(json.dumps({"before": stage(0.15), "after": stage(overall)}))
        dirs.append(run)
    return dirs


def test_mean_interval_and_range_by_hand(tmp_path):
    summary = seed_summary(write_runs(tmp_path))
    row = summary["rows"]["overall"]
    assert row["mean"] == pytest.approx(0.30) and row["before"] == [0.15], f"{row}"
    assert (row["min"], row["max"]) == (0.20, 0.40), f"range {row}"
    # The percentile bootstrap of a mean of five values lies inside their range and around the mean; the
    # interval of the exact resampling distribution (all 5^5 draws) is matched to within resampling noise.
    draws = np.array(np.meshgrid(*[AFTER] * 5)).reshape(5, -1).mean(axis=0)
    low, high = np.percentile(draws, [2.5, 97.5])
    assert row["low"] == pytest.approx(low, abs=0.006) and row["high"] == pytest.approx(high, abs=0.006), (
        f"bootstrap interval [{row['low']}, {row['high']}] vs exact [{low}, {high}]"
    )
    assert summary["rows"]["colors"]["mean"] == pytest.approx(0.60), "per category too"
    text = format_seed_summary(summary)
    assert "overall" in text and "30.0" in text and "20.0-40.0" in text, text


def test_identical_seeds_give_a_point_interval(tmp_path):
    row = seed_summary(write_runs(tmp_path, [0.3, 0.3, 0.3]))["rows"]["overall"]
    assert row["low"] == row["high"] == 0.3, f"no spread, no interval width: {row}"


@pytest.mark.parametrize("case", ["missing", "corrupt", "nan", "one"])
def test_bad_run_folders_fail_clearly(tmp_path, case):
    dirs = write_runs(tmp_path)
    if case == "missing":
        (dirs[2] / "eval.json").unlink()
    elif case == "corrupt":
        (dirs[2] / "eval.json").write_text("{not json")
    elif case == "nan":
        data = json.loads((dirs[2] / "eval.json").read_text())
        data["after"]["overall"] = float("nan")
        (dirs[2] / "eval.json").write_text(json.dumps(data))
    elif case == "one":
        dirs = dirs[:1]
    code, stderr = leapalign_main("seeds", *map(str, dirs), "--json", str(tmp_path / "s.json"))
    expected = {"missing": "eval.json is missing", "corrupt": "is not a run's eval.json",
                "nan": "non-finite score", "one": "at least two run folders"}[case]  # fmt: skip
    assert code == 2 and expected in stderr, f"{case}: rc {code}, {stderr[-500:]}"
    assert not (tmp_path / "s.json").exists(), "nothing written on bad input"


def test_cli_prints_and_writes_the_summary(tmp_path):
    out = tmp_path / "summary.json"
    proc = subprocess.run(
        [sys.executable, "-m", "leapalign", "seeds", *map(str, write_runs(tmp_path)), "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-1000:]
    assert "over 5 seeds" in proc.stdout, proc.stdout
    assert json.loads(out.read_text())["rows"]["overall"]["mean"] == pytest.approx(0.30), "JSON written"
