"""Held-out evaluation of a Flux policy in the miniature world (the GenEval analogue).

Samples each held-out prompt with fixed noise (the same before and after training, so the comparison
is paired), scores every image with the exact rule-based evaluator, and reports overall and
per-category accuracy. Used by `leapalign train` when `eval.prompts` is set.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from leapalign.config import Config
from leapalign.evaluation import load_eval_prompts, load_policy, noise_set, sample_images
from leapalign.images import make_grid, save_grid
from leapalign.io import atomic_path
from leapalign.models.flux import FluxPolicy
from leapalign.world.judge import evaluate_batch
from leapalign.world.scenes import parse_caption


@dataclass
class EvalResult:
    overall: float  # mean of per-category accuracies (GenEval's overall)
    image_accuracy: float  # fraction of images judged correct
    per_category: dict[str, float]
    n: int
    images: torch.Tensor  # [P * images_per_prompt, 3, H, W]
    prompts: list[str]

    def metrics(self, prefix: str) -> dict[str, float]:
        out = {f"{prefix}/overall": self.overall, f"{prefix}/image_accuracy": self.image_accuracy}
        out.update({f"{prefix}/{cat}": acc for cat, acc in self.per_category.items()})
        return out


def evaluate_policy(
    policy: FluxPolicy, cfg: Config, prompts: list[str], desc: str = "eval", progress: bool = True
) -> EvalResult:
    """Sample every prompt images_per_prompt times with the fixed evaluation noise and score them exactly."""
    images, all_prompts = sample_images(
        policy, cfg, prompts, images_per_prompt=cfg.eval.images_per_prompt, desc=desc,
        noise=noise_set(cfg.eval.prompts), progress=progress,
    )  # fmt: skip
    scores = evaluate_batch(images.numpy(), all_prompts)
    return EvalResult(
        overall=float(scores["overall"]),
        image_accuracy=float(scores["image_accuracy"]),
        per_category={k: float(v) for k, v in scores["per_category"].items()},
        n=int(scores["n"]),
        images=images,
        prompts=all_prompts,
    )


def format_comparison(before: EvalResult, after: EvalResult) -> str:
    """A small table: category, before, after, change (accuracy in %)."""
    rows = [("category", "before", "after", "change")]
    for cat in sorted(before.per_category):
        b, a = before.per_category[cat], after.per_category.get(cat, float("nan"))
        rows.append((cat, f"{100 * b:.1f}", f"{100 * a:.1f}", f"{100 * (a - b):+.1f}"))
    rows.append(("overall", f"{100 * before.overall:.1f}", f"{100 * after.overall:.1f}",
                 f"{100 * (after.overall - before.overall):+.1f}"))  # fmt: skip
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{r[0]:<{width}}  {r[1]:>7}  {r[2]:>7}  {r[3]:>7}" for r in rows)


def save_comparison(before: EvalResult, after: EvalResult, out_dir: Path, num_columns: int = 8) -> list[Path]:
    """eval.json (both results) and eval_before_after.png (same prompts and noise, base vs aligned)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {
        stage: {
            "overall": r.overall,
            "image_accuracy": r.image_accuracy,
            "per_category": r.per_category,
            "n": r.n,
        }
        for stage, r in (("before", before), ("after", after))
    }
    json_path = out_dir / "eval.json"
    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    # The first prompt of each category first, then the next ones: the grid shows every kind of prompt.
    categories = [parse_caption(p).category for p in before.prompts]
    firsts = [categories.index(c) for c in dict.fromkeys(categories)]
    picked = (firsts + [i for i in range(len(categories)) if i not in firsts])[:num_columns]
    grid = make_grid(
        [before.images[picked], after.images[picked]],
        [before.prompts[i] for i in picked],
        ["base", "aligned"],
    )
    return [json_path, save_grid(grid, out_dir / "eval_before_after.png")]


def evaluate_stage(
    cfg: Config, run_dir: Path | None = None, device: str | None = None, progress: bool = True
) -> EvalResult:
    """Accuracy of the base model (run_dir None) or of a finished run's weights on cfg.eval.prompts."""
    prompts = load_eval_prompts(cfg.eval.prompts, cfg.eval.num_prompts)
    policy = load_policy(cfg, run_dir if run_dir is not None else "base", device)
    desc = "eval " + ("aligned" if run_dir else "base")
    return evaluate_policy(policy, cfg, prompts, desc=desc, progress=progress)


def report_comparison(before: EvalResult, after: EvalResult, out_dir: Path, tracker, step: int) -> str:
    """Print-ready table; eval.json + before/after grid saved and logged with the metrics."""
    tracker.log_metrics({**before.metrics("eval/before"), **after.metrics("eval/after")}, step=step)
    for path in save_comparison(before, after, out_dir):
        tracker.log_artifact(path, "eval")
    return format_comparison(before, after)
