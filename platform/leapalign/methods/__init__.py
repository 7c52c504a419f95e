"""Alignment methods as pure functions (no Ray).

Direct-gradient methods share one signature, `(policy, prompts, reward_fn, cfg, sigmas, rng) ->
(loss, metrics)`, and are picked by `method.name` from `DIRECT_METHODS`; the training recipe
(leapalign.recipes.direct) runs them. GRPO has its own recipe (leapalign.recipes.grpo) built on
the math in methods/grpo.py; DiffusionNFT and AWM share one (leapalign.recipes.forward) built on
methods/nft.py, methods/awm.py and methods/forward_process.py.
"""

from leapalign.methods.draft import draft_lv_loss, full_backprop_loss
from leapalign.methods.drtune import drtune_loss
from leapalign.methods.leapalign import leapalign_loss
from leapalign.methods.refl import refl_loss

DIRECT_METHODS = {
    "leapalign": leapalign_loss,
    "refl": refl_loss,
    "draft_lv": draft_lv_loss,
    "drtune": drtune_loss,
    "full_backprop": full_backprop_loss,
}


def update_nfe_range(cfg) -> tuple[int, int]:
    """(fewest, most) image forward-equivalents one update costs on one worker, before running it.

    A backward through a transformer call counts 2, plus 1 when gradient checkpointing recomputes the
    forward; random step draws (ReFL's and DRTune's t) make the cost a range. `ComputeMeter` measures
    the real number during training; the tests check that it always lies in this range.
    """
    n = cfg.sampler.num_steps
    bw = 3 if cfg.finetune.gradient_checkpointing else 2
    name, opts = cfg.method.name, cfg.method.options
    if name == "grpo":
        trained = {
            "flow_grpo": max(1, int(opts.train_fraction * n)),
            "dance_grpo": max(1, int(opts.train_fraction * (n - 1))),  # never its last step
            "mixgrpo": min(opts.window_size, n - 2),  # never the last two steps
            "fast": opts.window_size,
        }[opts.variant]
        if opts.sde == "cps" and opts.variant == "flow_grpo":
            trained = min(trained, n - 1)  # CPS's last step is deterministic: never trained
        per_image = n + trained * (1 + bw + (1 if opts.kl_beta > 0 else 0))
        cost = cfg.train.batch_size * opts.group_size * per_image
        return cost, cost
    if name in ("nft", "awm"):
        # N rollout forwards per image; per trained pair (K per image) a forward and its backward, the
        # reference's forward (kl_beta > 0), and DiffusionNFT's v_old or AWM's v_ema forward. AWM also scores
        # the pairs of its later optimizer steps under the rollout weights (one forward each); the first
        # step's share holds ceil(images / U) images (torch.tensor_split).
        images, k = cfg.train.batch_size * opts.group_size, opts.train_timesteps
        copy = 1 if name == "nft" or opts.ema_kl_beta > 0 else 0
        per_pair = 1 + bw + (1 if opts.kl_beta > 0 else 0) + copy
        later = images - -(-images // opts.updates_per_rollout) if name == "awm" else 0
        cost = images * (n + k * per_pair) + k * later
        return cost, cost
    if name == "leapalign":
        pairs = opts.pairs_per_rollout
        per_image = (n + 2 * bw) if pairs == 1 else (n + 2 * pairs + 2 * pairs * bw)
        lo = hi = per_image
    elif name == "refl":
        first = max(0, n - opts.last_steps)
        lo, hi = first + 1 + bw, n + bw
    elif name == "draft_lv":
        lo = hi = (n - 1) + (opts.extra_samples + 1) * (1 + bw)
    elif name == "drtune":
        first = max(0, n - opts.last_steps)
        lo = first + 1 + min(opts.grad_steps, first + 1) * bw
        hi = n + min(opts.grad_steps, n) * bw
    else:  # full_backprop
        lo = hi = n + n * bw
    scale = cfg.train.batch_size * cfg.train.grad_accum
    return lo * scale, hi * scale
