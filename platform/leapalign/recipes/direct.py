"""The direct-gradient recipe: LeapAlign and the baselines that back-propagate a reward into the model.

Each update: for every micro-batch, the method (picked by `method.name` from DIRECT_METHODS) builds
its graph and returns a loss; every data-parallel rank agrees the rewards were valid BEFORE anyone
runs backward (a rank that skipped backward would leave the others waiting in a collective); the
gradients are averaged over ranks by DDP / FSDP2 in the last micro-batch's backward; the shared step
clips, steps AdamW and the EMA.
"""

from __future__ import annotations

from leapalign.methods import DIRECT_METHODS
from leapalign.rewards.base import RewardError
from leapalign.run import TrainingRun, mean_metrics, to_floats


def train_direct(run: TrainingRun) -> None:
    cfg = run.cfg
    loss_fn = DIRECT_METHODS[cfg.method.name]
    for step in run.steps:
        run.begin_update()
        ok, reason, micro_metrics = True, None, []
        for micro in range(cfg.train.grad_accum):
            prompts = run.prompt_order.next_batch()
            # Gradients cross ranks only in the last micro-batch's backward (DDP no_sync / FSDP2
            # set_requires_gradient_sync(False) before it): one all-reduce per optimizer step.
            with run.parallel.accumulate(sync=micro == cfg.train.grad_accum - 1):
                # 1. The method's graph for this micro-batch (forward passes, decode, reward).
                with run.timer.phase("rollout"):
                    try:
                        loss, metrics = loss_fn(run.policy, prompts, run.reward_fn, cfg, run.sigmas, run.rng)
                        error = None
                    except RewardError as err:  # keep drawing the other micro-batches: streams stay aligned
                        loss, error = None, str(err)
                # 2. Every rank votes before any backward; once a rank fails, all skip the rest of the step.
                if ok:
                    ok = run.dist.all_true(error is None)
                    reason = error or "a bad reward on another worker"
                if not ok:
                    continue
                with run.timer.phase("backward"):
                    (loss / cfg.train.grad_accum).backward()
            micro_metrics.append(to_floats(metrics))
        # 3. Clip, AdamW, EMA (or a skip that leaves the weights untouched); gradients already averaged.
        step_metrics = run.apply_gradients(step, ok, reason if not ok else None)
        if ok and step_metrics["skipped"] == 0.0:
            step_metrics = {**mean_metrics(micro_metrics), **step_metrics}
        if run.end_step(step, step_metrics):
            break
