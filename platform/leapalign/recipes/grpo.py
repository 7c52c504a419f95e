"""The GRPO recipe: Flow-GRPO, DanceGRPO, MixGRPO and Flow-GRPO-Fast on the shared training pieces.

One iteration (one `train.iterations` unit):
  1. plan      which steps are stochastic (SDE) and which (sample, step) transitions are trained
  2. rollout   train.batch_size prompts x G images, no graph: SDE steps record x_t, x_{t+1} and the
               rollout policy's log-prob of x_{t+1}; ODE steps elsewhere
  3. rewards   values only (`score`, never `score_and_grad`), checked; every rank votes before any backward
  4. advantages (r - group mean) / (std + eps), std over the gathered batch or per group, clipped
  5. updates   the samples are split into method.grpo.updates_per_rollout shares; each share is one
               optimizer step: for every trained step t, recompute the log-prob of x_{t+1} under the
               current policy (a graph on that one call), PPO clipped loss (+ beta KL to the policy with
               the LoRA adapter disabled), backward at once (memory: one transformer graph at a time);
               gradients cross ranks once per optimizer step, in its last backward
Rank-invariant: the plan, the SDE noise and the PPO shuffle are drawn for the global batch from the run's
streams (every rank alike) and each rank keeps its rows, so 2 workers with batch B compute what 1 worker
with batch 2B computes (tests/integration/test_scale_out.py).
The math lives in leapalign.methods.grpo; this file only orders the calls.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from leapalign.config import Config
from leapalign.evaluation import score_rewards
from leapalign.methods.common import StepRandomness
from leapalign.methods.grpo import (
    StepPlan,
    diffusion_coefficient,
    group_advantages,
    guard_log_ratio,
    kl_to_reference,
    plan_steps,
    ppo_clipped_loss,
    sde_step,
)
from leapalign.models.flux import FluxPolicy, PromptEmbeds
from leapalign.rewards.base import RewardError
from leapalign.run import TrainingRun, mean_metrics, to_floats


@dataclass
class GroupRollout:
    """B = prompts x G samples of one iteration, no graph."""

    prompts: list[str]  # [B] each prompt G times in a row
    cond: PromptEmbeds  # [B, ...]
    image_ids: Tensor  # [S, 3]
    latents: Tensor  # [N + 1, B, S, C] x_{sigma_0} ... x_0
    log_probs: Tensor  # [B, N] rollout log-prob of x_{t+1} at SDE steps (0 elsewhere)
    plan: StepPlan
    x0_hat: Tensor  # [B, S, C] the last step's prediction x_{N-1} - sigma_{N-1} v (DanceGRPO decodes it)
    means: Tensor | None = None  # [N, B, S, C] the rollout policy's step means (GRPO-Guard's mean_old)


def chunks(total: int, size: int) -> list[slice]:
    size = size or total
    return [slice(i, min(i + size, total)) for i in range(0, total, size)]


def sde_kwargs(cfg: Config, sigmas: Tensor) -> dict:
    opts = cfg.method.grpo
    return {"kind": opts.sde, "noise_level": opts.noise_level, "sigma_max": sigmas[1]}


@torch.no_grad()
def group_rollout(
    policy: FluxPolicy, prompts: list[str], cfg: Config, sigmas: Tensor, rng: StepRandomness, plan: StepPlan
) -> GroupRollout:
    """G samples per prompt with the plan's SDE steps; shared initial noise within a group if asked."""
    opts = cfg.method.grpo
    group = opts.group_size
    cond = policy.encode_prompts(prompts, cfg.model.max_sequence_length).repeat(group)  # [B, L, D]
    height, width = cfg.sampler.height, cfg.sampler.width
    # Initial noise is drawn for the global batch (every rank's prompts), this rank keeps its rows.
    if opts.shared_noise:
        noise, image_ids = policy.prepare_latents(len(prompts) * rng.world_size, height, width, rng.noise)
        noise = rng.local(noise).repeat_interleave(group, dim=0)  # [B, S, C]
    else:
        noise, image_ids = policy.prepare_latents(
            len(prompts) * group * rng.world_size, height, width, rng.noise
        )
        noise = rng.local(noise)
    # SDE noise: every stochastic step's eps drawn from the "sde" stream for the global batch, in step
    # order, before any model call: 2 workers with B images each draw what 1 worker with 2B draws, and
    # method.grpo.micro_batch does not change it.
    num_steps = len(sigmas) - 1
    stochastic = [bool(plan.sde[t]) and opts.noise_level > 0 for t in range(num_steps)]
    sde_noise = [rng.randn_local(noise.shape, rng.sde) if s else None for s in stochastic]  # N x [B, S, C]
    latents = torch.empty((num_steps + 1, *noise.shape), dtype=noise.dtype, device=noise.device)
    log_probs = torch.zeros(noise.shape[0], num_steps, dtype=torch.float32, device=noise.device)
    means = torch.zeros_like(latents[1:]) if opts.ratio == "guard" else None
    x0_hat = torch.empty_like(noise)
    latents[0] = noise
    for part in chunks(noise.shape[0], opts.micro_batch):
        # Eager like the update's recomputation: the rollout's log-probs must come from the same kernels.
        velocity_fn = policy.velocity_fn(
            cond.select(part), image_ids, cfg.sampler.guidance_scale, compiled=False
        )
        x = noise[part]
        for t in range(num_steps):
            velocity = velocity_fn(x, sigmas[t])
            level = opts.noise_level if stochastic[t] else 0.0
            step = sde_step(
                latents=x,
                velocity=velocity,
                sigma=sigmas[t],
                sigma_next=sigmas[t + 1],
                noise=sde_noise[t][part] if stochastic[t] else None,
                **{**sde_kwargs(cfg, sigmas), "noise_level": level},
            )
            if t == num_steps - 1:
                x0_hat[part] = x - sigmas[t] * velocity.to(x.dtype)
            x = step.prev_sample
            latents[t + 1, part] = x
            if means is not None:
                means[t, part] = step.mean.to(means.dtype)
            if step.log_prob is not None:
                log_probs[part, t] = step.log_prob.float()
    prompts_out = [p for p in prompts for _ in range(group)]
    return GroupRollout(prompts_out, cond, image_ids, latents, log_probs, plan, x0_hat, means)


@contextmanager
def reference_policy(policy: FluxPolicy):
    """Inside: the LoRA adapter is disabled, i.e. the frozen base model is the reference policy."""
    policy.transformer.disable_adapters()
    try:
        yield
    finally:
        policy.transformer.enable_adapters()


def ppo_work(plan: StepPlan, share: Tensor, batch: int, rank: int, world_size: int, micro_batch: int):
    """This rank's model calls for one optimizer step, [(t, local sample indices, pairs)], and the share's
    trained (sample, step) pairs.

    `share` holds the step's samples as indices into the GLOBAL batch (world_size x B images, rank r owns
    r B .. (r + 1) B - 1), the same on every rank; `plan` is the global plan. Every rank gets the same
    sequence of steps t and micro-batches: for each step trained by any sample of the share,
    ceil(max over ranks of its samples trained at t / micro_batch) calls, a rank with fewer samples taking
    a call of 0 pairs on its sample 0 (FSDP2 gathers weights in every forward and DDP reduces in the last
    backward, so the collectives of all ranks must pair up). A call weighs its pairs / the share's pairs,
    times world_size: the gradient averaged over ranks is the share's mean over its pairs, whatever the
    number of ranks.
    """
    train = plan.train[share]  # [b, N]
    total = int(train.sum())
    owner = torch.div(share, batch, rounding_mode="floor")  # [b] each sample's rank
    mine = share[owner == rank] - rank * batch  # [b_r] this rank's samples, local indices
    work = []
    for t in torch.nonzero(train.any(dim=0)).flatten().tolist():
        at_t = mine[train[owner == rank, t]]  # this rank's samples trained at step t
        most = max(int(train[owner == r, t].sum()) for r in range(world_size))
        for part in chunks(most, micro_batch):
            index = at_t[part]
            work.append((t, index, len(index)) if len(index) else (t, torch.zeros(1, dtype=torch.long), 0))
    return work, total


def ppo_update(
    run: TrainingRun, rollout: GroupRollout, advantages: Tensor, share: Tensor, plan: StepPlan
) -> dict[str, float]:
    """Accumulate one optimizer step's PPO gradient (the samples `share`, global indices; `ppo_work`), one
    transformer graph at a time; gradients cross ranks only in the last backward (parallel.accumulate).
    Returns the share's metrics as weighted sums (their mean over ranks is the share's mean)."""
    cfg, policy, sigmas = run.cfg, run.policy, run.sigmas
    opts = cfg.method.grpo
    batch = rollout.latents.shape[1]
    world_size = run.dist.world_size
    work, total = ppo_work(plan, share, batch, run.dist.rank, world_size, opts.micro_batch)
    sums: dict[str, float] = {}
    for i, (t, index, pairs) in enumerate(work):
        index = index.to(rollout.latents.device)
        with run.parallel.accumulate(sync=i == len(work) - 1):
            cond = rollout.cond.select(index)
            x_t, x_next = rollout.latents[t, index], rollout.latents[t + 1, index]
            velocity = policy.velocity_fn(cond, rollout.image_ids, cfg.sampler.guidance_scale)(x_t, sigmas[t])
            step = sde_step(
                latents=x_t, velocity=velocity, sigma=sigmas[t], sigma_next=sigmas[t + 1], prev_sample=x_next,
                **sde_kwargs(cfg, sigmas),
            )  # fmt: skip
            old_log_prob = rollout.log_probs[index, t]
            log_ratio = None
            if opts.ratio == "guard":  # GRPO-Guard: the step-normalised ratio
                log_ratio = guard_log_ratio(
                    step.log_prob, old_log_prob, step.mean, rollout.means[t, index], step.std
                )
            loss, step_metrics = ppo_clipped_loss(
                step.log_prob, old_log_prob, advantages[index], opts.clip_range, log_ratio=log_ratio
            )
            if opts.kl_beta > 0:
                with torch.no_grad(), reference_policy(policy):
                    ref_velocity = policy.velocity_fn(
                        cond, rollout.image_ids, cfg.sampler.guidance_scale, compiled=False
                    )(x_t, sigmas[t])
                ref_mean = sde_step(
                    latents=x_t, velocity=ref_velocity, sigma=sigmas[t], sigma_next=sigmas[t + 1],
                    prev_sample=x_next, **sde_kwargs(cfg, sigmas),
                ).mean  # fmt: skip
                # Flow-GRPO's KL: divided by g^2 (not the step's variance g^2 |dt|), so kl_beta means theirs.
                g = diffusion_coefficient(step, sigmas[t], sigmas[t + 1])
                kl = kl_to_reference(step.mean, ref_mean, g).mean()
                loss = loss + opts.kl_beta * kl
                step_metrics["grpo/kl"] = float(kl.detach())
            (loss * (pairs * world_size / total)).backward()
        for key, value in {"loss": float(loss.detach()), **step_metrics}.items():
            sums[key] = sums.get(key, 0.0) + pairs * value
    return {key: value * world_size / total for key, value in sums.items()}


def grpo_advantages(dist, rewards: Tensor, components: dict[str, Tensor] | None, opts, reward_fn) -> Tensor:
    """Advantages of every rank's images [world B]: of the summed reward, or (advantages: per_component, as
    MixGRPO does for several rewards) each component's own group-normalised advantage, weighted by its
    weight in the sum. DanceGRPO's std is Bessel-corrected (torch.std), Flow-GRPO's the population one."""
    kwargs = dict(
        std_scope=opts.std_scope, clip=opts.adv_clip, correction=1 if opts.variant == "dance_grpo" else 0
    )
    if components is None:
        return group_advantages(dist.all_gather(rewards.float()), opts.group_size, **kwargs)
    total = None
    for label, (weight, _) in reward_fn.components.items():
        part = weight * group_advantages(dist.all_gather(components[label]), opts.group_size, **kwargs)
        total = part if total is None else total + part
    return total


def train_grpo(run: TrainingRun) -> None:
    cfg, dist = run.cfg, run.dist
    opts = cfg.method.grpo
    num_steps = len(run.sigmas) - 1
    for step in run.steps:
        run.begin_update()
        prompts = run.prompt_order.next_batch()
        batch = len(prompts) * opts.group_size
        # 1-2. Plan and rollout (no graph).
        with run.timer.phase("rollout"):
            # The plan of the global batch (every rank draws it alike), this rank's rows for its rollout.
            plan = plan_steps(
                opts.variant, num_steps, batch * dist.world_size, iteration=step, generator=run.rng.steps,
                train_fraction=opts.train_fraction, window_size=opts.window_size,
                window_shift_every=opts.window_shift_every, last_step_stochastic=opts.sde != "cps",
            )  # fmt: skip
            local_plan = StepPlan(sde=plan.sde, train=run.rng.local(plan.train))
            rollout = group_rollout(run.policy, prompts, cfg, run.sigmas, run.rng, local_plan)
        # 3. Rewards: values only; all ranks vote before any backward.
        with run.timer.phase("reward"):
            # DanceGRPO scores the last step's x0 prediction (its final SDE step adds noise); the others
            # the final sample.
            final = rollout.x0_hat if opts.variant == "dance_grpo" else rollout.latents[-1]
            with torch.no_grad():
                images = torch.cat(
                    [
                        run.policy.decode(final[part], cfg.sampler.height, cfg.sampler.width)
                        for part in chunks(batch, opts.micro_batch)
                    ]
                )
            run.meter.count_reward(batch, backward=False)
            try:
                rewards, error = score_rewards(run.reward_fn, images, rollout.prompts).to(images.device), None
                components = None
                if opts.advantages == "per_component":  # MixGRPO: each reward normalised in its group
                    components = {
                        k: v.float().to(images.device) for k, v in run.reward_fn.last_components.items()
                    }
            except RewardError as err:
                rewards, error = None, str(err)
        if not dist.all_true(error is None):
            update = run.apply_gradients(step, False, error or "a bad reward on another worker")
            if run.end_step(step, update):
                break
            continue
        # 4. Advantages: group means here, std over every rank's batch ("batch") or per group.
        advantages = grpo_advantages(dist, rewards, components, opts, run.reward_fn)[
            dist.rank * batch : (dist.rank + 1) * batch
        ].to(rewards.device)  # [B]
        # 5. PPO updates: the global batch, shuffled, in updates_per_rollout optimizer steps; each rank
        #    computes the terms of its own samples.
        order = torch.randperm(batch * dist.world_size, generator=run.rng.steps)
        updates, step_metrics = [], []
        for share in torch.tensor_split(order, opts.updates_per_rollout):
            with run.timer.phase("backward"):
                step_metrics.append(ppo_update(run, rollout, advantages, share, plan))
            updates.append(run.apply_gradients(step, True, None))
        metrics = {
            **mean_metrics(step_metrics),
            **mean_metrics(updates),
            **to_floats(
                {
                    "reward/mean": rewards.mean(),
                    "reward/std": rewards.std() if batch > 1 else torch.zeros(()),
                    "grpo/adv_abs_mean": advantages.abs().mean(),
                    "grpo/trained_steps": local_plan.train.sum(dim=1).float().mean(),
                }
            ),
        }
        if run.end_step(step, metrics):
            break
