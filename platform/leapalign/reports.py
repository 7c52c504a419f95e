"""Reports of many-run experiments, from the runs' own folders (metrics.jsonl, config.yaml, weights).

`compare_report`: a Markdown table (mean +- std over seeds, per category), the held-out score against
compute (matplotlib), an image grid of every method on the same held-out prompts and noise.
`sweep_report`: a Parquet table of the trials, the metric against each swept hyperparameter, the curves
of all trials, and the best trial's config as a YAML file to train again.
Plain Python (no Ray): the Tune driver hands over where the runs are.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leapalign.io import atomic_path


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def eval_curve(records: list[dict[str, Any]], metric: str) -> list[tuple[float, float, int, float]]:
    """(compute/nfe_total, metric, step, time/total_s) at every evaluation of a run, in order."""
    return [
        (
            float(r.get("compute/nfe_total", 0.0)),
            float(r[metric]),
            int(r["step"]),
            float(r.get("time/total_s", 0.0)),
        )
        for r in records
        if metric in r
    ]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def fmt(mean: float, std: float, scale: float = 1.0, digits: int = 1) -> str:
    if not math.isfinite(mean):
        return "-"
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


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


# ----------------------------------------------------------------------------- compare


@dataclass
class RunResult:
    label: str
    seed: int
    run_dir: Path
    curve: list[tuple[float, float, int, float]]  # (nfe_total, metric, step, time_total)
    final: dict[str, float]  # the last evaluation's metrics (eval/... keys)
    nfe: float  # compute used
    time_s: float
    steps: int


@dataclass
class CompareSummary:
    rows: list[dict[str, Any]] = field(default_factory=list)  # one per label
    reach: dict[str, dict[str, float]] = field(
        default_factory=dict
    )  # label -> {reference label: nfe fraction}


def collect_runs(entries: list[tuple[str, int, Path]], metric: str) -> list[RunResult]:
    runs = []
    for label, seed, run_dir in entries:
        records = read_metrics(run_dir)
        curve = eval_curve(records, metric)
        last_eval = next((r for r in reversed(records) if metric in r), {})
        last = records[-1] if records else {}
        runs.append(
            RunResult(
                label=label,
                seed=seed,
                run_dir=run_dir,
                curve=curve,
                final={k: float(v) for k, v in last_eval.items() if k.startswith("eval/")},
                nfe=float(last.get("compute/nfe_total", 0.0)),
                time_s=float(last.get("time/total_s", 0.0)),
                steps=int(last.get("step", 0)),
            )
        )
    return runs


def mean_curve(runs: list[RunResult], points: int = 50) -> tuple[list[float], list[float], list[float]]:
    """The seeds' curves interpolated onto a common compute grid: (nfe, mean, std)."""
    import numpy as np

    curves = [r.curve for r in runs if len(r.curve) >= 2]
    if not curves:
        return [], [], []
    end = min(c[-1][0] for c in curves)
    grid = np.linspace(0.0, end, points)
    values = np.stack([np.interp(grid, [p[0] for p in c], [p[1] for p in c]) for c in curves])
    return grid.tolist(), values.mean(axis=0).tolist(), values.std(axis=0).tolist()


def compute_to_reach(runs: list[RunResult], target: float) -> float:
    """Compute at which the seed-mean curve first reaches `target` (linear interpolation); inf if never."""
    grid, mean, _ = mean_curve(runs, points=400)
    for i, value in enumerate(mean):
        if value >= target:
            if i == 0:
                return grid[0]
            x0, x1, y0, y1 = grid[i - 1], grid[i], mean[i - 1], mean[i]
            return x0 + (target - y0) / (y1 - y0) * (x1 - x0) if y1 != y0 else x1
    return math.inf


def compare_report(
    runs: list[RunResult],
    metric: str,
    out_dir: Path,
    *,
    budget_nfe: int,
    title: str,
    references: Sequence[str] = (),
    grid_rows: list[tuple[str, Any]] | None = None,
    grid_prompts: list[str] | None = None,
) -> tuple[Path, CompareSummary]:
    """report.md, curves.png (metric vs compute), samples.png (rows: methods); returns the report's path.

    references: labels whose final score the others are measured against ("LeapAlign reaches GRPO's final
    score with x% of GRPO's compute").
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = list(dict.fromkeys(r.label for r in runs))
    by_label = {label: [r for r in runs if r.label == label] for label in labels}
    categories = sorted(
        {k.removeprefix("eval/") for r in runs for k in r.final} - {metric.removeprefix("eval/")}
    )
    categories = [c for c in categories if not c.startswith("reward/") and c != "image_accuracy"]
    summary = CompareSummary()
    for label in labels:
        group = by_label[label]
        row = {"label": label, "seeds": len(group)}
        row[metric] = mean_std([r.final.get(metric, float("nan")) for r in group])
        for cat in categories:
            row[cat] = mean_std([r.final.get(f"eval/{cat}", float("nan")) for r in group])
        for key in [k for k in group[0].final if k.startswith("eval/reward/")]:
            row[key] = mean_std([r.final.get(key, float("nan")) for r in group])
        start = [r.curve[0][1] for r in group if r.curve and r.curve[0][0] == 0.0]
        row["start"] = mean_std(start)
        row["nfe"] = mean_std([r.nfe for r in group])
        row["time_s"] = mean_std([r.time_s for r in group])
        row["steps"] = mean_std([float(r.steps) for r in group])
        summary.rows.append(row)
    for label in labels:
        for ref in references:
            if ref == label or ref not in by_label:
                continue
            target = mean_std([r.final.get(metric, float("nan")) for r in by_label[ref]])[0]
            ref_nfe = mean_std([r.nfe for r in by_label[ref]])[0]
            reached = compute_to_reach(by_label[label], target)
            summary.reach.setdefault(label, {})[ref] = reached / ref_nfe if ref_nfe else math.inf

    # The curves: every seed faint, the seed mean bold, at the same compute axis.
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, label in enumerate(labels):
        color = colors[i % len(colors)]
        for r in by_label[label]:
            ax.plot([p[0] for p in r.curve], [p[1] for p in r.curve], color=color, alpha=0.25, lw=1)
        grid, mean, std = mean_curve(by_label[label])
        if grid:
            ax.plot(grid, mean, color=color, lw=2, label=label)
            ax.fill_between(grid, [m - s for m, s in zip(mean, std, strict=True)],
                            [m + s for m, s in zip(mean, std, strict=True)], color=color, alpha=0.12)  # fmt: skip
    ax.set_xlabel("compute (image forward-equivalents of the transformer)")
    ax.set_ylabel(f"held-out {metric.removeprefix('eval/')}")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, out_dir / "curves.png")

    if grid_rows:
        from leapalign.images import make_grid, save_grid

        rows = [images for _, images in grid_rows]
        save_grid(make_grid(rows, grid_prompts, [label for label, _ in grid_rows]), out_dir / "samples.png")

    lines = [f"# {title}", ""]
    lines.append(
        f"Every run stopped once it had used {budget_nfe:,} image forward-equivalents of the transformer "
        f"(a backward counts 2, a checkpointing recompute 1). Held-out scores are the last evaluation, mean ± std "
        f"over seeds, in % for the exact evaluator."
    )
    lines.append("")
    is_acc = metric in ("eval/overall", "eval/image_accuracy")
    scale = 100.0 if is_acc else 1.0
    digits = 1 if is_acc else 4
    header = [
        "method",
        "seeds",
        "base",
        metric.removeprefix("eval/"),
        *categories,
        "compute used",
        "wall s",
        "updates",
    ]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for row in summary.rows:
        cells = [
            row["label"],
            str(row["seeds"]),
            fmt(*row["start"], scale, digits),
            fmt(*row[metric], scale, digits),
        ]
        cells += [fmt(*row[cat], 100.0, 1) for cat in categories]
        cells += [f"{row['nfe'][0]:,.0f}", f"{row['time_s'][0]:.0f}", f"{row['steps'][0]:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    reward_keys = sorted({k for row in summary.rows for k in row if k.startswith("eval/reward/")})
    if reward_keys:
        lines += ["", "Held-out reward (training reward on held-out prompts, mean ± std over seeds):", ""]
        lines.append("| method | " + " | ".join(k.removeprefix("eval/reward/") for k in reward_keys) + " |")
        lines.append("|---|" + "---|" * len(reward_keys))
        for row in summary.rows:
            lines.append(
                "| " + row["label"] + " | " + " | ".join(fmt(*row[k], 1.0, 4) for k in reward_keys) + " |"
            )
    if summary.reach:
        lines += ["", "Compute to reach a reference's final held-out score (seed-mean curves):", ""]
        for label, refs in summary.reach.items():
            for ref, frac in refs.items():
                text = (
                    "never within its budget"
                    if not math.isfinite(frac)
                    else f"{100 * frac:.0f}% of {ref}'s compute"
                )
                lines.append(f"- {label} reaches {ref}'s final score: {text}")
    lines += ["", "![held-out score vs compute](curves.png)"]
    if grid_rows:
        lines += ["", "![held-out samples, same prompts and noise, one row per method](samples.png)"]
    report = out_dir / "report.md"
    with atomic_path(report) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    with atomic_path(out_dir / "summary.json") as tmp:
        tmp.write_text(json.dumps({"rows": summary.rows, "reach": summary.reach}, indent=2, default=str))
    return report, summary


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
