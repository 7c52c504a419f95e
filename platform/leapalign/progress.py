"""Progress bars that count what ends a run: its updates, or its compute budget.

A run capped by `train.max_nfe` stops long before `train.iterations` (the world's configs set 100000
iterations and stop after ~150 updates on their budget), so its bar counts compute, not updates, and its
ETA is the budget's. The same bar serves a run in this process (leapalign.training) and a run on Ray
workers, which the driver follows (leapalign.distributed.progress).
"""

from __future__ import annotations

from dataclasses import dataclass

from tqdm.auto import tqdm

SHOWN = ("loss", "reward/mean")  # the latest of these ride on the bar


@dataclass(frozen=True)
class ProgressScale:
    """What one bar position is: an update, or an image forward-equivalent of the compute budget."""

    total: int
    unit: str  # "update" | "NFE"
    iterations: int

    @classmethod
    def of(cls, cfg) -> ProgressScale:
        """cfg is a leapalign.config.Config."""
        if cfg.train.max_nfe > 0:
            return cls(cfg.train.max_nfe, "NFE", cfg.train.iterations)
        return cls(cfg.train.iterations, "update", cfg.train.iterations)

    def position(self, step: int, nfe_total: float) -> float:
        """The bar's position after `step` updates that used `nfe_total` compute (capped at the total)."""
        return float(min(self.total, nfe_total if self.unit == "NFE" else step))


def make_bar(scale: ProgressScale, desc: str, *, disable: bool = False, initial: float = 0.0) -> tqdm:
    return tqdm(
        total=scale.total,
        initial=initial,
        desc=desc,
        unit=scale.unit,
        unit_scale=scale.unit == "NFE",  # 12.3k/20.0k NFE
        disable=disable,
        dynamic_ncols=True,
    )


def show_step(bar: tqdm, scale: ProgressScale, step: int, metrics: dict[str, float]) -> None:
    """Move the bar to this step and show its latest loss and reward (and the update count, when the
    bar counts compute)."""
    position = scale.position(step, metrics.get("compute/nfe_total", 0.0))
    bar.update(position - bar.n)
    postfix = {key: f"{metrics[key]:.4f}" for key in SHOWN if key in metrics}
    if scale.unit != "update":
        postfix = {"updates": str(step), **postfix}
    bar.set_postfix(postfix, refresh=False)
