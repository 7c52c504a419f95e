"""Held-out evaluation: the one place that samples a prompt set with fixed noise and scores it, with the
world's judge (leapalign.world.judge, when every prompt is a miniature-world caption) and/or reward models.

    sample_images, score_images     the two steps; every evaluation below is made of them
    HeldOutEvaluator, EvalSchedule  during training (eval.every / eval.every_nfe): curves, OUTPUT/heldout/
    load_policy                     base, LoRA or transformer weights through diffusers' loaders; the
                                    before/after pass of `leapalign train` (leapalign.world.evaluate) uses it
    plan_eval, evaluate_weights     `leapalign eval`
    sample_report_grid              the picture of a `leapalign compare` report (leapalign.comparison)

The noise of an image depends only on EVAL_SEED, its prompt's position and its replicate (the "eval"
stream, leapalign.streams), never on train.seed, the method or the batch: every run, seed and checkpoint
is scored on the same starting noise, so comparisons are paired.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from leapalign.config import Config, compile_enabled
from leapalign.data import load_prompts
from leapalign.models.flux import FluxPolicy
from leapalign.rewards.base import RewardFn, build_reward, check_rewards
from leapalign.streams import EVAL_SEED, stream


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


def noise_set(prompts_path: str | None) -> int:
    """Which evaluation noise a prompt file gets: 1 for a validation split, 0 for everything else. The
    world's validation and test splits share the few captions some categories have ("a red triangle"):
    their images must still come from different noise, or tuning would see the test images."""
    from leapalign.data import prompt_split

    return 1 if prompts_path and prompt_split(prompts_path) == "validation" else 0


def eval_latents(
    policy: FluxPolicy, cfg: Config, indices: Sequence[int], replicate: int, noise: int = 0
) -> Tensor:
    """The fixed evaluation noise of prompts `indices` (positions in the prompt set), replicate r: [B, S, C].

    Each image's noise is its own stream (EVAL_SEED, noise set, replicate, prompt index): the same for every
    run, seed and method (paired comparisons), and whatever batch it is sampled in."""
    height, width = cfg.sampler.height, cfg.sampler.width
    return torch.cat(
        [
            policy.prepare_latents(1, height, width, stream(EVAL_SEED, "eval", noise, replicate, i))[0]
            for i in indices
        ]
    )


@torch.no_grad()
def sample_images(
    policy: FluxPolicy,
    cfg: Config,
    prompts: Sequence[str],
    *,
    images_per_prompt: int = 1,
    desc: str = "eval",
    progress: bool = True,
    noise: int = 0,
) -> tuple[Tensor, list[str]]:
    """Every prompt `images_per_prompt` times with fixed noise: images [P * R, 3, H, W] on CPU (replicate-major:
    all prompts once, then again), and their prompts. noise: the prompt file's noise set (`noise_set`)."""
    all_prompts, all_images = [], []
    batches = [
        (r, list(range(i, min(i + cfg.eval.batch_size, len(prompts)))))
        for r in range(images_per_prompt)
        for i in range(0, len(prompts), cfg.eval.batch_size)
    ]
    for r, indices in tqdm(batches, desc=desc, disable=not progress, leave=False):
        batch = [prompts[i] for i in indices]
        images = policy.generate(
            batch,
            num_steps=cfg.sampler.eval_num_steps,
            height=cfg.sampler.height,
            width=cfg.sampler.width,
            guidance_scale=cfg.sampler.guidance_scale,
            latents=eval_latents(policy, cfg, indices, r, noise),
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
    per_image: dict[str, list] | None = None,
) -> dict[str, float]:
    """Metrics without a prefix: overall / image_accuracy / <category> (world) and reward/<name> means.

    per_image: a dict to fill with each image's results, in order: category and correct (world),
    reward/<name> (what the paired statistics of a comparison resample, leapalign.stats)."""
    metrics: dict[str, float] = {}
    if world:
        from leapalign.world.judge import evaluate_batch

        scores = evaluate_batch(images.numpy(), list(prompts))
        metrics["overall"] = float(scores["overall"])
        metrics["image_accuracy"] = float(scores["image_accuracy"])
        metrics.update({cat: float(acc) for cat, acc in scores["per_category"].items()})
        if per_image is not None:
            per_image.update(category=scores["category"], correct=scores["correct"])
    for name, reward_fn in (rewards or {}).items():
        values = score_rewards(reward_fn, images, prompts)
        metrics[f"reward/{name}"] = float(values.mean())
        if per_image is not None:
            per_image[f"reward/{name}"] = values.tolist()
    return metrics


def write_image_results(path: Path, prompts: Sequence[str], per_image: dict[str, list]) -> Path:
    """One Parquet row per held-out image: index (the prompt's position), prompt, and its results."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from leapalign.io import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    columns = {"index": list(range(len(prompts))), "prompt": list(prompts), **per_image}
    with atomic_path(path) as tmp:
        pq.write_table(pa.table(columns), tmp)
    return path


class EvalSchedule:
    """When held-out evaluation is due: every eval.every updates, or whenever the cumulative compute
    crosses a multiple of eval.every_nfe. Kept on every rank (the same decisions everywhere: Ray Train
    reports at evaluation steps are collectives), part of a checkpoint through `last_nfe_mark`."""

    def __init__(self, every: int, every_nfe: int):
        self.every, self.every_nfe = every, every_nfe
        self.last_nfe_mark = 0

    def due(self, step: int, nfe_total: int) -> bool:
        by_steps = self.every > 0 and step % self.every == 0
        by_nfe = self.every_nfe > 0 and nfe_total // self.every_nfe > self.last_nfe_mark
        if by_nfe:
            self.last_nfe_mark = nfe_total // self.every_nfe
        return by_steps or by_nfe


class HeldOutEvaluator:
    """Evaluation during training: the first eval.every_num_prompts held-out prompts (a curve point), fixed
    noise; the run's last evaluation (final=True) samples the first eval.final_num_prompts instead.

    An image's noise belongs to its prompt's position (`eval_latents`), so the final evaluation's first
    every_num_prompts images ARE the curve's images: the last curve point is read from them (the curve stays
    one prompt set) and the final metrics (`eval_final/...`) come from all of them, for the price of one
    larger evaluation at the end."""

    def __init__(self, cfg: Config, reward_fn: RewardFn | None):
        assert cfg.eval.prompts is not None
        self.cfg = cfg
        self.curve_size = cfg.eval.every_num_prompts
        final = max(cfg.eval.final_num_prompts, self.curve_size)
        self.final_prompts = load_eval_prompts(cfg.eval.prompts, final)
        self.prompts = self.final_prompts[: self.curve_size]
        self.world = is_world_prompt_set(self.final_prompts)
        self.rewards = {cfg.reward.name: reward_fn} if cfg.eval.reward and reward_fn is not None else {}
        self.last_prompts: list[str] = []
        self.last_images: dict[str, list] = {}  # per image, for OUTPUT/heldout/step_<n>.parquet

    def __call__(self, policy: FluxPolicy, final: bool = False) -> dict[str, float]:
        prompts = self.final_prompts if final else self.prompts
        images, shown = sample_images(
            policy,
            self.cfg,
            prompts,
            desc="held-out eval",
            progress=False,
            noise=noise_set(self.cfg.eval.prompts),
        )
        self.last_prompts, self.last_images = shown, {}
        metrics = score_images(
            images, shown, world=self.world, rewards=self.rewards, per_image=self.last_images
        )
        if not final or len(prompts) == self.curve_size:
            return {f"eval/{key}": value for key, value in metrics.items()}
        curve = score_images(
            images[: self.curve_size], shown[: self.curve_size], world=self.world, rewards=self.rewards
        )
        return {
            **{f"eval/{key}": value for key, value in curve.items()},
            **{f"eval_final/{key}": value for key, value in metrics.items()},
        }


# ----------------------------------------------------------------------------- trained weights


LORA_FILE = "pytorch_lora_weights.safetensors"  # what FluxPipeline.save_lora_weights writes


def resolve_weights(weights: str | Path, use_ema: bool = True) -> tuple[str, Path | None]:
    """("base", None), ("lora", folder) or ("transformer", folder) for what `weights` names.

    Accepts "base", a LoRA folder (diffusers format), a transformer folder (save_pretrained), or a run's
    output folder (its lora_ema / lora / transformer_ema / transformer, EMA first when use_ema).
    """
    if str(weights) == "base":
        return "base", None
    path = Path(weights).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"weights {str(weights)!r}: no such folder; give 'base', a LoRA folder, a transformer folder "
            f"or a run's output folder"
        )
    if (path / LORA_FILE).is_file():
        return "lora", path
    if (path / "config.json").is_file() and any(path.glob("diffusion_pytorch_model*.safetensors")):
        return "transformer", path
    order = ("lora_ema", "lora", "transformer_ema", "transformer") if use_ema else ("lora", "transformer")
    for name in order:
        if (path / name).is_dir():
            return resolve_weights(path / name, use_ema)
    raise FileNotFoundError(
        f"{path} holds no trained weights ({LORA_FILE}, a transformer config.json + safetensors, or a run's "
        f"lora/ or transformer/ folder): did the run finish?"
    )


def load_policy(cfg: Config, weights: str | Path = "base", device: str | None = None) -> FluxPolicy:
    """The base model of cfg.model.path, plus trained weights, through diffusers' own loaders."""
    kind, folder = resolve_weights(weights, cfg.eval.use_ema)
    policy = FluxPolicy.from_pretrained(
        cfg.model.path,
        dtype=cfg.model.dtype,
        device=device,
        revision=cfg.model.revision,
        text_cache=cfg.model.text_cache,
    )
    if kind == "lora":
        policy.pipe.load_lora_weights(str(folder))
    elif kind == "transformer":
        from diffusers import FluxTransformer2DModel

        transformer = FluxTransformer2DModel.from_pretrained(str(folder), dtype=policy.transformer.dtype)
        policy.pipe.transformer = transformer.to(policy.device)
        policy.transformer = policy.pipe.transformer
    if compile_enabled(cfg.sampler.compile, policy.device.type, cfg.train.cpu_isa):
        policy.compile_no_grad_calls()
    return policy


def sample_report_grid(
    cfg: Config, runs: Sequence[tuple[str, Path | None]], num_prompts: int = 8
) -> tuple[list[tuple[str, Tensor]], list[str]] | None:
    """A picture for a report: the same held-out prompts and noise for the base model and each run given
    (its EMA weights when it has them): ([(row label, images)], prompts); None without eval.prompts."""
    if not cfg.eval.prompts:
        return None
    prompts = load_eval_prompts(cfg.eval.prompts, num_prompts)
    noise = noise_set(cfg.eval.prompts)
    rows = [("base", sample_images(load_policy(cfg), cfg, prompts, progress=False, noise=noise)[0])]
    for label, run_dir in runs:
        if run_dir is not None and (Path(run_dir) / "config.yaml").is_file():
            policy = load_policy(cfg, run_dir)
            rows.append((label, sample_images(policy, cfg, prompts, progress=False, noise=noise)[0]))
    return rows, prompts


# ----------------------------------------------------------------------------- `leapalign eval`


@dataclass
class EvalReport:
    summary: dict[str, float]  # metric -> mean over the prompt set (world: GenEval-style overall, categories)
    table: Path  # Parquet: one row per image
    out_dir: Path


def build_metric_rewards(cfg: Config, metrics: Sequence[str]) -> dict[str, RewardFn]:
    """Reward models by registry name ("world" is the exact evaluator, not a reward); the training
    reward keeps its configured options."""
    rewards = {}
    for name in metrics:
        if name == "world":
            continue
        options = cfg.reward.options if name == cfg.reward.name else {}
        rewards[name] = build_reward(name, options)
    return rewards


@dataclass
class EvalPlan:
    """A checked `leapalign eval` request: nothing sampled or written yet."""

    weights: str
    prompts_path: str
    prompts: list[str]
    metrics: list[str]
    rewards: dict[str, RewardFn]


def plan_eval(
    cfg: Config,
    weights: str | Path,
    prompts_path: str,
    metrics: Sequence[str] | None,
    num_prompts: int | None,
) -> EvalPlan:
    """Everything the user can get wrong (weights, prompts, metric names), checked before any work."""
    resolve_weights(weights, cfg.eval.use_ema)
    prompts = load_eval_prompts(prompts_path, num_prompts or cfg.eval.num_prompts)
    world = is_world_prompt_set(prompts)
    metrics = list(metrics) if metrics else (["world"] if world else []) + [cfg.reward.name]
    if "world" in metrics and not world:
        raise ValueError(f"metric 'world' needs miniature-world prompts; {prompts_path} has others")
    return EvalPlan(str(weights), prompts_path, prompts, metrics, build_metric_rewards(cfg, metrics))


def evaluate_weights(cfg: Config, plan: EvalPlan, out_dir: Path, tracker=None) -> EvalReport:
    """Sample the plan's prompts with fixed noise from its weights; score; save images, table, summary."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from leapalign.images import make_grid, save_grid, to_uint8
    from leapalign.io import atomic_path

    policy = load_policy(cfg, plan.weights)
    images, image_prompts = sample_images(
        policy, cfg, plan.prompts, images_per_prompt=cfg.eval.images_per_prompt, desc="eval",
        noise=noise_set(plan.prompts_path),
    )  # fmt: skip
    columns: dict[str, list] = {
        "prompt": image_prompts,
        "image": [f"images/{i:05d}.png" for i in range(len(images))],
    }
    world = "world" in plan.metrics
    summary = score_images(images, image_prompts, world=world, rewards=plan.rewards, per_image=columns)

    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    for array, name in zip(to_uint8(images), columns["image"], strict=True):
        Image.fromarray(array).save(out_dir / name)
    table_path = out_dir / "eval.parquet"
    with atomic_path(table_path) as tmp:
        pq.write_table(pa.table(columns), tmp)
    with atomic_path(out_dir / "summary.json") as tmp:
        tmp.write_text(
            json.dumps({"weights": plan.weights, "prompts": plan.prompts_path, **summary}, indent=2)
        )
    shown = min(8, len(images))
    save_grid(make_grid([images[:shown]], image_prompts[:shown]), out_dir / "grid.png")
    if tracker is not None:
        tracker.log_params(
            {"weights": plan.weights, "prompts": plan.prompts_path, "metrics": ",".join(plan.metrics)}
        )
        tracker.log_metrics(summary, step=0)
        for name in ("eval.parquet", "summary.json", "grid.png"):
            tracker.log_artifact(out_dir / name)
    return EvalReport(summary, table_path, out_dir)
