"""Held-out evaluation: the one place that samples a prompt set with fixed noise and scores it, with the
world's judge (leapalign.world.judge, when every prompt is a miniature-world caption) and/or reward models.

    sample_images, score_images     the two steps; every evaluation below is made of them
    HeldOutEvaluator, EvalSchedule  during training (eval.every / eval.every_nfe): curves, OUTPUT/heldout/
    load_policy                     base, LoRA or transformer weights through diffusers' loaders; the
                                    before/after pass of `leapalign train` (leapalign.world.evaluate) uses it
    EvalUnit, eval_units            the fixed sampling batches of a prompt set: split by rank_share across
                                    ranks, or across Ray Data actors (leapalign.distributed.data_jobs)
    sample_unit, score_unit,        one unit sampled; its images scored; per-image results -> metrics
    summarise_images
    plan_eval, evaluate_weights,    `leapalign eval` (one process; several weights on Ray Data actors)
    write_eval_folder
    sample_report_grid              the picture of a `leapalign compare` report (leapalign.comparison)

The noise of an image depends only on EVAL_SEED, its prompt's position and its replicate (the "eval"
stream, leapalign.streams), never on train.seed, the method or the batch: every run, seed and checkpoint
is scored on the same starting noise, so comparisons are paired.

Why one file over 500 lines: the fixed-noise contract (units, noise, scoring, the table's columns) is the one
thing every evaluation shares; split into files, a change to one path could silently break the pairing of
another (the in-training curve, `leapalign eval` in one process and on Ray Data, the report's picture).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
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


@dataclass(frozen=True)
class EvalUnit:
    """One sampling batch of an evaluation: replicate `replicate` of the prompts at `indices` (positions in
    the prompt set). The units of a prompt set are fixed (`eval_units`), so whoever samples a unit (this
    process, one rank of several, one Ray Data actor of a pool) makes the same model calls on the same noise
    and gets the same bits: an evaluation split across ranks or actors equals one done in one place."""

    replicate: int
    indices: tuple[int, ...]


def eval_units(num_prompts: int, images_per_prompt: int, batch_size: int) -> list[EvalUnit]:
    """The sampling batches of P prompts x R images, replicate-major (all prompts once, then again): unit k's
    images are images sum(len(units[:k])) onwards of the evaluation's table."""
    return [
        EvalUnit(r, tuple(range(i, min(i + batch_size, num_prompts))))
        for r in range(images_per_prompt)
        for i in range(0, num_prompts, batch_size)
    ]


def rank_share(num_units: int, rank: int, world_size: int) -> list[int]:
    """The units rank `rank` of `world_size` samples: every world_size-th, from its own rank on (the shares
    are disjoint, cover every unit and differ in size by at most one)."""
    return list(range(rank, num_units, world_size))


@torch.no_grad()
def sample_unit(
    policy: FluxPolicy, cfg: Config, prompts: Sequence[str], unit: EvalUnit, noise: int = 0
) -> Tensor:
    """The images [len(unit.indices), 3, H, W] (CPU, in [0, 1]) of one unit, from its fixed noise."""
    images = policy.generate(
        [prompts[i] for i in unit.indices],
        num_steps=cfg.sampler.eval_num_steps,
        height=cfg.sampler.height,
        width=cfg.sampler.width,
        guidance_scale=cfg.sampler.guidance_scale,
        latents=eval_latents(policy, cfg, unit.indices, unit.replicate, noise),
        max_sequence_length=cfg.model.max_sequence_length,
    )
    return images.cpu()


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
    units = eval_units(len(prompts), images_per_prompt, cfg.eval.batch_size)
    images = [
        sample_unit(policy, cfg, prompts, unit, noise)
        for unit in tqdm(units, desc=desc, disable=not progress, leave=False)
    ]
    return torch.cat(images), [prompts[i] for unit in units for i in unit.indices]


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


def score_unit(
    images: Tensor, prompts: Sequence[str], *, world: bool, rewards: dict[str, RewardFn] | None = None
) -> dict[str, list]:
    """Each image's results, in order: category and correct (world's exact judge), reward/<name> (what the
    paired statistics of a comparison resample, leapalign.stats). One call per sampling unit: rewards see the
    same batches however the evaluation is split."""
    columns: dict[str, list] = {}
    if world:
        from leapalign.world.judge import evaluate_batch

        scores = evaluate_batch(images.numpy(), list(prompts))
        columns.update(category=list(scores["category"]), correct=list(scores["correct"]))
    for name, reward_fn in (rewards or {}).items():
        columns[f"reward/{name}"] = score_rewards(reward_fn, images, prompts).tolist()
    return columns


def summarise_images(per_image: dict[str, Sequence]) -> dict[str, float]:
    """Metrics without a prefix from per-image results: overall (GenEval's: the mean of the per-category
    accuracies, categories in order of appearance), image_accuracy and <category> (world), reward/<name>
    means (float32, as the rewards come). The same function for one process, ranks and Ray Data actors."""
    metrics: dict[str, float] = {}
    if "correct" in per_image:
        correct: dict[str, list[bool]] = {}
        for category, ok in zip(per_image["category"], per_image["correct"], strict=True):
            correct.setdefault(category, []).append(bool(ok))
        per_category = {category: float(np.mean(values)) for category, values in correct.items()}
        metrics["overall"] = float(np.mean(list(per_category.values())))
        metrics["image_accuracy"] = sum(map(bool, per_image["correct"])) / len(per_image["correct"])
        metrics.update(per_category)
    for key, values in per_image.items():
        if key.startswith("reward/"):
            metrics[key] = float(torch.tensor(list(values), dtype=torch.float32).mean())
    return metrics


def merge_columns(parts: Sequence[dict[str, list]]) -> dict[str, list]:
    """Per-unit columns (in unit order) -> one column per key."""
    merged: dict[str, list] = {}
    for part in parts:
        for key, values in part.items():
            merged.setdefault(key, []).extend(values)
    return merged


def score_images(
    images: Tensor,
    prompts: Sequence[str],
    *,
    world: bool,
    rewards: dict[str, RewardFn] | None = None,
    per_image: dict[str, list] | None = None,
) -> dict[str, float]:
    """Metrics without a prefix (summarise_images) of images scored in one call; per_image: a dict to fill
    with each image's results, in order."""
    columns = score_unit(images, prompts, world=world, rewards=rewards)
    if per_image is not None:
        per_image.update(columns)
    return summarise_images(columns)


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
    larger evaluation at the end.

    Split across ranks: with a process group (`dist`: leapalign.parallel's contexts) every rank samples and
    scores its share of the sampling units (`rank_share`) and the per-image results are gathered in unit
    order, so every rank returns what one rank alone computes (the units are the same batches). lockstep
    (sharded weights, FSDP2: every forward is a collective) pads the shorter shares with a repeat of their
    last unit, whose results are dropped, so every rank makes the same number of model calls."""

    def __init__(self, cfg: Config, reward_fn: RewardFn | None, dist=None, lockstep: bool = False):
        assert cfg.eval.prompts is not None
        self.cfg = cfg
        self.curve_size = cfg.eval.every_num_prompts
        final = max(cfg.eval.final_num_prompts, self.curve_size)
        self.final_prompts = load_eval_prompts(cfg.eval.prompts, final)
        self.prompts = self.final_prompts[: self.curve_size]
        self.world = is_world_prompt_set(self.final_prompts)
        self.rewards = {cfg.reward.name: reward_fn} if cfg.eval.reward and reward_fn is not None else {}
        self.rank, self.world_size = (dist.rank, dist.world_size) if dist is not None else (0, 1)
        self.dist, self.lockstep = dist, lockstep
        self.last_prompts: list[str] = []
        self.last_images: dict[str, list] = {}  # per image, for OUTPUT/heldout/step_<n>.parquet
        self.last_share = 0  # units this rank sampled in the last evaluation (padding excluded)

    def __call__(self, policy: FluxPolicy, final: bool = False) -> dict[str, float]:
        prompts = self.final_prompts if final else self.prompts
        units = eval_units(len(prompts), 1, self.cfg.eval.batch_size)
        mine = rank_share(len(units), self.rank, self.world_size)
        calls = -(-len(units) // self.world_size) if self.lockstep else len(mine)
        noise = noise_set(self.cfg.eval.prompts)
        results: dict[int, dict[str, list]] = {}
        padding = [mine[-1] if mine else 0] * (calls - len(mine))
        for call, k in enumerate([*mine, *padding]):
            images = sample_unit(policy, self.cfg, prompts, units[k], noise)
            if call < len(mine):  # a padding call only keeps the ranks' forwards in step: not scored
                unit_prompts = [prompts[i] for i in units[k].indices]
                results[k] = score_unit(images, unit_prompts, world=self.world, rewards=self.rewards)
        self.last_share = len(mine)
        if self.world_size > 1:  # every rank gets every rank's results (small: a few numbers per image)
            gathered: dict[int, dict[str, list]] = {}
            for part in self.dist.all_gather_object(results):
                gathered.update(part)
            results = gathered
        assert sorted(results) == list(range(len(units))), f"units {sorted(results)} of {len(units)}"
        per_image = merge_columns([results[k] for k in range(len(units))])
        self.last_prompts, self.last_images = [prompts[i] for u in units for i in u.indices], per_image
        metrics = summarise_images(per_image)
        if not final or len(prompts) == self.curve_size:
            return {f"eval/{key}": value for key, value in metrics.items()}
        curve = summarise_images({key: values[: self.curve_size] for key, values in per_image.items()})
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
    """A checked `leapalign eval` request: nothing sampled or written yet. Several weights (checkpoints) are
    each sampled on the same units (`units`): the same prompts and noise, a paired comparison."""

    weights: list[str]  # "base", LoRA folders, transformer folders, run folders
    names: list[str]  # one per weights: its output folder's name (unique)
    prompts_path: str
    prompts: list[str]
    metrics: list[str]
    rewards: dict[str, RewardFn]  # built in this process (the Ray Data job serves or builds its own)
    world: bool

    def units(self, cfg: Config) -> list[EvalUnit]:
        return eval_units(len(self.prompts), cfg.eval.images_per_prompt, cfg.eval.batch_size)

    @property
    def noise(self) -> int:
        return noise_set(self.prompts_path)


def weights_names(weights: Sequence[str]) -> list[str]:
    """Output folder names: "base", or the weights folder's name; a name taken twice gets -2, -3 ..."""
    names: list[str] = []
    for w in weights:
        name = "base" if w == "base" else Path(w).resolve().name
        stem, n = name, 2
        while name in names:
            name, n = f"{stem}-{n}", n + 1
        names.append(name)
    return names


def plan_eval(
    cfg: Config,
    weights: str | Path | Sequence[str | Path],
    prompts_path: str,
    metrics: Sequence[str] | None,
    num_prompts: int | None,
    build_rewards: bool = True,
) -> EvalPlan:
    """Everything the user can get wrong (weights, prompts, metric names), checked before any work.
    build_rewards=False: the reward names are checked but no model is loaded (the Ray Data job's actors or
    Serve replicas load them)."""
    from leapalign.rewards.base import resolve_reward

    listed = [str(weights)] if isinstance(weights, str | Path) else [str(w) for w in weights]
    if not listed:
        raise ValueError(
            "no weights to evaluate: give 'base', a LoRA folder, a transformer folder or a run folder"
        )
    for w in listed:
        resolve_weights(w, cfg.eval.use_ema)
    prompts = load_eval_prompts(prompts_path, num_prompts or cfg.eval.num_prompts)
    world = is_world_prompt_set(prompts)
    metrics = list(metrics) if metrics else (["world"] if world else []) + [cfg.reward.name]
    if "world" in metrics and not world:
        raise ValueError(f"metric 'world' needs miniature-world prompts; {prompts_path} has others")
    for name in metrics:
        if name != "world":
            resolve_reward(name)  # an unknown name fails here, before anything loads
    rewards = build_metric_rewards(cfg, metrics) if build_rewards else {}
    return EvalPlan(
        listed, weights_names(listed), prompts_path, prompts, metrics, rewards, "world" in metrics
    )


def evaluate_weights(cfg: Config, plan: EvalPlan, which: int, out_dir: Path, tracker=None) -> EvalReport:
    """Sample the plan's prompts with fixed noise from its weights number `which` in this process; score; save
    images, table, summary. `leapalign eval --actors N` does the same on Ray Data actors
    (leapalign.distributed.data_jobs): the same units, so the same table."""
    from leapalign.images import to_uint8

    policy = load_policy(cfg, plan.weights[which])
    images, parts = [], []
    for unit in tqdm(plan.units(cfg), desc=f"eval {plan.names[which]}", leave=False):
        unit_images = sample_unit(policy, cfg, plan.prompts, unit, plan.noise)
        unit_prompts = [plan.prompts[i] for i in unit.indices]
        parts.append(score_unit(unit_images, unit_prompts, world=plan.world, rewards=plan.rewards))
        images.append(to_uint8(unit_images))
    per_image = {**unit_columns(plan, cfg), **merge_columns(parts)}
    return write_eval_folder(plan, which, out_dir, np.concatenate(images), per_image, tracker)


def unit_columns(plan: EvalPlan, cfg: Config) -> dict[str, list]:
    """The table's first columns: each image's prompt, its position in the prompt set and its replicate."""
    units = plan.units(cfg)
    return {
        "prompt": [plan.prompts[i] for u in units for i in u.indices],
        "prompt_index": [i for u in units for i in u.indices],
        "replicate": [u.replicate for u in units for _ in u.indices],
    }


def write_eval_folder(
    plan: EvalPlan, which: int, out_dir: Path, images: np.ndarray, per_image: dict[str, list], tracker=None
) -> EvalReport:
    """One weights' evaluation on disk: images/NNNNN.png, eval.parquet (one row per image, in unit order:
    image, prompt, prompt_index, replicate, then its results), summary.json, grid.png; logged to `tracker`
    when given. images: [N, H, W, 3] uint8."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from leapalign.images import make_grid, save_grid
    from leapalign.io import atomic_path

    columns = {"image": [f"images/{i:05d}.png" for i in range(len(images))], **per_image}
    summary = summarise_images(per_image)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    for array, name in zip(images, columns["image"], strict=True):
        with atomic_path(out_dir / name) as tmp:
            Image.fromarray(array).save(tmp, format="PNG")
    table_path = out_dir / "eval.parquet"
    with atomic_path(table_path) as tmp:
        pq.write_table(pa.table(columns), tmp)
    with atomic_path(out_dir / "summary.json") as tmp:
        tmp.write_text(
            json.dumps({"weights": plan.weights[which], "prompts": plan.prompts_path, **summary}, indent=2)
        )
    shown = min(8, len(images))
    picture = torch.from_numpy(np.ascontiguousarray(images[:shown])).permute(0, 3, 1, 2).float() / 255
    save_grid(make_grid([picture], columns["prompt"][:shown]), out_dir / "grid.png")
    if tracker is not None:
        tracker.log_params(
            {"weights": plan.weights[which], "prompts": plan.prompts_path, "metrics": ",".join(plan.metrics)}
        )
        tracker.log_metrics(summary, step=0)
        for name in ("eval.parquet", "summary.json", "grid.png"):
            tracker.log_artifact(out_dir / name)
    return EvalReport(summary, table_path, out_dir)
