"""sampler.compile: the no-grad forwards through torch.compile (inductor) give the eager numbers to float
rounding, one compiled graph serves every batch size, and calls that build a graph stay eager.

Compiled on CPU runs with the machine's native kernels (train.cpu_isa=native: inductor's AVX2 code gave NaN
here), so the check runs in a fresh process without the suite's AVX2 pins."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from leapalign.config import ConfigError, compile_enabled
from tests.conftest import REPO, TINY_CONFIG, tiny_overrides

CHECK = textwrap.dedent(
    """
    import sys, torch
    from leapalign.config import load_config
    from leapalign.methods import DIRECT_METHODS
    from leapalign.methods.common import StepRandomness
    from leapalign.rewards.configured import build_configured_reward
    from leapalign.finetune import setup_policy

    cfg = load_config(sys.argv[1], sys.argv[2:])
    policy = setup_policy(cfg, "cpu")
    assert policy.compiled is not None, "sampler.compile=true compiles the no-grad calls"
    torch._dynamo.utils.counters.clear()
    generate = dict(num_steps=4, height=32, width=32, guidance_scale=3.5, max_sequence_length=16)
    compiled = policy.compiled
    prompts = ["a red square", "two blue circles", "a green triangle left of a red circle", "a cube", "x"]
    for batch in (3, 5):  # two batch sizes: one graph (the batch dimension is dynamic)
        policy.compiled = compiled
        fast = policy.generate(prompts[:batch], generator=torch.Generator().manual_seed(1), **generate)
        policy.compiled = None
        slow = policy.generate(prompts[:batch], generator=torch.Generator().manual_seed(1), **generate)
        diff = (fast - slow).abs().max().item()
        assert torch.allclose(fast, slow, atol=2e-4, rtol=0), f"batch {batch}: compiled vs eager differ by {diff}"
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs == 1, f"one compiled graph for batches of 3 and 5, got {graphs}"
    # A LeapAlign loss: the rollout's no-grad steps compiled, the two graph calls eager.
    reward = build_configured_reward(cfg.reward)
    sigmas = policy.sigmas(cfg.sampler.num_steps, 32, 32)
    losses = []
    for use in (compiled, None):
        policy.compiled = use
        loss, _ = DIRECT_METHODS["leapalign"](
            policy, ["a red square", "two blue circles"], reward, cfg, sigmas, StepRandomness.seeded(0)
        )
        losses.append(loss)
    assert torch.allclose(losses[0], losses[1], rtol=1e-4, atol=1e-6), f"compiled vs eager loss: {losses}"
    losses[0].backward()
    grads = [p.grad for p in policy.transformer.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads), "the eager graph calls reach the adapter"
    print("compile ok", flush=True)
    """
)


def test_auto_compiles_on_cuda_only():
    assert compile_enabled("auto", "cuda") and not compile_enabled("auto", "cpu"), "auto: CUDA only"
    assert compile_enabled(True, "cpu") and not compile_enabled(False, "cuda"), "true / false as given"
    assert compile_enabled(True, "cuda", "avx2"), "the CPU pins do not concern a GPU"
    with pytest.raises(ConfigError, match="needs train.cpu_isa=native"):
        compile_enabled(True, "cpu", "avx2")


def test_compiled_no_grad_calls_match_eager(tiny_flux_dir, tmp_path):
    overrides = tiny_overrides(
        tiny_flux_dir, tmp_path / "run", **{"sampler.compile": "true", "train.cpu_isa": "native"}
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA")
    }
    proc = subprocess.run(
        [sys.executable, "-c", CHECK, str(TINY_CONFIG), *overrides],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0 and "compile ok" in proc.stdout, (
        f"compiled check failed:\n{proc.stderr[-3000:]}"
    )
