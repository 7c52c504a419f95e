"""`TrainingRun`: the state every training recipe shares, whatever the method.

    TrainingRun        the policy (leapalign.finetune), optimizer, EMA, random streams, compute meter,
                       evaluator, logging, grids, checkpoints: `apply_gradients` (clip, step, EMA; gradients
                       already reduced by DDP / FSDP2, leapalign.parallel), `end_step` (log, evaluate,
                       checkpoint), `finish` (weights, grids)
    StepEnd            what a step hook hears after every update (local checkpoints, Ray's reports)

Random streams are global: every rank holds the same prompt order and noise streams and draws for the
global batch, keeping its slice (methods.common.StepRandomness), so N workers with batch B compute what
one worker with batch N x B computes.

A recipe (leapalign.recipes: direct for the direct-gradient methods, grpo for GRPO, forward for DiffusionNFT
and AWM) is the visible loop that uses it; `leapalign.train.train` builds it and picks the recipe. What the
run writes on disk is leapalign.run_folder. Ray, when used, only passes a distributed context and a
checkpoint hook (leapalign.distributed).
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from leapalign.compute import ComputeMeter, PhaseTimer
from leapalign.config import Config, flatten_config, save_config
from leapalign.costs import measure_unit_costs
from leapalign.data import load_prompts
from leapalign.finetune import EMA, setup_policy
from leapalign.images import make_grid, save_grid
from leapalign.io import atomic_path
from leapalign.logs import STEP_LOG
from leapalign.methods import METHODS
from leapalign.methods.common import StepRandomness
from leapalign.numerics import use_cpu_isa
from leapalign.parallel import (
    LocalContext,
    Parallel,
    is_dcp_checkpoint,
    load_state,
    resolve_strategy,
    save_state,
)
from leapalign.progress import ProgressScale, make_bar, show_step
from leapalign.rewards.base import RewardFn
from leapalign.run_folder import (
    HELDOUT_DIR,
    LocalCheckpoints,
    StepEnd,
    StepHook,
    append_jsonl,
    save_trained_weights,
    save_transformer_state,
    trim_metrics_log,
)
from leapalign.streams import PromptOrder, stream, stream_seed
from leapalign.tracking import NullTracker, Tracker

log = logging.getLogger("leapalign")


def to_floats(metrics: dict[str, float | Tensor]) -> dict[str, float]:
    """Metric tensors to floats with one device sync for all of them (not one `.item()` each)."""
    keys = [k for k, v in metrics.items() if isinstance(v, Tensor)]
    values = (
        torch.stack([metrics[k].detach().float().reshape(()).cpu() for k in keys]).tolist() if keys else []
    )
    out = {k: float(v) for k, v in metrics.items() if not isinstance(v, Tensor)}
    out.update(zip(keys, values, strict=True))
    return out


def step_line(step: int, iterations: int, metrics: dict[str, float]) -> str:
    """`step 12/200 loss 1.2345 reward/mean 0.1234 grad_norm 3.2100 nfe_total 2,400`: the run log's line."""
    shown = " ".join(f"{k} {metrics[k]:.4f}" for k in ("loss", "reward/mean", "grad_norm") if k in metrics)
    held_out = f"eval/overall {metrics['eval/overall']:.4f}" if "eval/overall" in metrics else ""
    nfe = f"nfe_total {metrics.get('compute/nfe_total', 0.0):,.0f}"
    return " ".join(part for part in (f"step {step}/{iterations}", shown or "skipped", held_out, nfe) if part)


def mean_metrics(records: list[dict[str, float]]) -> dict[str, float]:
    keys = dict.fromkeys(k for r in records for k in r)
    return {k: sum(r[k] for r in records if k in r) / sum(k in r for r in records) for k in keys}


# ----------------------------------------------------------------------------- the shared run state


@dataclass
class TrainResult:
    history: list[dict[str, float]] = field(default_factory=list)  # one metrics dict per update
    output_dir: Path | None = None
    run_id: str | None = None


class TrainingRun:
    """The state every recipe shares; a recipe calls `apply_gradients` and `end_step` from its own loop."""

    def __init__(
        self,
        cfg: Config,
        *,
        reward_fn: RewardFn | None = None,
        tracker: Tracker | None = None,
        dist: LocalContext | None = None,
        device: str | None = None,
        on_step_end: StepHook | None = None,
        progress: bool = True,
    ):
        """reward_fn: built from cfg.reward when None (checked; gradients as when served); tracker: none;
        dist: one process; device: cuda when there is one; on_step_end: local checkpoints."""
        from leapalign.evaluation import EvalSchedule, HeldOutEvaluator
        from leapalign.rewards.configured import build_configured_reward

        reward_fn = reward_fn or build_configured_reward(cfg.reward)
        tracker = tracker or NullTracker()
        dist = dist or LocalContext()
        self.cfg, self.reward_fn, self.tracker, self.dist = cfg, reward_fn, tracker, dist
        self.out_dir = Path(cfg.train.output_dir)
        prompts = load_prompts(cfg.train.prompts)
        use_cpu_isa(cfg.train.cpu_isa)  # a Ray worker has it from its runtime_env; this checks it
        if cfg.train.torch_threads:
            torch.set_num_threads(cfg.train.torch_threads)
        torch.manual_seed(stream_seed(cfg.train.seed, "init"))  # what draws from the global RNG: LoRA init
        self.policy = setup_policy(cfg, device)
        # FLOPs per image of each model, on this run's shapes (before any wrapper: the plain modules).
        self.costs = measure_unit_costs(self.policy, reward_fn, cfg, prompts[0])
        # Data parallel: DDP (LoRA) or FSDP2 (full fine-tuning) over the workers' process group.
        strategy = "none"
        if dist.has_process_group:
            strategy = resolve_strategy(cfg.ray.strategy, dist.world_size, cfg.finetune.mode)
        elif cfg.ray.strategy not in ("auto", "none"):
            log.info("ray.strategy=%s needs Ray workers; this one process trains alone", cfg.ray.strategy)
        self.parallel = Parallel(
            strategy, world_size=dist.world_size, rank=dist.rank, cpu_offload=cfg.ray.cpu_offload
        )
        self.policy.grad_module = self.parallel.wrap(self.policy.transformer, self.policy.device)
        if self.parallel.sharded and self.policy.compiled is not None:
            log.info("sampler.compile: sharded (fsdp2) weights run their no-grad forwards eagerly")
            self.policy.compiled = None
        # After wrapping: under FSDP2 the parameters are DTensors holding this rank's shard.
        named = [(n, p) for n, p in self.policy.transformer.named_parameters() if p.requires_grad]
        self.param_names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=cfg.optim.lr,
            betas=(cfg.optim.beta1, cfg.optim.beta2),
            weight_decay=cfg.optim.weight_decay,
        )
        self.ema = EMA(self.params, cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None
        # A method's own copy of the trained weights, beside the EMA and checkpointed with the run: DiffusionNFT's
        # old policy (it samples the rollouts), AWM's EMA policy (its KL target). Both start as the initial
        # weights; the recipe moves them with its scheduled decay (swap it in with `policy_copy.swapped()`).
        self.policy_copy = EMA(self.params, 0.0) if METHODS[cfg.method.name].weight_copy else None
        # Global streams: the same seed on every rank, draws for the global batch, each rank its slice.
        self.prompt_order = PromptOrder(
            prompts, cfg.train.batch_size, cfg.train.seed, dist.rank, dist.world_size
        )
        self.rng = StepRandomness.seeded(cfg.train.seed, dist.rank, dist.world_size)
        self.sigmas = self.policy.sigmas(cfg.sampler.num_steps, cfg.sampler.height, cfg.sampler.width)
        self.meter = ComputeMeter(checkpointing=cfg.finetune.gradient_checkpointing)
        self.policy.meter = self.meter
        self.timer = PhaseTimer(self.policy.device)
        self.grid_prompts = prompts[: cfg.train.num_samples]
        # When to evaluate: decided alike on every rank. Every rank samples its share of the held-out prompts
        # and the results are gathered (the numbers of one rank); sharded weights keep the ranks' model calls
        # in lockstep (every forward is a collective). Rank 0 logs.
        self.eval_schedule = (
            EvalSchedule(cfg.eval.every, cfg.eval.every_nfe) if cfg.eval.during_training else None
        )
        self.evaluator = (
            HeldOutEvaluator(cfg, reward_fn, dist, lockstep=self.parallel.sharded)
            if cfg.eval.during_training
            else None
        )
        self.on_step_end = on_step_end or LocalCheckpoints(
            self.out_dir, cfg.train.checkpoint_every, cfg.train.keep_checkpoints
        )
        self.progress = progress
        self.start_step = 0
        self.nfe_total = 0
        self.flops_total = 0.0
        self.time_total = 0.0
        self.wall_before = 0.0  # wall seconds of the run before this process (a resumed run's earlier part)
        self.wall_start = time.perf_counter()
        self.result = TrainResult(output_dir=self.out_dir, run_id=getattr(tracker, "run_id", None))
        self.stop_requested = False  # set by a Ctrl-C in a local run (train.finish_step_on_interrupt)
        self.stopped_at_step = 0

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self, step: int) -> dict[str, Any]:
        """A one-process checkpoint (`.pt`): tensors and train state in one file."""
        return {
            "params": [p.detach().cpu() for p in self.params],
            "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "policy_copy": self.policy_copy.state_dict() if self.policy_copy is not None else None,
            **self.train_state(step),
        }

    def train_state(self, step: int) -> dict[str, Any]:
        """Everything but the tensors: the same on every rank (global streams); a DCP checkpoint's
        train_state.pt."""
        return {
            "step": step,
            "sampler": self.prompt_order.state_dict(),  # the key older checkpoints carry
            "randomness": self.rng.state_dict(),
            "nfe_total": self.nfe_total,
            "flops_total": self.flops_total,
            "time_total": self.time_total,
            "wall_total": self.wall_seconds(),
            "eval_nfe_mark": self.eval_schedule.last_nfe_mark if self.eval_schedule else 0,
            "world_size": self.dist.world_size,
            "global_batch": self.cfg.train.batch_size * self.dist.world_size,
        }

    def ema_shadow(self) -> dict[str, Tensor] | None:
        return dict(zip(self.param_names, self.ema.shadow, strict=True)) if self.ema is not None else None

    def copy_shadow(self) -> dict[str, Tensor] | None:
        copy = self.policy_copy
        return dict(zip(self.param_names, copy.shadow, strict=True)) if copy is not None else None

    def save_checkpoint(self, path: Path, step: int) -> None:
        """A `.pt` file (one process): torch.save to a temp file, then rename, so an interrupted write never
        replaces a good checkpoint. Any other path: a DCP folder, this rank's shards (every rank calls it)."""
        if path.suffix == ".pt":
            with atomic_path(path) as tmp:
                torch.save(self.state_dict(step), tmp)
            return
        save_state(
            path, self.policy.transformer, self.optimizer, self.ema_shadow(), self.train_state(step),
            self.dist.is_main, copy_shadow=self.copy_shadow(),
        )  # fmt: skip

    def load_checkpoint(self, path: Path) -> None:
        if is_dcp_checkpoint(path):
            state = load_state(
                path, self.policy.transformer, self.optimizer, self.ema_shadow(), self.copy_shadow()
            )
            if state["global_batch"] != self.cfg.train.batch_size * self.dist.world_size:
                log.warning(
                    "checkpoint %s was written with a global batch of %d (%d workers), this run's is %d: the "
                    "numbers will differ from the uninterrupted run's (set train.batch_size to keep them)",
                    path, state["global_batch"], state["world_size"],
                    self.cfg.train.batch_size * self.dist.world_size,
                )  # fmt: skip
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            with torch.no_grad():
                for p, saved in zip(self.params, state["params"], strict=True):
                    p.copy_(saved)
            self.optimizer.load_state_dict(state["optimizer"])
            if self.ema is not None and state.get("ema") is not None:
                self.ema.load_state_dict(state["ema"])
            if self.policy_copy is not None and state.get("policy_copy") is not None:
                self.policy_copy.load_state_dict(state["policy_copy"])
        self.prompt_order.load_state_dict(state["sampler"])
        self.rng.load_state_dict(state["randomness"])
        self.start_step = int(state["step"])
        self.nfe_total = int(state["nfe_total"])
        self.flops_total = float(state["flops_total"])
        self.time_total = float(state["time_total"])
        self.wall_before = float(state.get("wall_total", self.time_total))
        if self.eval_schedule is not None:
            self.eval_schedule.last_nfe_mark = int(state["eval_nfe_mark"])
        log.info("resumed from %s at step %d", path, self.start_step)

    # ------------------------------------------------------------------ start

    def begin(self, resume_from: Path | None) -> None:
        """Restore a checkpoint (if any), write the run folder's config and first grid; sets `steps`."""
        self.wall_start = time.perf_counter()
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        cfg, dist = self.cfg, self.dist
        # The ranks that run the grids' forwards (all of them when weights are sharded).
        forwards = dist.is_main or self.parallel.sharded
        if self.start_step == 0 and forwards:
            before = self.sample_grid_images()
        # the curve starts at the base model, at zero compute (every rank: each samples its share)
        before_eval = self.evaluate(0) if self.start_step == 0 and self.evaluator is not None else None
        if dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out_dir / "config.yaml")
            self.tracker.log_params({**flatten_config(cfg), **self.costs.as_metrics()})
            self.tracker.log_artifact(self.out_dir / "config.yaml")
            if self.start_step == 0:
                (self.out_dir / "metrics.jsonl").unlink(missing_ok=True)
                save_grid(make_grid([before], self.grid_prompts), self.out_dir / "samples_before.png")
                self.tracker.log_artifact(self.out_dir / "samples_before.png", "samples")
                if before_eval is not None:
                    self.log_step(0, before_eval)
            else:
                trim_metrics_log(self.out_dir / "metrics.jsonl", self.start_step)
        self.scale = ProgressScale.of(cfg)
        self.bar = make_bar(
            self.scale,
            cfg.method.name,
            disable=not (self.progress and dist.is_main),
            initial=self.scale.position(
                self.start_step,
                {"compute/nfe_total": self.nfe_total, "compute/flops_total": self.flops_total},
            ),
        )
        self.steps = range(self.start_step, cfg.train.iterations)

    # ------------------------------------------------------------------ one update

    def begin_update(self) -> None:
        self.meter.reset()
        self.timer.reset()

    def apply_gradients(self, step: int, ok: bool, reason: str | None) -> dict[str, float]:
        """Clip, step, EMA; skip (weights untouched) when any rank is not ok.

        The gradients are already averaged over ranks (DDP's hooks or FSDP2's reduce-scatter, in the last
        micro-batch's backward). `ok` must already agree on every rank (the recipe votes before backward).
        A non-finite gradient norm, the same on every rank (a global norm), also skips.
        """
        with self.timer.phase("optimizer"):
            grad_norm = float("nan")
            if ok:
                for p in self.params:
                    if p.grad is None:  # a weight the loss did not reach steps with a zero gradient
                        p.grad = torch.zeros_like(p)
                grad_norm = self.parallel.clip_grad_norm(self.params, self.cfg.optim.max_grad_norm)
                ok = math.isfinite(grad_norm)
                reason = reason or "non-finite gradient (here or on another worker)"
            if ok:
                self.optimizer.step()
                if self.ema is not None:
                    self.ema.update()
            self.optimizer.zero_grad(set_to_none=True)
        if not ok:
            log.warning("step %d skipped, weights untouched: %s", step + 1, reason)
            return {"skipped": 1.0}
        # grad_norm is the global norm BEFORE clipping; optim/clipped says whether clipping scaled it down.
        clipped = float(grad_norm > self.cfg.optim.max_grad_norm)
        return {"grad_norm": grad_norm, "optim/clipped": clipped, "skipped": 0.0}

    def end_step(self, step: int, metrics: dict[str, float]) -> bool:
        """Compute, logging, grids, evaluation and the checkpoint hook after update `step` (0-based).

        Returns True when the run is over (last iteration, or the compute budget train.max_nfe or
        train.max_flops spent).
        """
        cfg, dist = self.cfg, self.dist
        metrics = dist.all_mean(metrics)  # the global batch's loss and rewards, the same on every rank
        # Every worker's compute, the same numbers on every rank (FLOPs: exact integers in float64).
        nfe, flops = dist.sum_counts([self.meter.nfe, round(self.meter.flops(self.costs))])
        self.nfe_total += nfe
        self.flops_total += flops
        done = (
            step + 1 >= cfg.train.iterations
            or 0 < cfg.train.max_nfe <= self.nfe_total
            or 0 < cfg.train.max_flops <= self.flops_total
        )
        if self.stop_requested:  # Ctrl-C in a local run: this step is the last, and it is checkpointed
            done, self.stopped_at_step = True, step + 1
        schedule = self.eval_schedule
        evaluated = schedule is not None and (schedule.due(step + 1, self.nfe_total) or done)
        held_out = self.evaluate(step + 1, final=done) if evaluated and self.evaluator is not None else {}
        step_time = sum(self.timer.seconds.values())
        self.time_total += step_time
        metrics = {
            **metrics,
            **self.timer.metrics(),
            "time/step_s": step_time,
            "time/total_s": self.time_total,
            "time/wall_s": self.wall_seconds(),
            "compute/nfe": float(nfe),
            "compute/nfe_total": float(self.nfe_total),
            "compute/flops": float(flops),
            "compute/flops_total": self.flops_total,
            **held_out,
        }
        self.result.history.append(metrics)
        grid_due = cfg.train.sample_every and (step + 1) % cfg.train.sample_every == 0
        images = self.sample_grid_images() if grid_due and (dist.is_main or self.parallel.sharded) else None
        if dist.is_main:
            show_step(self.bar, self.scale, step + 1, metrics)
            STEP_LOG.info(step_line(step + 1, cfg.train.iterations, metrics))
            self.log_step(step + 1, metrics, force=done)
            if images is not None:
                path = self.out_dir / f"samples_step{step + 1:05d}.png"
                self.tracker.log_artifact(save_grid(make_grid([images], self.grid_prompts), path), "samples")

        def save(path: Path) -> None:
            # Every step up to the checkpoint is in MLflow before the checkpoint exists: a restart from it
            # replays only later steps, which ResumableTracker then logs once.
            self.tracker.flush()
            self.save_checkpoint(path, step + 1)

        self.on_step_end(StepEnd(step + 1, metrics, save, done, evaluated))
        return done

    def wall_seconds(self) -> float:
        """Wall seconds since the run started (its first start; a resumed run adds its earlier part)."""
        return self.wall_before + time.perf_counter() - self.wall_start

    def log_step(self, step: int, metrics: dict[str, float], force: bool = False) -> None:
        # The x-axes of compute curves.
        metrics = {
            **metrics,
            "compute/nfe_total": float(self.nfe_total),
            "compute/flops_total": self.flops_total,
        }
        append_jsonl(self.out_dir / "metrics.jsonl", {"step": step, **metrics})
        has_eval = any(k.startswith("eval/") for k in metrics)
        if step % self.cfg.train.log_every == 0 or force or has_eval:
            self.tracker.log_metrics(metrics, step=step)

    # ------------------------------------------------------------------ evaluation and outputs

    def weights_for_eval(self):
        return self.ema.swapped() if self.ema is not None and self.cfg.eval.use_ema else nullcontext()

    def evaluate(self, step: int, final: bool = False) -> dict[str, float]:
        """Held-out metrics (the run's last evaluation: eval.final_num_prompts of them too); rank 0 also
        writes each image's results to OUTPUT/heldout/step_<n>.parquet."""
        from leapalign.evaluation import write_image_results

        with self.timer.phase("eval"), self.weights_for_eval():
            metrics = self.evaluator(self.policy, final=final)
            if self.dist.is_main:
                path = self.out_dir / HELDOUT_DIR / f"step_{step:06d}.parquet"
                write_image_results(path, self.evaluator.last_prompts, self.evaluator.last_images)
            return metrics

    def sample_grid_images(self) -> Tensor:
        """Sample grids: the run's "grid" stream (the same noise before, during and after), evaluation steps."""
        cfg = self.cfg
        return self.policy.generate(
            self.grid_prompts,
            num_steps=cfg.sampler.eval_num_steps,
            height=cfg.sampler.height,
            width=cfg.sampler.width,
            guidance_scale=cfg.sampler.guidance_scale,
            generator=stream(cfg.train.seed, "grid"),
            max_sequence_length=cfg.model.max_sequence_length,
        )

    def export_weights(self, folder: Path) -> None:
        """The trained weights in the diffusers format (rank 0 writes); sharded weights are gathered first."""
        if self.parallel.sharded:
            state = self.parallel.full_model_state(self.policy.transformer)  # collective: every rank
            if self.dist.is_main:
                save_transformer_state(self.policy.transformer, state, folder)
        elif self.dist.is_main:
            save_trained_weights(self.policy, self.cfg, folder)

    def finish(self) -> TrainResult:
        """Trained (and EMA) weights, the before/after grid, all logged to the tracker (rank 0).

        Sharded weights (fsdp2): every rank takes part in the export's gather and the grids' forwards.
        """
        self.bar.close()
        if not (self.dist.is_main or self.parallel.sharded):
            return self.result
        cfg, out_dir, tracker = self.cfg, self.out_dir, self.tracker
        name = "lora" if cfg.finetune.mode == "lora" else "transformer"
        self.export_weights(out_dir / name)
        rows, labels = [self.sample_grid_images()], ["trained"]
        if self.ema is not None:
            with self.ema.swapped():
                self.export_weights(out_dir / f"{name}_ema")
                rows.append(self.sample_grid_images())
                labels.append("EMA")
        if not self.dist.is_main:
            return self.result
        tracker.log_artifact(out_dir / name)
        if self.ema is not None:
            tracker.log_artifact(out_dir / f"{name}_ema")
        save_grid(make_grid(rows, self.grid_prompts, labels), out_dir / "samples_after.png")
        tracker.log_artifact(out_dir / "samples_after.png", "samples")
        tracker.log_artifact(out_dir / "metrics.jsonl")
        return self.result
