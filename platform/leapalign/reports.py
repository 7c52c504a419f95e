"""Reports of many-run experiments, from the runs' own folders (metrics.jsonl, config.yaml, weights).

`sweep_report`: a Parquet table of the trials, the metric against each swept hyperparameter, the curves
of all trials, and the best trial (its config is written by the sweep driver to train again), in steps:
`summarise_trials`, `write_trials_table`, `plot_sweep`, `best_trial`. `seed_summary`: held-out accuracy
over several seeds of one config. The comparison's report, with
its statistics, is leapalign.comparison. Plain Python (no Ray): the Tune driver hands over where the runs are.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from leapalign.io import atomic_path


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
    _plt().close(fig)
    return path


# ----------------------------------------------------------------------------- sweep


def sweep_report(
    trials: list[dict[str, Any]],
    swept: list[str],
    metric: str,
    mode: str,
    out_dir: Path,
    *,
    iterations: int,
) -> dict[str, Any] | None:
    """results.parquet, metric_vs_<key>.png per swept key, curves.png; returns the best trial's row.

    trials: one dict per trial with "trial_id", "status", "run_dir", "params" (the applied overrides).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, curves = summarise_trials(trials, swept, metric, mode, iterations=iterations)
    write_trials_table(rows, swept, out_dir / "results.parquet")
    plot_sweep(rows, curves, swept, metric, out_dir)
    return best_trial(rows, metric, mode)


def summarise_trials(
    trials: list[dict[str, Any]], swept: list[str], metric: str, mode: str, *, iterations: int
) -> tuple[list[dict[str, Any]], dict[str, list[tuple[int, float]]]]:
    """One row per trial (steps run, stopped early, final and best value, its swept values) and each
    trial's curve [(step, value)], from its run folder's metrics.jsonl."""
    rows = []
    curves = {}
    for trial in trials:
        records = read_metrics(Path(trial["run_dir"]))
        curve = [(int(r["step"]), float(r[metric])) for r in records if metric in r]
        curves[trial["trial_id"]] = curve
        last_step = max((int(r["step"]) for r in records), default=0)
        values = [v for _, v in curve]
        best = (max if mode == "max" else min)(values) if values else float("nan")
        row = {
            "trial_id": trial["trial_id"],
            "status": trial["status"],
            "steps": last_step,
            "stopped_early": last_step < iterations,
            f"final/{metric}": values[-1] if values else float("nan"),
            f"best/{metric}": best,
        }
        row.update({key: trial["params"].get(key) for key in swept})
        rows.append(row)
    return rows, curves


def write_trials_table(rows: list[dict[str, Any]], swept: list[str], path: Path) -> Path:
    """The trials' rows as a Parquet table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {key: [row[key] for row in rows] for key in rows[0]} if rows else {}
    for key in swept:  # parquet columns need one type: a conditional key is missing in some trials
        if any(isinstance(v, str) for v in columns.get(key, [])):
            columns[key] = [None if v is None else str(v) for v in columns[key]]
    with atomic_path(path) as tmp:
        pq.write_table(pa.table(columns), tmp)
    return path


def plot_sweep(
    rows: list[dict[str, Any]],
    curves: dict[str, list[tuple[int, float]]],
    swept: list[str],
    metric: str,
    out_dir: Path,
) -> None:
    """metric_vs_<key>.png (final value against each swept key) and curves.png (every trial's curve)."""
    plt = _plt()
    final_key = f"final/{metric}"
    for key in swept:
        points = [
            (row[key], row[final_key])
            for row in rows
            if row[key] is not None and math.isfinite(row[final_key])
        ]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.5))
        if all(isinstance(x, int | float) and not isinstance(x, bool) for x, _ in points):
            ax.scatter([x for x, _ in points], [y for _, y in points])
            if key.endswith("lr"):
                ax.set_xscale("log")
        else:
            names = sorted({str(x) for x, _ in points})
            ax.scatter([names.index(str(x)) for x, _ in points], [y for _, y in points])
            ax.set_xticks(range(len(names)), names, rotation=20)
        ax.set_xlabel(key)
        ax.set_ylabel(f"final {metric}")
        ax.grid(alpha=0.3)
        save_figure(fig, out_dir / f"metric_vs_{key.replace('.', '_')}.png")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for trial_id, curve in curves.items():
        if curve:
            ax.plot([s for s, _ in curve], [v for _, v in curve], marker=".", label=trial_id)
    ax.set_xlabel("update")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    if len(curves) <= 12:
        ax.legend(fontsize=7)
    save_figure(fig, out_dir / "curves.png")


def best_trial(rows: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    """The best trial by its final value among those that ran to the end (ASHA stops the others early)."""
    final_key = f"final/{metric}"
    finished = [row for row in rows if math.isfinite(row[final_key])]
    if not finished:
        return None
    complete = [row for row in finished if not row["stopped_early"]] or finished
    return (max if mode == "max" else min)(complete, key=lambda row: row[final_key])


# ----------------------------------------------------------------------------- seeds of one config


def seed_summary(run_dirs: list[Path], *, n_resamples: int = 10_000) -> dict[str, Any]:
    """Held-out accuracy of several seeds of one training config (each run folder's eval.json).

    Per category and overall: the base model's score (the same for every seed: fixed evaluation noise),
    every seed's aligned score, their mean with a 95% percentile bootstrap interval over the seeds
    (`scipy.stats.bootstrap`) and the range a single run lands in. Scores are fractions (0..1).
    """
    import numpy as np
    from scipy.stats import bootstrap

    if len(run_dirs) < 2:
        raise ValueError(f"a summary over seeds needs at least two run folders, got {len(run_dirs)}")
    results = []
    for run_dir in run_dirs:
        path = Path(run_dir) / "eval.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run the config with eval.prompts set to completion")
        try:
            data = json.loads(path.read_text())
            results.append({stage: {"overall": data[stage]["overall"], **data[stage]["per_category"]}
                            for stage in ("before", "after")})  # fmt: skip
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path} is not a run's eval.json ({err!r})") from err
    keys = [k for k in results[0]["after"] if k != "overall"] + ["overall"]
    for run_dir, result in zip(run_dirs, results, strict=True):
        if sorted(result["after"]) != sorted(keys):
            raise ValueError(f"{run_dir}: other categories than {run_dirs[0]} ({sorted(result['after'])})")
    rows = {}
    for key in keys:
        before = sorted({r["before"][key] for r in results})
        after = np.array([r["after"][key] for r in results], dtype=float)
        if not np.isfinite(after).all():
            raise ValueError(f"{key}: a non-finite score among the seeds: {after.tolist()}")
        if np.ptp(after) == 0:
            low = high = float(after[0])
        else:
            ci = bootstrap((after,), np.mean, n_resamples=n_resamples, confidence_level=0.95,
                           method="percentile", rng=np.random.default_rng(0)).confidence_interval  # fmt: skip
            low, high = float(ci.low), float(ci.high)
        rows[key] = {"before": before, "after": after.tolist(), "mean": float(after.mean()),
                     "low": low, "high": high, "min": float(after.min()), "max": float(after.max())}  # fmt: skip
    return {"seeds": len(run_dirs), "runs": [str(d) for d in run_dirs], "rows": rows}


def format_seed_summary(summary: dict[str, Any]) -> str:
    """The seed summary as a table in percent: base, mean after [95% CI], single runs' range, each seed."""
    head = ("category", "base", "after: mean", "95% CI", "range", "per seed")
    lines = [head]
    for key, row in summary["rows"].items():
        base = "/".join(f"{100 * b:.1f}" for b in row["before"])
        lines.append((key, base, f"{100 * row['mean']:.1f}", f"[{100 * row['low']:.1f}, {100 * row['high']:.1f}]",
                      f"{100 * row['min']:.1f}-{100 * row['max']:.1f}",
                      " ".join(f"{100 * v:.1f}" for v in row["after"])))  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
                     for line in lines)  # fmt: skip
    return f"held-out accuracy (%) over {summary['seeds']} seeds (bootstrap over seeds, scipy):\n{text}"
