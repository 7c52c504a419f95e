"""Ctrl-C in a local run (no Ray): the current step finishes, a checkpoint is written, the run resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from tests.conftest import REPO, TINY_CONFIG, tiny_overrides


def test_ctrl_c_finishes_the_step_and_writes_a_checkpoint(tiny_flux_dir, tmp_path):
    out = tmp_path / "run"
    overrides = tiny_overrides(
        tiny_flux_dir, out, **{"ray.enabled": "false", "train.iterations": 200, "train.checkpoint_every": 1000,
                               "train.num_samples": 1, "sampler.eval_num_steps": 2},
    )  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "leapalign", "train", str(TINY_CONFIG), *overrides],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and metrics.read_text().count("\n") >= 1:
            break
        time.sleep(0.2)
    assert proc.poll() is None, f"the run ended before the interrupt: {proc.communicate()[1][-1500:]}"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)

    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    last = steps[-1]
    assert proc.returncode == 130, f"exit code {proc.returncode} (want 130), stderr {stderr[-1500:]}"
    assert 1 <= last < 200, f"the run stopped at step {last}, want a step in the middle"
    assert steps == list(range(1, last + 1)), f"every step up to the interrupt is logged once: {steps}"
    checkpoints = sorted(p.name for p in (out / "checkpoints").glob("step_*.pt"))
    assert checkpoints == [f"step_{last:06d}.pt"], (
        f"the interrupted step {last} is checkpointed: {checkpoints}"
    )
    assert f"stopped after step {last}" in stderr, f"the CLI says where it stopped: {stderr[-800:]}"
