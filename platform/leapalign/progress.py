"""Progress bars that count what ends a run: its updates, or its compute budget.

A run capped by `train.max_nfe` or `train.max_flops` stops long before `train.iterations` (the world's configs set 100000
iterations and stop after ~150 updates on their budget), so its bar counts compute, not updates, and its
ETA is the budget's. The same bar serves a run in this process (leapalign.run) and a run on Ray
workers, which the driver follows (leapalign.distributed.progress).
"""

from __future__ import annotations

from dataclasses import dataclass

from tqdm.auto import tqdm

SHOWN = ("loss", "reward/mean")  # the latest of these ride on the bar


@dataclass(frozen=True)
class ProgressScale:
    """What one bar position is: an update, a transformer forward-equivalent or a FLOP of the budget."""

    total: float
    unit: str  # "update" | "NFE" | "FLOP"
    iterations: int

    @classmethod
    def of(cls, cfg) -> ProgressScale:
        """cfg is a leapalign.config.Config."""
        if cfg.train.max_flops > 0:
            return cls(cfg.train.max_flops, "FLOP", cfg.train.iterations)
        if cfg.train.max_nfe > 0:
            return cls(cfg.train.max_nfe, "NFE", cfg.train.iterations)
        return cls(cfg.train.iterations, "update", cfg.train.iterations)

    def position(self, step: int, metrics: dict[str, float]) -> float:
        """The bar's position after `step` updates whose metrics are `metrics` (capped at the total); a
        whole number of updates prints as one (200/200, not 200.0/200)."""
        if self.unit == "update":
            return min(int(self.total), step)
        used = metrics.get("compute/nfe_total" if self.unit == "NFE" else "compute/flops_total", 0.0)
        return float(min(self.total, used))


def make_bar(scale: ProgressScale, desc: str, *, disable: bool = False, initial: float = 0) -> tqdm:
    return tqdm(
        total=scale.total,
        initial=initial,
        desc=desc,
        unit=scale.unit,
        unit_scale=scale.unit != "update",  # 12.3k/20.0k NFE, 1.20T/2.50T FLOP
        disable=disable,
        dynamic_ncols=True,
    )


def show_step(bar: tqdm, scale: ProgressScale, step: int, metrics: dict[str, float]) -> None:
    """Move the bar to this step and show its latest loss and reward (and the update count, when the
    bar counts compute)."""
    position = scale.position(step, metrics)
    bar.update(position - bar.n)
    postfix = {key: f"{metrics[key]:.4f}" for key in SHOWN if key in metrics}
    if scale.unit != "update":
        postfix = {"updates": str(step), **postfix}
    bar.set_postfix(postfix, refresh=False)
