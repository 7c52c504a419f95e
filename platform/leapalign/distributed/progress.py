"""The driver's view of a run on Ray workers: one progress bar, and the workers' warnings.

Rank 0 sends every step's headline numbers to a `RunProgress` actor (fire-and-forget: `.remote()` returns
at once, the step never waits) and its warnings (a skipped step, a retried reward call) as notes. The driver
polls the actor from a thread and draws the same bar a run in one process draws (leapalign.progress). The
workers' own output, Ray's start-up lines among it, goes to Ray's log files and the run's train.log, not
to the console (the driver joins the cluster with log_to_driver=False).
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from typing import Any

import ray

from leapalign.progress import ProgressScale, make_bar, show_step

POLL_S = 0.5  # how often the driver's bar asks for news


@ray.remote(num_cpus=0)
class RunProgress:
    """The latest step of a run (rank 0's) and the notes its workers sent, in order."""

    def __init__(self) -> None:
        self.step = 0
        self.metrics: dict[str, float] = {}
        self.notes: list[str] = []

    def update(self, step: int, metrics: dict[str, float]) -> None:
        if step >= self.step:  # a restarted worker group replays older steps: the bar never moves back
            self.step, self.metrics = step, metrics

    def note(self, message: str) -> None:
        self.notes.append(message)

    def poll(self, notes_seen: int) -> tuple[int, dict[str, float], list[str]]:
        return self.step, self.metrics, self.notes[notes_seen:]


class ForwardWarnings(logging.Handler):
    """A worker's WARNING+ records of our logger, sent to the driver as notes (non-blocking)."""

    def __init__(self, progress, rank: int):
        super().__init__(level=logging.WARNING)
        self.progress, self.rank = progress, rank

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.progress.note.remote(f"{record.levelname} (worker rank {self.rank}): {record.getMessage()}")
        except Exception:  # the driver is gone: nothing to tell
            pass


def step_headline(metrics: dict[str, Any]) -> dict[str, float]:
    """What the bar shows, from a step's metrics (small: it crosses to the driver every step)."""
    keep = ("loss", "reward/mean", "compute/nfe_total", "compute/flops_total", "eval/overall")
    return {k: float(metrics[k]) for k in keep if k in metrics}


@contextmanager
def follow(cfg, progress, desc: str):
    """While inside (the driver waits in trainer.fit()), a thread mirrors the run's progress on a bar and
    prints the workers' notes above it. cfg is the run's Config."""
    scale = ProgressScale.of(cfg)
    bar = make_bar(scale, desc)
    stop = threading.Event()
    seen = 0

    def refresh() -> bool:
        nonlocal seen
        try:
            step, metrics, notes = ray.get(progress.poll.remote(seen), timeout=30)
        except Exception:  # the cluster is going down with the run: the caller reports why
            return False
        for note in notes:
            bar.write(note)
        seen += len(notes)
        if step:
            show_step(bar, scale, step, metrics)
            bar.refresh()
        return True

    def mirror() -> None:
        while not stop.wait(POLL_S) and refresh():
            pass

    thread = threading.Thread(target=mirror, name="leapalign-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=60)
        refresh()  # the last steps and notes
        bar.close()
