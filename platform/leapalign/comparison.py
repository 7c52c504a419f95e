"""The report of `leapalign compare`: from the runs' own folders to tables with intervals and verdicts.

The steps, each its own function (plain Python, no Ray; the Tune driver hands over where the runs are):

    collect_runs   every (method, seed): its curve (metrics.jsonl), the final evaluation's per-image
                   results (heldout/step_<n>.parquet), its compute and diagnostics; failed runs kept
    summarise      per method: per-seed scores and how many are finite, mean and std, the paired stratified
                   bootstrap difference to the reference with Holm's verdict and the probability of
                   improvement (leapalign.stats), compute to a target, clip rates
    plot_curves    curves.png: every seed's held-out curve against compute
    format_report  report.md's tables (score_table, breakdown_tables, compute_table, target_table)
    write_report   report.md (failed or missing runs named), summary.json, curves.png, samples.png
    compare_report all of it for `leapalign compare`, with the samples picture (sampled on Ray Data actors)

The target of "compute to target" is the base model's score plus a share (default 50%) of the best
method's gain; each seed's crossing is the compute at its first evaluation at or above it.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from leapalign.config import Config
from leapalign.io import atomic_path
from leapalign.reports import _plt, read_metrics, save_figure
from leapalign.stats import Crossing, Difference, Scores, bootstrap_difference, compute_to_target, verdicts
from leapalign.stats import probability_of_improvement as poi

UNITS = {"flops": ("compute/flops_total", "FLOPs"), "nfe": ("compute/nfe_total", "NFE")}


@dataclass
class RunResult:
    """One (method, seed) run, read back from its folder."""

    label: str
    seed: int
    run_dir: Path
    error: str | None = None  # why the run failed (its trial's error), None if it ran
    curve: list[dict[str, float]] = field(default_factory=list)  # every evaluation: step, compute, value
    final: dict[str, float] = field(default_factory=dict)  # the last evaluation's eval/... metrics
    images: dict[str, np.ndarray] | None = None  # the last evaluation's per-image results
    totals: dict[str, float] = field(default_factory=dict)  # nfe, flops, wall_s, steps
    diagnostics: dict[str, float] = field(default_factory=dict)  # clip rate, weight at cap, GRPO clip, KL

    @property
    def name(self) -> str:
        return f"{self.label} seed {self.seed}"

    @property
    def usable(self) -> bool:
        return self.error is None and self.images is not None and bool(self.final)


def collect_runs(entries: Sequence[tuple[str, int, Path, str | None]], metric: str) -> list[RunResult]:
    """entries: (label, seed, run folder, error or None) for every run the comparison asked for."""
    import pyarrow.parquet as pq

    runs = []
    for label, seed, run_dir, error in entries:
        run = RunResult(label, seed, Path(run_dir), error)
        records = read_metrics(run.run_dir)
        if not records and error is None:
            run.error = "no metrics.jsonl: the run never logged an update"
        run.curve = [
            {"step": r["step"], "nfe": r.get("compute/nfe_total", 0.0), "flops": r.get("compute/flops_total", 0.0),
             "wall_s": r.get("time/wall_s", 0.0), "value": float(r[metric])}
            for r in records if metric in r
        ]  # fmt: skip
        last_eval = next((r for r in reversed(records) if metric in r), None)
        if last_eval is not None:
            run.final = {k: float(v) for k, v in last_eval.items() if k.startswith("eval/")}
            # The run's last evaluation on eval.final_num_prompts prompts, when larger than the curve's.
            final = {
                k.replace("eval_final/", "eval/", 1): float(v)
                for k, v in last_eval.items()
                if k.startswith("eval_final/")
            }
            run.final.update(final)
            table = run.run_dir / "heldout" / f"step_{int(last_eval['step']):06d}.parquet"
            if table.is_file():
                run.images = {k: np.asarray(v) for k, v in pq.read_table(table).to_pydict().items()}
        if records:
            last = records[-1]
            run.totals = {"nfe": last.get("compute/nfe_total", 0.0), "flops": last.get("compute/flops_total", 0.0),
                          "wall_s": last.get("time/wall_s", 0.0), "steps": float(last["step"])}  # fmt: skip
            updates = [r for r in records if "grad_norm" in r]
            for key, name in (("optim/clipped", "clip_rate"), ("weight/at_cap", "weight_at_cap"),
                              ("grpo/clip_frac", "grpo_clip_frac"), ("grpo/approx_kl", "grpo_approx_kl")):  # fmt: skip
                values = [r[key] for r in updates if key in r]
                if values:
                    run.diagnostics[name] = statistics.fmean(values)
        if error is None and run.images is None:
            run.error = "no final held-out evaluation with per-image results (heldout/step_*.parquet)"
        runs.append(run)
    return runs


# ----------------------------------------------------------------------------- summarise


def image_scores(images: dict[str, np.ndarray], metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(values [P], strata [P]) of one run's final evaluation for `metric`: the overall accuracy resamples
    prompts within categories; a category's accuracy, the image accuracy and rewards in one stratum."""
    name = metric.removeprefix("eval/")
    if name.startswith("reward/"):
        if name not in images:
            raise ValueError(f"metric {metric}: the runs' held-out tables have no column {name!r}")
        values = np.asarray(images[name], float)
        return values, np.zeros(len(values), int)
    if "correct" not in images:
        raise ValueError(f"metric {metric} needs the world's exact evaluator (miniature-world prompts)")
    correct, category = np.asarray(images["correct"], float), np.asarray(images["category"])
    if name == "overall":
        return correct, np.unique(category, return_inverse=True)[1]
    if name == "image_accuracy":
        return correct, np.zeros(len(correct), int)
    mask = category == name
    return correct[mask], np.zeros(int(mask.sum()), int)


@dataclass
class MethodRow:
    label: str
    seeds: list[int]  # every seed asked for
    per_seed: dict[int, float]  # the final score of every seed that has one (finite)
    failed: list[str]  # runs of this method that failed or lack a final evaluation, with why
    categories: dict[str, list[float]] = field(default_factory=dict)  # per category, per usable seed
    rewards: dict[str, list[float]] = field(default_factory=dict)
    totals: dict[str, float] = field(default_factory=dict)  # means over seeds: nfe, flops, wall_s, steps
    diagnostics: dict[str, float] = field(default_factory=dict)  # means over seeds
    difference: Difference | None = None  # against the reference
    crossing: Crossing | None = None

    @property
    def values(self) -> list[float]:
        return list(self.per_seed.values())

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else (0.0 if self.values else math.nan)


@dataclass
class ComparisonSummary:
    metric: str
    reference: str
    unit: str  # flops | nfe: the compute axis
    base: float  # the base model's score (every run's evaluation at compute 0)
    target: float  # base + target_share x the best method's gain
    target_share: float
    rows: list[MethodRow]
    n_prompts: int
    n_resamples: int


def summarise(
    runs: list[RunResult],
    metric: str,
    *,
    reference: str,
    unit: str = "flops",
    target_share: float = 0.5,
    n_resamples: int = 10_000,
) -> ComparisonSummary:
    labels = list(dict.fromkeys(r.label for r in runs))
    if reference not in labels:
        raise ValueError(f"reference {reference!r} is not one of the compared runs {labels}")
    rows, scores, prompts = {}, {}, None
    for label in labels:
        group = [r for r in runs if r.label == label]
        usable = [r for r in group if r.usable and math.isfinite(r.final.get(metric, math.nan))]
        row = MethodRow(
            label, [r.seed for r in group], {r.seed: r.final[metric] for r in usable},
            failed=[f"{r.name}: {r.error or 'no finite ' + metric}" for r in group if r not in usable],
        )  # fmt: skip
        for r in usable:
            for key, value in r.final.items():
                name = key.removeprefix("eval/")
                target = row.rewards if name.startswith("reward/") else row.categories
                if name not in (metric.removeprefix("eval/"), "overall", "image_accuracy"):
                    target.setdefault(name, []).append(value)
        for key in ("nfe", "flops", "wall_s", "steps"):
            values = [r.totals[key] for r in usable if key in r.totals]
            if values:
                row.totals[key] = statistics.fmean(values)
        for key in {k for r in usable for k in r.diagnostics}:
            row.diagnostics[key] = statistics.fmean(
                r.diagnostics[key] for r in usable if key in r.diagnostics
            )
        if usable:
            tables = [image_scores(r.images, metric) for r in usable]
            index = [tuple(np.asarray(r.images["index"]).tolist()) for r in usable]
            if prompts is None:
                prompts = index[0]
            if any(i != prompts for i in index):
                raise ValueError(
                    f"{label}: the runs were evaluated on different prompts; a paired comparison needs the same"
                )
            scores[label] = Scores(np.stack([v for v, _ in tables]), tables[0][1])
        rows[label] = row
    # The target lives on the curves' prompts (eval.every_num_prompts, fewer than the final evaluation's):
    # the base model's first point and the best method's mean last point, both on those prompts.
    base = [r.curve[0]["value"] for r in runs if r.curve and r.curve[0][unit] == 0.0]
    base_score = statistics.fmean(base) if base else math.nan
    last_points = {
        label: [r.curve[-1]["value"] for r in runs if r.label == label and r.seed in row.per_seed and r.curve]
        for label, row in rows.items()
    }
    best = max((statistics.fmean(v) for v in last_points.values() if v), default=math.nan)
    target = base_score + target_share * (best - base_score)
    differences = {}
    if reference in scores:
        for label in labels:
            if label != reference and label in scores:
                d = bootstrap_difference(scores[label], scores[reference], n_resamples=n_resamples)
                differences[label] = replace(
                    d, prob_improvement=poi(rows[label].values, rows[reference].values)
                )
    for label, judged in zip(differences, verdicts(list(differences.values())), strict=True):
        rows[label].difference = judged
    if math.isfinite(target):
        for label, row in rows.items():
            curves = [
                [(p[unit], p["value"]) for p in r.curve]
                for r in runs
                if r.label == label and r.seed in row.per_seed
            ]
            row.crossing = compute_to_target(curves, target) if curves else None
    return ComparisonSummary(
        metric, reference, unit, base_score, target, target_share, list(rows.values()),
        n_prompts=len(prompts or ()), n_resamples=n_resamples,
    )  # fmt: skip


# ----------------------------------------------------------------------------- plots and the report


def plot_curves(runs: list[RunResult], summary: ComparisonSummary, path: Path, title: str) -> Path:
    """The held-out score against compute: every seed faint, the target dashed."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, row in enumerate(summary.rows):
        color = colors[i % len(colors)]
        for j, run in enumerate(r for r in runs if r.label == row.label and r.curve):
            ax.plot([p[summary.unit] for p in run.curve], [p["value"] for p in run.curve], color=color,
                    alpha=0.45, lw=1.2, label=f"{row.label} ({len(row.values)} seeds)" if j == 0 else None)  # fmt: skip
    if math.isfinite(summary.target):
        ax.axhline(summary.target, color="gray", ls="--", lw=1, label="target")
    ax.set_xlabel(f"compute ({UNITS[summary.unit][1]} of the whole update)" if summary.unit == "flops"
                  else "compute (transformer image forward-equivalents)")  # fmt: skip
    ax.set_ylabel(f"held-out {summary.metric.removeprefix('eval/')}")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def _pct(metric: str) -> tuple[float, int]:
    """Scale and digits of a metric's numbers: accuracies in %, rewards as they are."""
    name = metric.removeprefix("eval/")
    return (1.0, 4) if name.startswith("reward/") else (100.0, 1)


def _fmt(values: Sequence[float], scale: float, digits: int) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "-"
    std = statistics.stdev(finite) if len(finite) > 1 else 0.0
    return f"{scale * statistics.fmean(finite):.{digits}f} ± {scale * std:.{digits}f} ({len(finite)})"


def _compute(value: float, unit: str) -> str:
    if not math.isfinite(value):
        return "never"
    return f"{value / 1e12:.2f} T" if unit == "flops" else f"{value:,.0f}"


def write_report(
    summary: ComparisonSummary,
    runs: list[RunResult],
    out_dir: Path,
    *,
    title: str,
    budget: str,
    grid: tuple[list[tuple[str, Any]], list[str]] | None = None,
    extra: Sequence[str] = (),
) -> Path:
    """report.md, summary.json, curves.png (and samples.png from `grid`: rows of (label, images), prompts)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_curves(runs, summary, out_dir / "curves.png", title)
    if grid:
        from leapalign.images import make_grid, save_grid

        rows, prompts = grid
        save_grid(
            make_grid([images for _, images in rows], prompts, [label for label, _ in rows]),
            out_dir / "samples.png",
        )
    report = out_dir / "report.md"
    with atomic_path(report) as tmp:
        tmp.write_text(format_report(summary, title=title, budget=budget, extra=extra, samples=bool(grid)))
    with atomic_path(out_dir / "summary.json") as tmp:
        tmp.write_text(json.dumps(asdict(summary), indent=2, default=str))
    return report


def format_report(
    summary: ComparisonSummary, *, title: str, budget: str, extra: Sequence[str] = (), samples: bool = False
) -> str:
    """report.md: the scores with their verdicts, per category and reward, compute, compute to target."""
    lines = [f"# {title}", "", budget, ""]
    lines += score_table(summary) + breakdown_tables(summary) + compute_table(summary) + target_table(summary)
    failed = [f for row in summary.rows for f in row.failed]
    lines += ["", "Failed or missing runs: " + ("none." if not failed else "")]
    lines += [f"- {f}" for f in failed]
    lines += list(extra)
    lines += ["", "![held-out score vs compute](curves.png)"]
    if samples:
        lines += ["", "![held-out samples, same prompts and noise, one row per method](samples.png)"]
    return "\n".join(lines) + "\n"


def score_table(summary: ComparisonSummary) -> list[str]:
    """The held-out score per method: mean ± std, per seed, the difference to the reference, its verdict."""
    scale, digits = _pct(summary.metric)
    name = summary.metric.removeprefix("eval/")
    lines = [
        f"Held-out {name} at each run's last evaluation on {summary.n_prompts} prompts (the same prompts and noise "
        f"for every method): mean ± std over seeds, (n) = seeds with a finite value. Differences to "
        f"**{summary.reference}**: mean and 95% interval from a paired, stratified bootstrap ({summary.n_resamples:,} "
        f"resamples of seeds within each method and of prompts within each category; scipy.stats.bootstrap), "
        f"p-values Holm-corrected across the rows; verdict at 0.05. P(improve) = P(method seed > reference seed).",
    ]
    lines += ["", f"| method | {name} | per seed | Δ vs {summary.reference} [95% CI] | p (Holm) | P(improve) | verdict |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in summary.rows:
        seeds = ", ".join(f"s{seed} {scale * v:.{digits}f}" for seed, v in row.per_seed.items()) or "-"
        d = row.difference
        if row.label == summary.reference:
            delta, p, improve, verdict = "reference", "", "", ""
        elif d is None:
            delta, p, improve, verdict = "-", "-", "-", "no usable runs"
        else:
            delta = (
                f"{scale * d.mean:+.{digits}f} [{scale * d.low:+.{digits}f}, {scale * d.high:+.{digits}f}]"
            )
            p, improve, verdict = f"{d.p_value:.3g} ({d.p_holm:.3g})", f"{d.prob_improvement:.2f}", d.verdict
        lines.append(
            f"| {row.label} | {_fmt(row.values, scale, digits)} | {seeds} | {delta} | {p} | {improve} | {verdict} |"
        )
    return lines


def breakdown_tables(summary: ComparisonSummary) -> list[str]:
    """Per category (world prompts) and per held-out reward: mean ± std (n) per method."""
    lines: list[str] = []
    categories = sorted({c for row in summary.rows for c in row.categories})
    if categories:
        lines += ["", "Per category (% correct, mean ± std (n)):", "",
                  "| method | " + " | ".join(categories) + " |", "|---|" + "---|" * len(categories)]  # fmt: skip
        for row in summary.rows:
            cells = [_fmt(row.categories.get(c, []), 100.0, 1) for c in categories]
            lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    rewards = sorted({k for row in summary.rows for k in row.rewards})
    if rewards:
        lines += ["", "Held-out rewards (mean ± std (n)):", "", "| method | " + " | ".join(rewards) + " |",
                  "|---|" + "---|" * len(rewards)]  # fmt: skip
        for row in summary.rows:
            lines.append(
                f"| {row.label} | " + " | ".join(_fmt(row.rewards.get(k, []), 1.0, 4) for k in rewards) + " |"
            )
    return lines


def compute_table(summary: ComparisonSummary) -> list[str]:
    """Compute per method (updates, NFE, FLOPs, wall time) and its diagnostics (clip rates, GRPO's KL)."""
    lines = ["", "Compute and diagnostics (means over seeds): NFE counts the transformer alone; FLOPs the whole "
              "update (transformer, VAE decoder, reward; forward and backward); clip = share of updates whose "
              "gradient norm was clipped; at cap = share of LeapAlign samples at the similarity weight's cap.", "",
              "| method | updates | NFE | TFLOPs | wall s | clip | at cap | GRPO clip frac | GRPO approx KL |",
              "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in summary.rows:
        t, g = row.totals, row.diagnostics

        def cell(value, spec):
            return format(value, spec) if value is not None and math.isfinite(value) else "-"

        lines.append(
            f"| {row.label} | {cell(t.get('steps'), '.0f')} | {cell(t.get('nfe'), ',.0f')} | "
            f"{cell(t.get('flops', math.nan) / 1e12, '.2f')} | {cell(t.get('wall_s'), '.0f')} | "
            f"{cell(g.get('clip_rate'), '.2f')} | {cell(g.get('weight_at_cap'), '.2f')} | "
            f"{cell(g.get('grpo_clip_frac'), '.3f')} | {cell(g.get('grpo_approx_kl'), '.2e')} |"
        )
    return lines


def target_table(summary: ComparisonSummary) -> list[str]:
    """Compute to reach the target score, per method: median [95% CI], seeds that reached it."""
    if not math.isfinite(summary.target):
        return []
    scale, digits = _pct(summary.metric)
    unit_name = UNITS[summary.unit][1]
    lines = ["", f"Compute to reach {scale * summary.target:.{digits}f} (the base model's {scale * summary.base:.{digits}f} "
              f"plus {100 * summary.target_share:.0f}% of the best method's gain, both on the curves' prompts), per seed at its first evaluation "
              f"at or above it, in {unit_name}: median [95% CI over seeds], seeds that reached it.", "",
              "| method | median | 95% CI | reached | per seed |", "|---|---|---|---|---|"]  # fmt: skip
    for row in summary.rows:
        c = row.crossing
        if c is None:
            lines.append(f"| {row.label} | - | - | 0 | - |")
            continue
        interval = (
            "-"
            if math.isnan(c.low)
            else f"[{_compute(c.low, summary.unit)}, {_compute(c.high, summary.unit)}]"
        )
        per_seed = ", ".join(_compute(v, summary.unit) for v in c.per_seed)
        lines.append(
            f"| {row.label} | {_compute(c.median, summary.unit)} | {interval} | {c.reached}/{len(c.per_seed)} | {per_seed} |"
        )
    return lines


def compare_report(
    spec,
    base: Config,
    entries: Sequence[tuple[str, int, Path, str | None]],
    out_dir: Path,
    chosen: dict[str, dict[str, Any]],
    tuning: list[dict],
    sample_grid=None,
) -> Path:
    """The whole report of `leapalign compare` from its runs' folders: collect, summarise, a picture (the base
    model and each method's first usable run on the same held-out prompts and noise), write. base: the spec's
    base config with absolute paths; chosen, tuning: the tuning phase's. sample_grid: what samples the picture,
    evaluation.sample_report_grid's signature (default: it, in this process; `leapalign compare` passes the
    Ray Data evaluation, leapalign.distributed.data_jobs.sample_report_grid_on_ray)."""
    from leapalign.evaluation import sample_report_grid

    results = collect_runs(entries, spec.metric)
    summary = summarise(
        results, spec.metric, reference=spec.reference, unit=spec.unit, target_share=spec.target_share
    )
    first_usable = {label: next((r.run_dir for r in results if r.label == label and r.usable), None)
                    for label in spec.runs}  # fmt: skip
    grid = (sample_grid or sample_report_grid)(base, list(first_usable.items()))
    title = f"{spec.name}: {', '.join(spec.runs)}, {len(spec.seeds)} seeds"
    budget = f"Every run stopped once it had used {spec.budget_text()} (seeds {spec.seeds})."
    extra = tuning_section(spec, chosen, tuning) if spec.tune is not None else []
    return write_report(summary, results, out_dir, title=title, budget=budget, grid=grid, extra=extra)


def tuning_section(spec, chosen: dict[str, dict[str, Any]], trials: list[dict]) -> list[str]:
    """The report's account of the tuning phase: the budget, each method's trials and its choice."""
    tune_spec = spec.tune
    budget = (
        f"{tune_spec.budget['flops'] / 1e12:.2f} TFLOPs"
        if "flops" in tune_spec.budget
        else f"{tune_spec.budget['nfe']:,} NFE"
    )
    lines = ["", "## Tuning", "",
             f"Every method: {tune_spec.trials} random trials of its search space, each one run of {budget} with seed "
             f"{tune_spec.seed} scored by {tune_spec.metric} on the validation prompts {tune_spec.prompts} (never the "
             f"reported prompts); the best trial's values are the final runs' settings.", "",
             "| method | searched | chosen | best validation | trials (value: params) |", "|---|---|---|---|---|"]  # fmt: skip
    for label, space in tune_spec.space.items():
        mine = sorted(
            (t for t in trials if t["run"] == label),
            key=lambda t: -t["value"] if math.isfinite(t["value"]) else math.inf,
        )
        best = max((t["value"] for t in mine if math.isfinite(t["value"])), default=math.nan)
        searched = ", ".join(f"{key} {p.kind} {list(p.values)}" for key, p in space.items())
        picked = ", ".join(f"{k}={_short(v)}" for k, v in chosen.get(label, {}).items())
        listed = "; ".join(
            f"{t['value']:.3f}: "
            + ", ".join(f"{k}={_short(v)}" for k, v in t["params"].items())
            + (" (failed)" if t["error"] else "")
            for t in mine
        )
        lines.append(f"| {label} | {searched} | {picked} | {best:.4f} | {listed} |")
    return lines


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
