"""Compute counted whole: FLOPs of the transformer, the VAE decoder and the reward, forward and backward.

Hand formulas for the counter on plain layers; on the tiny Flux with a real CLIP reward (the shipped mini
scorer), an update's compute/flops is exactly the counted calls times each model's measured FLOPs per image,
method by method; a FLOP budget stops a run on the update that crosses it.
"""

from __future__ import annotations

import json

import pytest
import torch

from leapalign.compute import count_flops
from leapalign.config import load_config
from leapalign.recipes.direct import train_direct
from leapalign.recipes.grpo import train_grpo
from leapalign.run import TrainingRun
from tests.conftest import TINY_CONFIG, tiny_overrides


def test_flop_counter_matches_hand_formulas():
    layer = torch.nn.Linear(64, 32)
    x = torch.randn(10, 64, requires_grad=True)
    held = {}
    forward = count_flops(lambda: held.update(y=layer(x)))
    assert forward == 2 * 10 * 64 * 32, f"a [10, 64] x [64, 32] matmul: 2 M K N FLOPs, got {forward}"
    backward = count_flops(lambda: torch.autograd.grad(held["y"].sum(), [x, layer.weight]))
    assert backward == 2 * forward, (
        f"input and weight gradients: two matmuls of the same size, got {backward}"
    )
    # CPU attention (registered here: torch's counter knows only the CUDA kernels). q, k, v [b, h, s, d].
    b, h, s, d = 1, 2, 8, 16
    q, k, v = (torch.randn(b, h, s, d, requires_grad=True) for _ in range(3))
    forward = count_flops(lambda: held.update(o=torch.nn.functional.scaled_dot_product_attention(q, k, v)))
    assert forward == 2 * (2 * b * h * s * s * d), (
        f"q k^T and (softmax) v: two batched matmuls, got {forward}"
    )
    backward = count_flops(lambda: torch.autograd.grad(held["o"].sum(), [q, k, v]))
    assert backward == 5 * (2 * b * h * s * s * d), (
        f"flash attention's backward recomputes the scores, then dV, dScores, dQ, dK: five matmuls, got {backward}"
    )


def scorer_cfg(tiny_flux_dir, tmp_path, **extra):
    values = {
        "reward.name": "clip_score",
        "reward.options": "{path: assets/mini-scorer}",
        "method.leapalign.hinge": 3.0,
        "train.iterations": 1,
        "train.batch_size": 2,
        **extra,
    }
    return load_config(TINY_CONFIG, tiny_overrides(tiny_flux_dir, tmp_path / "run", **values))


def one_update(cfg) -> tuple[dict, object]:
    run = TrainingRun(cfg, progress=False)
    run.begin(None)
    (train_grpo if cfg.method.name == "grpo" else train_direct)(run)
    return run.result.history[-1], run.costs


@pytest.mark.parametrize(
    "method,extra",
    [
        ("leapalign", {}),
        ("draft_lv", {}),
        ("grpo", {"method.grpo.group_size": 2, "method.grpo.train_fraction": 0.5}),
    ],
)
def test_an_update_costs_its_counted_calls(tiny_flux_dir, tmp_path, method, extra):
    cfg = scorer_cfg(tiny_flux_dir, tmp_path, **{"method.name": method, **extra})
    metrics, c = one_update(cfg)
    assert min(c.transformer_forward, c.decoder_forward, c.reward_forward) > 0, f"every model counted: {c}"
    assert c.transformer_forward < c.transformer_backward < 3 * c.transformer_forward, (
        f"a LoRA backward costs between one and three forwards: {c}"
    )
    assert c.decoder_backward > 0 and c.reward_backward > 0, f"the frozen models' pixel gradients: {c}"
    n, b = cfg.sampler.num_steps, cfg.train.batch_size
    if method == "leapalign":  # N forwards, 2 backwards, one decode and one reward, both back-propagated
        expected = b * (n * c.transformer_forward + 2 * c.transformer_backward + c.decoder_forward
                        + c.decoder_backward + c.reward_forward + c.reward_backward)  # fmt: skip
        assert metrics["compute/nfe"] == b * (n + 2 * 2), "transformer forward-equivalents as before"
    elif method == "draft_lv":  # N - 1 + 3 forwards; the last step, its decode and reward 3 times with grad
        three = 1 + cfg.method.draft_lv.extra_samples
        expected = b * ((n - 1 + three) * c.transformer_forward + three * c.transformer_backward
                        + three * (c.decoder_forward + c.decoder_backward + c.reward_forward + c.reward_backward))  # fmt: skip
    else:  # G images per prompt: the rollout, then each trained step once more with its backward; no pixel grads
        images = b * cfg.method.grpo.group_size
        trained = int(cfg.method.grpo.train_fraction * n)
        expected = images * (
            (n + trained) * c.transformer_forward + trained * c.transformer_backward
            + c.decoder_forward + c.reward_forward
        )  # fmt: skip
    assert metrics["compute/flops"] == pytest.approx(expected, rel=1e-9), (
        f"{method}: {metrics['compute/flops']:.6g} FLOPs logged, {expected:.6g} counted by hand"
    )
    assert metrics["compute/flops_total"] == metrics["compute/flops"], "one update: the total is the update"


def test_a_flop_budget_stops_the_run_on_the_update_that_crosses_it(tiny_flux_dir, tmp_path):
    probe, _ = one_update(scorer_cfg(tiny_flux_dir, tmp_path / "probe"))
    per_update = probe["compute/flops"]
    cfg = scorer_cfg(tiny_flux_dir, tmp_path, **{"train.iterations": 50, "train.max_flops": 2.5 * per_update})
    run = TrainingRun(cfg, progress=False)
    run.begin(None)
    train_direct(run)
    totals = [m["compute/flops_total"] for m in run.result.history]
    assert len(totals) == 3, f"2.5 updates' budget: the third update crosses it and is the last, got {totals}"
    assert totals[1] < cfg.train.max_flops <= totals[2], f"stops on the crossing update: {totals}"
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["compute/flops_total"] == totals[-1], "metrics.jsonl holds the whole count"
