"""The forward-process recipe: DiffusionNFT (method.name nft) and AWM (awm) on the shared training pieces.

One iteration (one `train.iterations` unit):
  1. plan      which grid sigmas each image is trained at (`plan_timesteps`, K per image)
  2. rollout   train.batch_size prompts x G images, deterministic Euler ODE, no graph; only the clean x_0
               is kept. DiffusionNFT samples with its old policy (the weight copy swapped in), AWM with the
               current weights
  3. rewards   values only, checked; every rank votes before any backward
  4. advantages (r - group mean) / (std + eps), std over the gathered batch or per group, clipped (GRPO's)
  5. noising   x_t = (1 - sigma_t) x_0 + sigma_t eps at every trained (image, sigma) pair
  6. no-grad   DiffusionNFT: v_old(x_t) under the old policy; AWM: v_ema(x_t) under its EMA policy (when
               ema_kl_beta > 0) and, for the samples of the rollout's later optimizer steps, log p_old under
               the rollout weights (the first step's is its own value: ratio exactly 1)
  7. updates   the samples split into updates_per_rollout shares, each one optimizer step: a graph on one
               transformer call at a time (the pairs of one sigma), the method's loss, backward at once;
               gradients cross ranks once per optimizer step, in its last backward
  8. copy      weight copy <- d copy + (1 - d) current, d = min(rate x optimizer steps, cap)
Rank-invariant as the GRPO recipe: the plan, the noise eps and the shuffle are drawn for the global batch
from the run's streams and each rank keeps its rows; the model calls of all ranks pair up (`ppo_work`).
The math lives in leapalign.methods.nft, .awm and .forward_process; this file only orders the calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from leapalign.evaluation import score_rewards
from leapalign.methods.awm import awm_log_prob, awm_loss
from leapalign.methods.common import StepRandomness
from leapalign.methods.forward_process import copy_decay, noise_latents, plan_timesteps
from leapalign.methods.grpo import StepPlan, group_advantages
from leapalign.methods.nft import nft_loss
from leapalign.models.flux import FluxPolicy, PromptEmbeds
from leapalign.recipes.grpo import chunks, ppo_work, reference_policy
from leapalign.rewards.base import RewardError
from leapalign.run import TrainingRun, mean_metrics, to_floats
from leapalign.sampling import rollout


@dataclass
class CleanRollout:
    """B = prompts x G clean samples of one iteration and what training them needs, no graph."""

    prompts: list[str]  # [B] each prompt G times in a row
    cond: PromptEmbeds  # [B, ...]
    image_ids: Tensor  # [S, 3]
    x0: Tensor  # [B, S, C] the ODE rollout's final latents
    noise: Tensor | None = None  # [N, B, S, C] eps at the trained (t, image) pairs, 0 elsewhere
    old_velocity: Tensor | None = None  # [N, B, S, C] DiffusionNFT's v_old(x_t) at the trained pairs
    ema_velocity: Tensor | None = None  # [N, B, S, C] AWM's v_ema(x_t) at the trained pairs
    old_log_prob: Tensor | None = None  # [B, N] AWM's log p under the rollout weights (later shares' pairs)


@torch.no_grad()
def clean_rollout(
    policy: FluxPolicy,
    prompts: list[str],
    cfg,
    sigmas: Tensor,
    rng: StepRandomness,
    micro_batch: int,
    group: int,
) -> CleanRollout:
    """G deterministic ODE samples per prompt (no CFG: Flux's guidance embedding is one forward)."""
    cond = policy.encode_prompts(prompts, cfg.model.max_sequence_length).repeat(group)  # [B, L, D]
    # Initial noise drawn for the global batch (every rank's prompts), this rank keeps its rows.
    noise, image_ids = policy.prepare_latents(
        len(prompts) * group * rng.world_size, cfg.sampler.height, cfg.sampler.width, rng.noise
    )
    noise = rng.local(noise)  # [B, S, C]
    x0 = torch.empty_like(noise)
    for part in chunks(noise.shape[0], micro_batch):
        velocity_fn = policy.velocity_fn(cond.select(part), image_ids, cfg.sampler.guidance_scale)
        x0[part] = rollout(velocity_fn, noise[part], sigmas)
    return CleanRollout([p for p in prompts for _ in range(group)], cond, image_ids, x0)


def draw_forward_noise(plan: Tensor, shape: torch.Size, rng: StepRandomness) -> Tensor:
    """eps [N, B, S, C] for this rank's trained pairs (0 elsewhere), drawn (fp32, CPU) from the "sde" stream
    for every GLOBAL pair in (step, image) order: 2 workers with B images draw what 1 worker with 2B draws.

    plan: the global [world B, N] plan; shape: this rank's [B, S, C]."""
    batch = shape[0]
    low = rng.rank * batch
    noise = torch.zeros((plan.shape[1], *shape), dtype=torch.float32)
    for t in range(plan.shape[1]):
        images = torch.nonzero(plan[:, t]).flatten()  # global images trained at t, in order
        if len(images) == 0:
            continue
        draw = torch.randn((len(images), *shape[1:]), generator=rng.sde, dtype=torch.float32)
        mine = (images >= low) & (images < low + batch)
        noise[t, images[mine] - low] = draw[mine]
    return noise


def pair_inputs(
    run: TrainingRun, data: CleanRollout, t: int, index: Tensor
) -> tuple[PromptEmbeds, Tensor, Tensor]:
    """(conditioning, x_0, x_t) of the images `index` at grid step t."""
    x0 = data.x0[index]
    return data.cond.select(index), x0, noise_latents(x0, data.noise[t, index].to(x0.device), run.sigmas[t])


@torch.no_grad()
def predict_at_pairs(run: TrainingRun, data: CleanRollout, work: list, out: Tensor | None = None) -> None:
    """No-grad velocities at the pairs of `work` (ppo_work's calls) into out [N, B, S, C]; without `out`,
    AWM's log p of them into data.old_log_prob [B, N]. Eager kernels (the training forward's), every rank
    the same calls (FSDP2 gathers weights in every forward)."""
    cfg, policy, opts = run.cfg, run.policy, run.cfg.method.options
    for t, index, pairs in work:
        index = index.to(data.x0.device)
        cond, x0, x_t = pair_inputs(run, data, t, index)
        velocity = policy.velocity_fn(cond, data.image_ids, cfg.sampler.guidance_scale, compiled=False)(
            x_t, run.sigmas[t]
        )
        if pairs == 0:  # a call that only pairs up with another rank's
            continue
        if out is not None:
            out[t, index] = velocity.to(out.dtype)
        else:
            log_prob = awm_log_prob(
                velocity, x0, data.noise[t, index], run.sigmas[t], opts.weighting, opts.ghuber_power
            )
            data.old_log_prob[index, t] = log_prob.to(data.old_log_prob.dtype)


def forward_update(run: TrainingRun, data: CleanRollout, advantages: Tensor, share: Tensor, plan: Tensor,
                   first: bool) -> dict[str, float]:  # fmt: skip
    """Accumulate one optimizer step's gradient over the pairs of the samples `share` (global indices), one
    transformer graph at a time; gradients cross ranks only in the last backward. `first`: the rollout's
    first optimizer step (AWM's old log p is then the current one, detached). Returns the share's metrics
    as weighted sums (their mean over ranks is the share's mean)."""
    cfg, policy, sigmas = run.cfg, run.policy, run.sigmas
    name, opts = cfg.method.name, cfg.method.options
    batch, world_size = data.x0.shape[0], run.dist.world_size
    work, total = ppo_work(StepPlan(sde=plan.any(dim=0), train=plan), share, batch, run.dist.rank, world_size,
                           opts.micro_batch)  # fmt: skip
    sums: dict[str, float] = {}
    for i, (t, index, pairs) in enumerate(work):
        index = index.to(data.x0.device)
        with run.parallel.accumulate(sync=i == len(work) - 1):
            cond, x0, x_t = pair_inputs(run, data, t, index)
            velocity = policy.velocity_fn(cond, data.image_ids, cfg.sampler.guidance_scale)(x_t, sigmas[t])
            ref_velocity = None
            if opts.kl_beta > 0:  # the reference: the same network with the LoRA adapter disabled
                with torch.no_grad(), reference_policy(policy):
                    ref_velocity = policy.velocity_fn(
                        cond, data.image_ids, cfg.sampler.guidance_scale, compiled=False
                    )(x_t, sigmas[t])
            if name == "nft":
                loss, metrics = nft_loss(
                    velocity, data.old_velocity[t, index], x_t, x0, sigmas[t], advantages[index],
                    beta=opts.beta, adv_clip=opts.adv_clip, ref_velocity=ref_velocity, kl_beta=opts.kl_beta,
                )  # fmt: skip
            else:
                log_prob = awm_log_prob(velocity, x0, data.noise[t, index].to(x0.device), sigmas[t],
                                        opts.weighting, opts.ghuber_power)  # fmt: skip
                old_log_prob = log_prob.detach() if first else data.old_log_prob[index, t]
                ema_velocity = data.ema_velocity[t, index] if opts.ema_kl_beta > 0 else None
                loss, metrics = awm_loss(
                    log_prob, old_log_prob, advantages[index], velocity, clip_range=opts.clip_range,
                    ref_velocity=ref_velocity, kl_beta=opts.kl_beta, ema_velocity=ema_velocity,
                    ema_kl_beta=opts.ema_kl_beta,
                )  # fmt: skip
            (loss * (pairs * world_size / total)).backward()
        for key, value in to_floats({"loss": loss.detach(), **metrics}).items():
            sums[key] = sums.get(key, 0.0) + pairs * value
    return {key: value * world_size / total for key, value in sums.items()}


def train_forward(run: TrainingRun) -> None:
    cfg, dist, policy = run.cfg, run.dist, run.policy
    name, opts = cfg.method.name, cfg.method.options
    num_steps = len(run.sigmas) - 1
    for step in run.steps:
        run.begin_update()
        prompts = run.prompt_order.next_batch()
        batch = len(prompts) * opts.group_size
        # 1-2. Plan (the global batch's, every rank alike) and the clean rollout (no graph).
        with run.timer.phase("rollout"):
            plan = plan_timesteps(
                opts.timestep_sampling, num_steps, batch * dist.world_size, opts.train_timesteps,
                opts.timestep_range, run.rng.steps,
            )  # fmt: skip
            if name == "nft":  # DiffusionNFT samples with its old policy
                with run.policy_copy.swapped():
                    data = clean_rollout(
                        policy, prompts, cfg, run.sigmas, run.rng, opts.micro_batch, opts.group_size
                    )
            else:
                data = clean_rollout(
                    policy, prompts, cfg, run.sigmas, run.rng, opts.micro_batch, opts.group_size
                )
        # 3. Rewards: values only; all ranks vote before any backward.
        with run.timer.phase("reward"):
            with torch.no_grad():
                images = torch.cat(
                    [policy.decode(data.x0[part], cfg.sampler.height, cfg.sampler.width)
                     for part in chunks(batch, opts.micro_batch)]
                )  # fmt: skip
            run.meter.count_reward(batch, backward=False)
            try:
                rewards, error = score_rewards(run.reward_fn, images, data.prompts).to(images.device), None
            except RewardError as err:
                rewards, error = None, str(err)
        if not dist.all_true(error is None):
            update = run.apply_gradients(step, False, error or "a bad reward on another worker")
            if run.end_step(step, update):
                break
            continue
        # 4. Advantages of every rank's images; this rank keeps its rows.
        advantages = group_advantages(
            dist.all_gather(rewards.float()), opts.group_size, std_scope=opts.std_scope, clip=opts.adv_clip
        )[dist.rank * batch : (dist.rank + 1) * batch].to(rewards.device)  # [B]
        # 5. The forward process's noise at every trained pair, and the shares of the optimizer steps.
        data.noise = draw_forward_noise(plan, data.x0.shape, run.rng).to(data.x0.device)
        order = torch.randperm(batch * dist.world_size, generator=run.rng.steps)
        shares = torch.tensor_split(order, opts.updates_per_rollout)
        every_pair, _ = ppo_work(StepPlan(sde=plan.any(dim=0), train=plan), order, batch, dist.rank,
                                 dist.world_size, opts.micro_batch)  # fmt: skip
        # 6. What the losses compare against, computed before any update (no graph).
        with run.timer.phase("reference"):
            if name == "nft":
                data.old_velocity = torch.zeros_like(data.noise)
                with run.policy_copy.swapped():
                    predict_at_pairs(run, data, every_pair, out=data.old_velocity)
            else:
                if opts.ema_kl_beta > 0:
                    data.ema_velocity = torch.zeros_like(data.noise)
                    with run.policy_copy.swapped():
                        predict_at_pairs(run, data, every_pair, out=data.ema_velocity)
                if len(shares) > 1:  # the later optimizer steps' ratios: against the rollout weights
                    later, _ = ppo_work(StepPlan(sde=plan.any(dim=0), train=plan), torch.cat(shares[1:]), batch,
                                        dist.rank, dist.world_size, opts.micro_batch)  # fmt: skip
                    data.old_log_prob = torch.zeros(
                        batch, num_steps, dtype=torch.float64, device=data.x0.device
                    )
                    predict_at_pairs(run, data, later)
        # 7. Updates: each share one optimizer step.
        updates, step_metrics = [], []
        for i, share in enumerate(shares):
            with run.timer.phase("backward"):
                step_metrics.append(forward_update(run, data, advantages, share, plan, first=i == 0))
            updates.append(run.apply_gradients(step, True, None))
        # 8. The weight copy follows the trained weights with its ramped decay.
        decay = copy_decay((step + 1) * opts.updates_per_rollout, opts.decay_rate, opts.decay_cap)
        run.policy_copy.update(decay)
        metrics = {
            **mean_metrics(step_metrics),
            **mean_metrics(updates),
            f"{name}/copy_decay": decay,
            **to_floats(
                {
                    "reward/mean": rewards.mean(),
                    "reward/std": rewards.std() if batch > 1 else torch.zeros(()),
                    f"{name}/adv_abs_mean": advantages.abs().mean(),
                }
            ),
        }
        if run.end_step(step, metrics):
            break
