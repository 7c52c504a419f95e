"""Held-out evaluation with fixed noise: sample a prompt set, score it with the exact world evaluator
(when every prompt is a miniature-world caption) and/or reward models.

The noise depends only on EVAL_SEED and the batch index, never on train.seed or the method, so every
run, seed and checkpoint is scored on the same starting noise: comparisons are paired. Used during
training (`eval.every`), before and after a run (`leapalign train` with `eval.prompts`), by
`leapalign eval` and by `leapalign compare`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from leapalign.config import Config
from leapalign.data import load_prompts
from leapalign.models.flux import FluxPolicy
from leapalign.rewards.base import RewardFn, check_rewards

EVAL_SEED = 20_000  # evaluation noise: the same for every run, apart from training's seeds


def load_eval_prompts(path: str, num_prompts: int) -> list[str]:
    """The first `num_prompts` prompts of a prompt file (world files are validated word by word)."""
    return load_prompts(path)[:num_prompts]


def is_world_prompt_set(prompts: Sequence[str]) -> bool:
    """True when every prompt is a miniature-world caption, so the exact evaluator can score it."""
    from leapalign.world.scenes import parse_caption

    try:
        for prompt in prompts:
            parse_caption(prompt)
    except ValueError:
        return False
    return True


@torch.no_grad()
def sample_images(
    policy: FluxPolicy,
    cfg: Config,
    prompts: Sequence[str],
    *,
    images_per_prompt: int = 1,
    desc: str = "eval",
    progress: bool = True,
) -> tuple[Tensor, list[str]]:
    """Every prompt `images_per_prompt` times with fixed noise: images [P * R, 3, H, W] on CPU, and their prompts."""
    all_prompts, all_images = [], []
    batches = [
        (r, list(prompts[i : i + cfg.eval.batch_size]))
        for r in range(images_per_prompt)
        for i in range(0, len(prompts), cfg.eval.batch_size)
    ]
    for batch_index, (r, batch) in enumerate(tqdm(batches, desc=desc, disable=not progress, leave=False)):
        generator = torch.Generator().manual_seed(EVAL_SEED + 1000 * r + batch_index)
        images = policy.generate(
            batch,
            num_steps=cfg.sampler.eval_num_steps,
            height=cfg.sampler.height,
            width=cfg.sampler.width,
            guidance_scale=cfg.sampler.guidance_scale,
            generator=generator,
            max_sequence_length=cfg.model.max_sequence_length,
        )
        all_images.append(images.cpu())
        all_prompts.extend(batch)
    return torch.cat(all_images), all_prompts


@torch.no_grad()
def score_rewards(
    reward_fn: RewardFn, images: Tensor, prompts: Sequence[str], batch_size: int = 64
) -> Tensor:
    """Reward values [B] without gradients (a served reward's cheaper `score` call when it has one)."""
    score = getattr(reward_fn, "score", None) or reward_fn
    values = []
    for i in range(0, len(prompts), batch_size):
        chunk = score(images[i : i + batch_size], list(prompts[i : i + batch_size]))
        check_rewards(chunk, len(prompts[i : i + batch_size]), source="held-out reward")
        values.append(chunk.detach().float().cpu())
    return torch.cat(values)


def score_images(
    images: Tensor,
    prompts: Sequence[str],
    *,
    world: bool,
    rewards: dict[str, RewardFn] | None = None,
) -> dict[str, float]:
    """Metrics without a prefix: overall / image_accuracy / <category> (world) and reward/<name> means."""
    metrics: dict[str, float] = {}
    if world:
        from leapalign.world.evaluator import evaluate_batch

        scores = evaluate_batch(images.numpy(), list(prompts))
        metrics["overall"] = float(scores["overall"])
        metrics["image_accuracy"] = float(scores["image_accuracy"])
        metrics.update({cat: float(acc) for cat, acc in scores["per_category"].items()})
    for name, reward_fn in (rewards or {}).items():
        metrics[f"reward/{name}"] = float(score_rewards(reward_fn, images, prompts).mean())
    return metrics


class HeldOutEvaluator:
    """Evaluation during training: the first eval.every_num_prompts held-out prompts, fixed noise."""

    def __init__(self, cfg: Config, reward_fn: RewardFn | None):
        assert cfg.eval.prompts is not None
        self.cfg = cfg
        self.prompts = load_eval_prompts(cfg.eval.prompts, cfg.eval.every_num_prompts)
        self.world = is_world_prompt_set(self.prompts)
        self.rewards = {cfg.reward.name: reward_fn} if cfg.eval.reward and reward_fn is not None else {}
        self.last_nfe_mark = 0

    def due(self, step: int, nfe_total: int) -> bool:
        """Every eval.every updates, or when the compute crosses a multiple of eval.every_nfe."""
        every, every_nfe = self.cfg.eval.every, self.cfg.eval.every_nfe
        by_steps = every > 0 and step % every == 0
        by_nfe = every_nfe > 0 and nfe_total // every_nfe > self.last_nfe_mark
        if by_nfe:
            self.last_nfe_mark = nfe_total // every_nfe
        return by_steps or by_nfe

    def __call__(self, policy: FluxPolicy) -> dict[str, float]:
        images, prompts = sample_images(policy, self.cfg, self.prompts, desc="held-out eval", progress=False)
        metrics = score_images(images, prompts, world=self.world, rewards=self.rewards)
        return {f"eval/{key}": value for key, value in metrics.items()}
