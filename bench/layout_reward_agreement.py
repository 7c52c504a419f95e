"""How well does the differentiable `world_layout` reward agree with the exact evaluator? (CPU)

    .venv/bin/python bench/layout_reward_agreement.py            # 300 prompts + 100 position x 12, ~4 min
    .venv/bin/python bench/layout_reward_agreement.py --num-prompts 600 --images-per-prompt 4
    .venv/bin/python bench/layout_reward_agreement.py --position-images-per-prompt 0   # skip the position set

1. Model samples. The shipped mini-flux samples the first --num-prompts held-out prompts of
   eval.parquet (every category, 50 each per 300) with the evaluation's fixed noise and settings
   (`world.evaluate.evaluate_policy` with experiments/quickstart.yaml: 12 Euler steps, 32 x 32, guidance
   3.5). The exact evaluator labels each image correct or incorrect; `world_layout` (defaults) and the
   learned scorer `clip_score` (shipped mini-scorer) score it. Printed per category and pooled: the
   ROC AUC of each score for separating correct from incorrect images (P(score of a random correct
   image > score of a random incorrect one), `world.scorer.roc_auc`), with the counts. AUC needs both
   kinds in a category; with few correct images (the base model gets ~3 % of position prompts right)
   it is noisy (at 300 prompts, ~1 correct position image), so a second set samples all 100 held-out
   position prompts --position-images-per-prompt times (1200 images, ~20 correct), and the position
   block adds what depends less on them:
     - AUC among images where both objects are present (evaluator's presence checks pass), i.e. how
       well the score tracks the relation alone;
     - flip test: for each image, is the score higher for its prompt than for the same prompt with the
       relation flipped (left <-> right, above <-> below)? Over correct images (should be ~1) and over
       images whose objects are both present but whose relation fails (flipping may or may not make
       the caption true, so this is not expected to be 1).
2. Ground truth vs hard negatives. Rendered ground-truth scenes (`scenes.sample_scene`, 50 per
   category by default) scored with their caption against hard negatives that the exact evaluator
   rejects: the caption with the relation flipped, the objects' colours swapped, one colour changed,
   the shape changed, the count +-1; and the image with an object removed. Printed: the win rate (true
   pair strictly higher) per category and kind, for both scores.

Torch runs on one thread (the machine's two cores are shared). Sampling dominates the time.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections import defaultdict

import numpy as np
import torch

from leapalign.config import load_config
from leapalign.data import load_prompts
from leapalign.models.flux import FluxPolicy
from leapalign.rewards.clip_score import ClipScore
from leapalign.world.evaluate import evaluate_policy
from leapalign.world.judge import evaluate_image
from leapalign.world.layout_reward import WorldLayoutReward
from leapalign.world.scenes import (
    CATEGORIES,
    COLORS,
    SHAPES,
    ParsedCaption,
    Scene,
    format_caption,
    parse_caption,
    render_scene,
    sample_scene,
)
from leapalign.world.scorer import roc_auc

FLIP = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def score_all(score_fn, images: torch.Tensor, prompts: list[str], chunk: int = 100) -> np.ndarray:
    with torch.no_grad():
        return torch.cat(
            [score_fn(images[i : i + chunk], prompts[i : i + chunk]) for i in range(0, len(prompts), chunk)]
        ).numpy()


def auc_or_nan(scores: np.ndarray, correct: np.ndarray) -> float:
    if correct.all() or not correct.any():
        return float("nan")
    return roc_auc(scores[correct], scores[~correct])


def flipped(prompt: str) -> str:
    parsed = parse_caption(prompt)
    return format_caption(dataclasses.replace(parsed, relation=FLIP[parsed.relation]))


def hard_negatives(scene: Scene) -> list[tuple[str, Scene, str]]:
    """(kind, image scene, caption) pairs that the exact evaluator rejects."""
    parsed = parse_caption(scene.caption)
    objs = parsed.objects
    new_color = next(c for c in COLORS if c not in {o.color for o in scene.objects})

    def caption(*objects, relation=parsed.relation) -> str:
        return format_caption(ParsedCaption(parsed.category, tuple(objects), relation))

    out = [("object removed", dataclasses.replace(scene, objects=scene.objects[:-1]), scene.caption)]
    a = objs[0]
    if parsed.category == "counting":
        if a.count < 3:
            out.append(("count+1", scene, caption(dataclasses.replace(a, count=a.count + 1))))
        if a.count > 1:
            out.append(("count-1", scene, caption(dataclasses.replace(a, count=a.count - 1))))
        return out + [("color changed", scene, caption(dataclasses.replace(a, color=new_color)))]
    if len(objs) == 1:
        other_shape = next(s for s in SHAPES if s != a.shape)
        return out + [
            ("color changed", scene, caption(dataclasses.replace(a, color=new_color))),
            ("shape changed", scene, caption(dataclasses.replace(a, shape=other_shape))),
        ]
    b = objs[1]
    out.append(("color changed", scene, caption(dataclasses.replace(a, color=new_color), b)))
    if a.color != b.color:
        out.append(
            (
                "colors swapped",
                scene,
                caption(dataclasses.replace(a, color=b.color), dataclasses.replace(b, color=a.color)),
            )
        )
    if parsed.relation is not None:
        out.append(("relation flipped", scene, caption(a, b, relation=FLIP[parsed.relation])))
    return out


def render(scenes: list[Scene], resolution: int) -> torch.Tensor:
    return (
        torch.from_numpy(np.stack([render_scene(s, resolution) for s in scenes]))
        .permute(0, 3, 1, 2)
        .contiguous()
    )


def model_sample_table(images, prompts, scorers) -> None:
    results = [evaluate_image(image.numpy(), prompt) for image, prompt in zip(images, prompts, strict=True)]
    correct = np.array([r["correct"] for r in results])
    category = np.array([r["category"] for r in results])
    scores = {name: score_all(fn, images, prompts) for name, fn in scorers.items()}
    names = list(scorers)
    print(f"{'category':18s} {'n':>5s} {'correct':>7s} " + " ".join(f"{'AUC ' + n:>17s}" for n in names))
    for cat in [*CATEGORIES, "overall"]:
        rows = np.ones_like(correct) if cat == "overall" else category == cat
        if not rows.any():
            continue
        aucs = " ".join(f"{auc_or_nan(scores[n][rows], correct[rows]):17.3f}" for n in names)
        print(f"{cat:18s} {rows.sum():5d} {correct[rows].sum():7d} {aucs}")
    position = category == "position"
    if position.any():
        both = np.array([all(v for k, v in r["checks"].items() if k.startswith("present")) for r in results])
        rows = position & both
        print(
            f"position, both objects present: n={rows.sum()}, correct={correct[rows].sum()}; AUC "
            + ", ".join(f"{n} {auc_or_nan(scores[n][rows], correct[rows]):.3f}" for n in names)
        )
        index = np.flatnonzero(position)
        flip_prompts = [flipped(prompts[i]) for i in index]
        for n in names:
            flip_scores = score_all(scorers[n], images[index], flip_prompts)
            wins = scores[n][index] > flip_scores
            ok, wrong = correct[index], both[index] & ~correct[index]
            print(
                f"position flip test, {n}: prompt beats flipped prompt on {wins[ok].mean():.3f} of "
                f"{ok.sum()} correct images; on {wins[wrong].mean():.3f} of {wrong.sum()} both-present, "
                "relation-wrong images"
            )


def hard_negative_table(scorers, scenes_per_category: int, resolution: int) -> None:
    wins: dict[tuple[str, str, str], list[bool]] = defaultdict(list)
    for cat in CATEGORIES:
        scenes = [
            sample_scene(np.random.default_rng(50_000 + seed), cat) for seed in range(scenes_per_category)
        ]
        rows = [
            (i, kind, image, text) for i, s in enumerate(scenes) for kind, image, text in hard_negatives(s)
        ]
        for name, fn in scorers.items():
            true_scores = score_all(fn, render(scenes, resolution), [s.caption for s in scenes])
            negative = score_all(fn, render([r[2] for r in rows], resolution), [r[3] for r in rows])
            for (i, kind, _, _), value in zip(rows, negative, strict=True):
                wins[(cat, kind, name)].append(bool(true_scores[i] > value))
    names = list(scorers)
    print(
        f"{'category':18s} {'hard negative':17s} {'n':>4s} " + " ".join(f"{'win ' + n:>17s}" for n in names)
    )
    for cat, kind in dict.fromkeys((c, k) for c, k, _ in wins):
        rates = " ".join(f"{np.mean(wins[(cat, kind, n)]):17.3f}" for n in names)
        print(f"{cat:18s} {kind:17s} {len(wins[(cat, kind, names[0])]):4d} {rates}")
    for n in names:
        pooled = [w for (_, _, name), values in wins.items() if name == n for w in values]
        print(f"all hard negatives, {n}: win rate {np.mean(pooled):.3f} over {len(pooled)} pairs")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="experiments/quickstart.yaml")
    parser.add_argument("--num-prompts", type=int, default=300)
    parser.add_argument("--images-per-prompt", type=int, default=1)
    parser.add_argument(
        "--position-images-per-prompt",
        type=int,
        default=12,
        help="also sample every held-out position prompt this many times and print its table (0: skip)",
    )
    parser.add_argument("--scenes-per-category", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.config, [f"eval.images_per_prompt={args.images_per_prompt}"])
    all_prompts = load_prompts(cfg.eval.prompts)
    policy = FluxPolicy.from_pretrained(cfg.model.path, dtype=cfg.model.dtype, device="cpu")
    scorers = {"world_layout": WorldLayoutReward(), "clip_score": ClipScore(device="cpu")}

    start = time.perf_counter()
    sampled = evaluate_policy(policy, cfg, all_prompts[: args.num_prompts], desc="sample")
    print(
        f"\n== Model samples: mini-flux on the first {args.num_prompts} held-out prompts x "
        f"{args.images_per_prompt}, {cfg.sampler.eval_num_steps} steps, {cfg.sampler.height}x{cfg.sampler.width}, "
        f"guidance {cfg.sampler.guidance_scale} (sampled in {time.perf_counter() - start:.0f} s); evaluator "
        f"accuracy {sampled.image_accuracy:.3f}"
    )
    model_sample_table(sampled.images, sampled.prompts, scorers)

    if args.position_images_per_prompt > 0:
        position_prompts = [p for p in all_prompts if parse_caption(p).category == "position"]
        cfg_position = load_config(args.config, [f"eval.images_per_prompt={args.position_images_per_prompt}"])
        extra = evaluate_policy(policy, cfg_position, position_prompts, desc="position")
        print(
            f"\n== Position only: all {len(position_prompts)} held-out position prompts x "
            f"{args.position_images_per_prompt} (evaluator accuracy {extra.image_accuracy:.3f})"
        )
        model_sample_table(extra.images, extra.prompts, scorers)

    print(
        f"\n== Ground truth vs hard negatives: {args.scenes_per_category} rendered scenes per category, 32 px"
    )
    hard_negative_table(scorers, args.scenes_per_category, resolution=cfg.sampler.height)


if __name__ == "__main__":
    main()
