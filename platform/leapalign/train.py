"""The training loop: LeapAlign updates on a diffusers Flux, in one process or one Ray Train worker.

Read top to bottom: `setup_policy` (load + LoRA/full), `leapalign_micro_step` (one micro-batch, the
paper's Eq. 4-13), `train` (accumulate, clip, step, EMA, log, checkpoint, save). Ray, when used, only
calls `train` with a distributed context and a step hook (leapalign.distributed).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from leapalign.config import Config, FinetuneConfig, flatten_config, save_config
from leapalign.data import load_prompts
from leapalign.images import make_grid, save_grid
from leapalign.methods.leapalign import (
    hinge_loss,
    leap_pair_probabilities,
    rollout_with_leaps,
    sample_leap_pair,
    similarity_weight,
)
from leapalign.models.flux import FluxPolicy
from leapalign.rewards.base import RewardError, RewardFn, build_reward, check_rewards
from leapalign.tracking import MLflowTracker, NullTracker, Tracker

log = logging.getLogger("leapalign")


# ----------------------------------------------------------------------------- distributed context


class LocalContext:
    """One process. Ray Train workers use TorchDistContext (same methods over torch.distributed)."""

    rank = 0
    world_size = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_mean_(self, tensors: Sequence[Tensor]) -> None:
        pass

    def all_true(self, flag: bool) -> bool:
        return flag


class TorchDistContext(LocalContext):
    """Data parallel over an initialised torch.distributed process group (gloo on CPU, NCCL on GPU)."""

    def __init__(self):
        import torch.distributed as dist

        self._dist = dist
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def all_reduce_mean_(self, tensors: Sequence[Tensor]) -> None:
        flat = torch.cat([t.reshape(-1) for t in tensors])  # one collective for all grads
        self._dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    def all_true(self, flag: bool) -> bool:
        value = torch.tensor([1.0 if flag else 0.0])
        self._dist.all_reduce(value, op=self._dist.ReduceOp.MIN)
        return bool(value.item() > 0)


# ----------------------------------------------------------------------------- model setup


def setup_policy(cfg: Config, device: str | None = None) -> FluxPolicy:
    """Load the Flux folder and make the transformer trainable (LoRA adapter or every weight)."""
    device_obj = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    mixed = cfg.finetune.mixed_precision
    autocast = device_obj.type == "cuda" if mixed == "auto" else mixed == "bf16"
    policy = FluxPolicy.from_pretrained(
        cfg.model.path,
        dtype=cfg.model.dtype,
        device=device_obj,
        revision=cfg.model.revision,
        autocast=autocast,
    )
    policy.check_resolution(cfg.sampler.height, cfg.sampler.width)
    apply_finetune(policy.transformer, cfg.finetune)
    return policy


def apply_finetune(transformer: torch.nn.Module, cfg: FinetuneConfig) -> list[torch.nn.Parameter]:
    """LoRA via peft or full fine-tuning; trainable weights kept in fp32 (master weights)."""
    transformer.requires_grad_(False)
    if cfg.mode == "lora":
        from peft import LoraConfig

        transformer.add_adapter(
            LoraConfig(
                r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=list(cfg.lora_target_modules)
            )
        )
    else:
        transformer.requires_grad_(True)
    if cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    params = trainable_parameters(transformer)
    if not params:
        raise ValueError(
            f"finetune: nothing to train; no module matches lora_target_modules={cfg.lora_target_modules}"
        )
    for p in params:
        p.data = p.data.float()
    transformer.train()
    return params


def trainable_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


# ----------------------------------------------------------------------------- EMA and prompt order


class EMA:
    """Exponential moving average of the trained weights (fp32); evaluate with `swapped()`."""

    def __init__(self, params: Sequence[torch.nn.Parameter], decay: float):
        self.params = list(params)
        self.decay = decay
        self.shadow = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params, strict=True):
            s.lerp_(p.detach().float(), 1.0 - self.decay)

    @contextmanager
    def swapped(self):
        """Inside: the model holds the EMA weights; afterwards the trained ones again."""
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow, strict=True):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved, strict=True):
                    p.copy_(s)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "shadow": [s.cpu() for s in self.shadow]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.shadow = [s.to(p.device) for s, p in zip(state["shadow"], self.params, strict=True)]


class PromptSampler:
    """Shuffled passes over the prompt list; its state is part of a checkpoint."""

    def __init__(self, prompts: list[str], batch_size: int, seed: int):
        self.prompts = prompts
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.order: list[int] = []

    def next_batch(self) -> list[str]:
        batch = []
        for _ in range(self.batch_size):
            if not self.order:
                self.order = torch.randperm(len(self.prompts), generator=self.generator).tolist()
            batch.append(self.prompts[self.order.pop()])
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "order": list(self.order)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.order = list(state["order"])


# ----------------------------------------------------------------------------- one micro-batch


@dataclass
class StepRandomness:
    """Separate streams so that changing one choice (e.g. the pair law) keeps the others' draws."""

    noise: torch.Generator
    pairs: torch.Generator

    @classmethod
    def seeded(cls, seed: int) -> StepRandomness:
        return cls(torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1))

    def state_dict(self) -> dict[str, Tensor]:
        return {"noise": self.noise.get_state(), "pairs": self.pairs.get_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.noise.set_state(state["noise"])
        self.pairs.set_state(state["pairs"])


def leapalign_micro_step(
    policy: FluxPolicy,
    prompts: list[str],
    reward_fn: RewardFn,
    cfg: Config,
    sigmas: Tensor,
    pair_probabilities: Tensor,
    randomness: StepRandomness,
) -> tuple[Tensor, dict[str, float]]:
    """The LeapAlign loss of one micro-batch (paper Eq. 4-13); the caller runs backward.

    Raises RewardError (before any backward) when the reward is non-finite or mis-shaped.
    """
    height, width = cfg.sampler.height, cfg.sampler.width
    t0 = time.perf_counter()
    # 1. Frozen text conditioning and the noise: no graph.
    cond = policy.encode_prompts(prompts, cfg.model.max_sequence_length)
    latents, image_ids = policy.prepare_latents(len(prompts), height, width, randomness.noise)  # [B, S, 4C]
    # 2. Full ODE rollout; graphs only at the leap steps k < j.
    k, j = sample_leap_pair(pair_probabilities, randomness.pairs)
    velocity = policy.velocity_fn(cond, image_ids, cfg.sampler.guidance_scale)
    leap = rollout_with_leaps(velocity, latents, sigmas, k, j, alpha=cfg.method.alpha)
    t1 = time.perf_counter()
    # 3. Reward on the real final image (or on x_hat_0 for the ablation); grads flow to the pixels.
    final = leap.x0 if cfg.method.reward_on == "final" else leap.x0_hat
    images = policy.decode(final, height, width)  # [B, 3, H, W] in [0, 1]
    rewards = reward_fn(images, prompts)  # [B]
    check_rewards(rewards, len(prompts), source=f"reward {cfg.reward.name!r}")
    # 4. Trajectory-similarity weight (no grad) and the hinge loss.
    weight = similarity_weight(leap.d_j, leap.d_0, cfg.method.tau, cfg.method.weighting)  # [B]
    loss = hinge_loss(rewards.float(), weight, cfg.method.hinge)
    t2 = time.perf_counter()
    metrics = {
        "loss": loss.item(),
        "reward/mean": rewards.mean().item(),
        "reward/std": rewards.std().item() if len(prompts) > 1 else 0.0,
        "leap/k": float(k),
        "leap/j": float(j),
        "leap/sigma_k": sigmas[k].item(),
        "leap/sigma_j": sigmas[j].item(),
        "leap/d_j": leap.d_j.mean().item(),
        "leap/d_0": leap.d_0.mean().item(),
        "weight/mean": weight.mean().item(),
        "time/rollout_s": t1 - t0,
        "time/reward_s": t2 - t1,
    }
    return loss, metrics


# ----------------------------------------------------------------------------- checkpoints and outputs


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """torch.save to a temp file, then rename: an interrupted write never replaces a good checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def save_trained_weights(policy: FluxPolicy, cfg: Config, out_dir: Path) -> Path:
    """LoRA in the diffusers format (FluxPipeline.load_lora_weights) or a transformer folder."""
    if cfg.finetune.mode == "lora":
        from diffusers import FluxPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(policy.transformer))
        # The adapter config travels with the weights: without it a loader assumes lora_alpha = rank.
        metadata = policy.transformer.peft_config["default"].to_dict()
        FluxPipeline.save_lora_weights(
            str(out_dir), transformer_lora_layers=layers, transformer_lora_adapter_metadata=metadata
        )
    else:
        policy.transformer.save_pretrained(str(out_dir))
    return out_dir


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    history: list[dict[str, float]] = field(default_factory=list)  # one metrics dict per optimizer step
    output_dir: Path | None = None
    run_id: str | None = None


StepHook = Callable[[int, dict[str, float], Callable[[Path], None]], None]


def sample_grid_images(policy: FluxPolicy, cfg: Config, prompts: list[str]) -> Tensor:
    """Evaluation samples: fixed noise (seeded apart from training), the evaluation step count."""
    return policy.generate(
        prompts,
        num_steps=cfg.sampler.eval_num_steps,
        height=cfg.sampler.height,
        width=cfg.sampler.width,
        guidance_scale=cfg.sampler.guidance_scale,
        generator=torch.Generator().manual_seed(cfg.train.seed + 10_000),
        max_sequence_length=cfg.model.max_sequence_length,
    )


def train(
    cfg: Config,
    *,
    reward_fn: RewardFn | None = None,
    tracker: Tracker | None = None,
    dist: LocalContext | None = None,
    resume_from: Path | None = None,
    on_step_end: StepHook | None = None,
    device: str | None = None,
    progress: bool = True,
) -> TrainResult:
    """Run cfg.train.iterations LeapAlign updates; returns the per-step metrics.

    resume_from: a checkpoint file written by this loop (via `on_step_end`'s save function); training
    continues at the step after it with the same weights, optimizer, EMA and random streams.
    """
    dist = dist or LocalContext()
    out_dir = Path(cfg.train.output_dir)
    prompts = load_prompts(cfg.train.prompts)
    reward_fn = reward_fn or build_reward(cfg.reward.name, cfg.reward.options)
    if cfg.train.torch_threads:
        torch.set_num_threads(cfg.train.torch_threads)
    torch.manual_seed(cfg.train.seed)
    policy = setup_policy(cfg, device)
    params = trainable_parameters(policy.transformer)
    optimizer = torch.optim.AdamW(
        params,
        lr=cfg.optim.lr,
        betas=(cfg.optim.beta1, cfg.optim.beta2),
        weight_decay=cfg.optim.weight_decay,
    )
    ema = EMA(params, cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None
    # Ranks see different prompts and noise; rank 0 of a 1-worker run equals the single-process run.
    rank_seed = cfg.train.seed + 1000 * dist.rank
    sampler = PromptSampler(prompts, cfg.train.batch_size, rank_seed)
    randomness = StepRandomness.seeded(rank_seed)
    sigmas = policy.sigmas(cfg.sampler.num_steps, cfg.sampler.height, cfg.sampler.width)
    pair_probabilities = leap_pair_probabilities(sigmas.cpu(), cfg.leap)
    grid_prompts = prompts[: cfg.train.num_samples]

    start_step = 0
    if resume_from is not None:
        state = torch.load(resume_from, map_location="cpu", weights_only=False)
        with torch.no_grad():
            for p, saved in zip(params, state["params"], strict=True):
                p.copy_(saved)
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        sampler.load_state_dict(
            state["sampler"][dist.rank] if isinstance(state["sampler"], list) else state["sampler"]
        )
        randomness.load_state_dict(
            state["randomness"][dist.rank] if isinstance(state["randomness"], list) else state["randomness"]
        )
        start_step = int(state["step"])
        log.info("resumed from %s at step %d", resume_from, start_step)

    tracker = tracker or NullTracker()
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
        tracker.log_params(flatten_config(cfg))
        tracker.log_artifact(out_dir / "config.yaml")
        if start_step == 0:
            (out_dir / "metrics.jsonl").unlink(missing_ok=True)
            before = sample_grid_images(policy, cfg, grid_prompts)
            save_grid(make_grid([before], grid_prompts), out_dir / "samples_before.png")
            tracker.log_artifact(out_dir / "samples_before.png", "samples")

    result = TrainResult(output_dir=out_dir, run_id=getattr(tracker, "run_id", None))
    bar = tqdm(
        range(start_step, cfg.train.iterations),
        initial=start_step,
        total=cfg.train.iterations,
        desc="leapalign",
        disable=not (progress and dist.is_main),
    )
    for step in bar:
        t_step = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        micro_metrics, skipped_reason = [], None
        t_backward = 0.0
        for _ in range(cfg.train.grad_accum):
            batch = sampler.next_batch()
            try:
                loss, metrics = leapalign_micro_step(
                    policy, batch, reward_fn, cfg, sigmas, pair_probabilities, randomness
                )
            except RewardError as err:
                skipped_reason = str(err)
                continue  # keep drawing the other micro-batches so the random streams stay aligned
            t0 = time.perf_counter()
            (loss / cfg.train.grad_accum).backward()
            t_backward += time.perf_counter() - t0
            micro_metrics.append(metrics)

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        # Every rank steps, or none does (weights stay identical across data-parallel workers).
        step_ok = dist.all_true(skipped_reason is None and all(bool(torch.isfinite(g).all()) for g in grads))
        if step_ok:
            dist.all_reduce_mean_(grads)
            for p, g in zip(params, grads, strict=True):
                p.grad = g
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm).item()
            step_ok = math.isfinite(grad_norm)  # same value on every rank after the all-reduce
        if step_ok:
            optimizer.step()
            if ema is not None:
                ema.update()
            metrics = {
                key: sum(m[key] for m in micro_metrics) / len(micro_metrics) for key in micro_metrics[0]
            }
            metrics.update({"grad_norm": grad_norm, "skipped": 0.0})
        else:
            reason = skipped_reason or "non-finite gradient (here or on another worker)"
            log.warning("step %d skipped, weights untouched: %s", step + 1, reason)
            metrics = {"skipped": 1.0}
        optimizer.zero_grad(set_to_none=True)
        metrics.update({"time/backward_s": t_backward, "time/step_s": time.perf_counter() - t_step})
        result.history.append(metrics)

        if dist.is_main:
            bar.set_postfix({k: f"{metrics[k]:.4f}" for k in ("loss", "reward/mean") if k in metrics})
            append_jsonl(out_dir / "metrics.jsonl", {"step": step + 1, **metrics})
            if (step + 1) % cfg.train.log_every == 0 or step + 1 == cfg.train.iterations:
                tracker.log_metrics(metrics, step=step + 1)
            if cfg.train.sample_every and (step + 1) % cfg.train.sample_every == 0:
                images = sample_grid_images(policy, cfg, grid_prompts)
                path = save_grid(
                    make_grid([images], grid_prompts), out_dir / f"samples_step{step + 1:05d}.png"
                )
                tracker.log_artifact(path, "samples")
        if on_step_end is not None:

            def write_checkpoint(path: Path, step: int = step) -> None:
                save_checkpoint(
                    path,
                    {
                        "step": step + 1,
                        "params": [p.detach().cpu() for p in params],
                        "optimizer": optimizer.state_dict(),
                        "ema": ema.state_dict() if ema is not None else None,
                        "sampler": sampler.state_dict(),
                        "randomness": randomness.state_dict(),
                    },
                )

            on_step_end(step + 1, metrics, write_checkpoint)

    if dist.is_main:
        finish_outputs(policy, cfg, ema, grid_prompts, out_dir, tracker)
    return result


def finish_outputs(
    policy: FluxPolicy, cfg: Config, ema: EMA | None, grid_prompts: list[str], out_dir: Path, tracker: Tracker
) -> None:
    """Trained (and EMA) weights, the before/after grid, all logged to the tracker."""
    name = "lora" if cfg.finetune.mode == "lora" else "transformer"
    save_trained_weights(policy, cfg, out_dir / name)
    tracker.log_artifact(out_dir / name)
    rows, labels = [sample_grid_images(policy, cfg, grid_prompts)], ["trained"]
    if ema is not None:
        with ema.swapped():
            save_trained_weights(policy, cfg, out_dir / f"{name}_ema")
            rows.append(sample_grid_images(policy, cfg, grid_prompts))
            labels.append("EMA")
        tracker.log_artifact(out_dir / f"{name}_ema")
    save_grid(make_grid(rows, grid_prompts, labels), out_dir / "samples_after.png")
    tracker.log_artifact(out_dir / "samples_after.png", "samples")
    tracker.log_artifact(out_dir / "metrics.jsonl")


def make_tracker(cfg: Config) -> Tracker:
    if not cfg.tracking.enabled:
        return NullTracker()
    return MLflowTracker(cfg.tracking.uri, cfg.tracking.experiment, cfg.tracking.run_name)
