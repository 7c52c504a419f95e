"""Reports of many-run experiments, from the runs' own folders (metrics.jsonl, config.yaml, weights).

`sweep_report`: a Parquet table of the trials, the metric against each swept hyperparameter, the curves
of all trials, and the best trial's config as a YAML file to train again. The comparison's report, with
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
    import pyarrow as pa
    import pyarrow.parquet as pq

    out_dir.mkdir(parents=True, exist_ok=True)
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
    columns = {key: [row[key] for row in rows] for key in rows[0]} if rows else {}
    for key in swept:  # parquet columns need one type: a conditional key is missing in some trials
        if any(isinstance(v, str) for v in columns.get(key, [])):
            columns[key] = [None if v is None else str(v) for v in columns[key]]
    with atomic_path(out_dir / "results.parquet") as tmp:
        pq.write_table(pa.table(columns), tmp)

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
    finished = [row for row in rows if math.isfinite(row[final_key])]
    if not finished:
        return None
    # The best trial by its final value among those that ran to the end (ASHA stops the others early).
    complete = [row for row in finished if not row["stopped_early"]] or finished
    return (max if mode == "max" else min)(complete, key=lambda row: row[final_key])
