"""`train()`: one training run in this process (or in one Ray Train worker), whatever the method.

It builds the shared run state (leapalign.run.TrainingRun) and hands it to the method's recipe:
leapalign.recipes.direct for LeapAlign, ReFL, DRaFT-LV, DRTune and full backprop, leapalign.recipes.grpo
for the GRPO family, leapalign.recipes.forward for DiffusionNFT and AWM. Ray, when used, only calls
`train` with a distributed context and a checkpoint hook (leapalign.distributed).
"""

from __future__ import annotations

import logging
import signal
import threading
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from leapalign.config import Config
from leapalign.logs import run_log_file
from leapalign.methods import METHODS
from leapalign.run import TrainingRun, TrainResult
from leapalign.run_folder import StepHook, resume_checkpoint

log = logging.getLogger("leapalign")


def train(
    cfg: Config,
    *,
    resume_from: Path | None = None,
    on_step_end: StepHook | None = None,
    **run_options: Any,
) -> TrainResult:
    """Run cfg.train.iterations updates (or until train.max_nfe); returns the per-step metrics.

    resume_from: a checkpoint written by this loop; training continues at the step after it with the same
    weights, optimizer, EMA and random streams. Without it, train.resume=true continues from the newest
    checkpoint in OUTPUT/checkpoints (runs without Ray write them every train.checkpoint_every steps).
    on_step_end: Ray's hook (reports, checkpoints in Ray storage); None: a local run (local checkpoints,
    Ctrl-C finishes the step). run_options: the rest of TrainingRun's (reward_fn, tracker, dist, device,
    progress).
    """
    if resume_from is None and cfg.train.resume and on_step_end is None:
        resume_from = resume_checkpoint(Path(cfg.train.output_dir))
    run = TrainingRun(cfg, on_step_end=on_step_end, **run_options)
    with run_log_file(run.out_dir if run.dist.is_main else None):  # OUTPUT/train.log, rank 0
        run.begin(resume_from)
        # A local run (no Ray hook) stops cleanly on Ctrl-C: the current step ends and is checkpointed.
        with finish_step_on_interrupt(run) if on_step_end is None else nullcontext():
            recipe = METHODS[cfg.method.name].recipe
            if recipe == "grpo":
                from leapalign.recipes.grpo import train_grpo

                train_grpo(run)
            elif recipe == "forward":
                from leapalign.recipes.forward import train_forward

                train_forward(run)
            else:
                from leapalign.recipes.direct import train_direct

                train_direct(run)
        if run.stop_requested:
            run.bar.close()
            raise KeyboardInterrupt(
                f"stopped after step {run.stopped_at_step} (checkpoint written); continue with train.resume=true"
            )
        return run.finish()


@contextmanager
def finish_step_on_interrupt(run: TrainingRun):
    """First Ctrl-C (SIGINT): finish the current step, write a checkpoint, stop. A second one: stop now.

    Only in the main thread (where Python delivers signals); elsewhere Ctrl-C keeps its default.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def request_stop(signum, frame) -> None:
        if run.stop_requested:
            raise KeyboardInterrupt  # the second Ctrl-C: no checkpoint
        run.stop_requested = True
        log.warning("Ctrl-C: finishing this step and writing a checkpoint (Ctrl-C again to stop at once)")

    previous = signal.signal(signal.SIGINT, request_stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
