"""Statistics for few-seed comparisons: what a difference between two methods rests on.

Every method is evaluated on the same held-out prompts with the same noise (leapalign.streams), so a
comparison is paired in the prompts; seeds are a method's own. The difference of a method to the reference
(mean over its seeds minus the reference's) gets a 95% interval from a stratified, paired bootstrap:
each resample draws every method's seeds with replacement (within the method) and the prompts with
replacement within each category (the same prompts for both methods), and recomputes the score. The
score is the world's overall accuracy (the mean of the per-category accuracies, GenEval's), a category's
accuracy, or a reward's mean. `scipy.stats.bootstrap` does the resampling (percentile intervals); the
seeds and every category's prompts are its independent samples, which is what makes it stratified.

From the same bootstrap: a two-sided p-value for "no difference" (twice the share of resampled differences
on the far side of 0), Holm's step-down correction across the rows of a table, and a verdict: better or
worse when the Holm-adjusted p is below 0.05, else "not separated". The probability of improvement is
P(X > Y) over the two methods' seed scores (ties count half; Agarwal et al. 2021). Compute-to-target: per
seed, the compute at the first evaluation whose score reaches the target (never interpolated from the base
point), with a bootstrap interval over the seeds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

N_RESAMPLES = 10_000
CONFIDENCE = 0.95
ALPHA = 0.05


@dataclass(frozen=True)
class Scores:
    """One method's per-image results at one evaluation: values [seeds, prompts], the prompts' strata."""

    values: np.ndarray  # [S, P] per seed and prompt: 0/1 correctness, or a reward
    strata: np.ndarray  # [P] category index of each prompt (one stratum for rewards)

    def per_seed(self) -> np.ndarray:
        """[S] each seed's score: the mean over strata of the mean over the stratum's prompts."""
        return np.mean(
            [self.values[:, self.strata == c].mean(axis=1) for c in np.unique(self.strata)], axis=0
        )


@dataclass(frozen=True)
class Difference:
    """A method against the reference: mean difference, its interval, p-values, verdict."""

    mean: float  # score(method) - score(reference), means over seeds
    low: float
    high: float
    p_value: float  # two-sided bootstrap p for "no difference"
    p_holm: float = math.nan  # after Holm's correction across the table's rows
    prob_improvement: float = math.nan  # P(method's seed score > reference's), ties 1/2
    verdict: str = ""


def _score(values: np.ndarray, seeds: np.ndarray, prompts: Sequence[np.ndarray]) -> np.ndarray:
    """Scores of resamples: values [S, P], seeds [R, s], prompts per stratum [R, n_c] -> [R]."""
    per_stratum = [values[seeds[:, :, None], p[:, None, :]].mean(axis=(1, 2)) for p in prompts]
    return np.mean(per_stratum, axis=0)


def bootstrap_difference(
    method: Scores, reference: Scores, *, n_resamples: int = N_RESAMPLES, seed: int = 0
) -> Difference:
    """The paired, stratified bootstrap of score(method) - score(reference) (module docstring)."""
    from scipy.stats import bootstrap

    if method.values.shape[1] != reference.values.shape[1] or not np.array_equal(
        method.strata, reference.strata
    ):
        raise ValueError("a paired comparison needs both methods scored on the same prompts")
    strata = np.unique(method.strata)
    prompt_sets = [np.flatnonzero(method.strata == c) for c in strata]
    data = (np.arange(len(method.values)), np.arange(len(reference.values)), *prompt_sets)
    # A sample of one (a single seed, a category with one prompt) is constant under resampling; scipy wants
    # two observations, and [i, i] resamples to i every time, which is the same thing.
    data = tuple(np.repeat(sample, 2) if len(sample) == 1 else sample for sample in data)

    def statistic(seeds_a, seeds_b, *prompts, axis=-1):
        seeds_a, seeds_b = np.atleast_2d(seeds_a), np.atleast_2d(seeds_b)
        prompts = [np.atleast_2d(p) for p in prompts]
        return _score(method.values, seeds_a, prompts) - _score(reference.values, seeds_b, prompts)

    mean = float(method.per_seed().mean() - reference.per_seed().mean())
    result = bootstrap(
        data, statistic, n_resamples=n_resamples, confidence_level=CONFIDENCE, method="percentile",
        vectorized=True, paired=False, rng=np.random.default_rng(seed),
    )  # fmt: skip
    distribution = result.bootstrap_distribution
    below, above = np.mean(distribution <= 0), np.mean(distribution >= 0)
    p_value = float(min(1.0, 2 * min(below, above)))
    p_value = max(p_value, 1.0 / (n_resamples + 1))  # a bootstrap cannot show a smaller p than this
    low, high = result.confidence_interval
    return Difference(mean=mean, low=float(low), high=float(high), p_value=p_value)


def probability_of_improvement(method_seeds: Sequence[float], reference_seeds: Sequence[float]) -> float:
    """P(X > Y) + P(X = Y) / 2 over every pair of a method's seed score X and the reference's Y."""
    x, y = np.asarray(method_seeds, float)[:, None], np.asarray(reference_seeds, float)[None, :]
    return float(np.mean((x > y) + 0.5 * (x == y)))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error across the rows), in the given order."""
    m = len(p_values)
    order = np.argsort(p_values, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted.tolist()


def verdicts(differences: list[Difference]) -> list[Difference]:
    """Holm-adjust the rows' p-values and say better / worse / not separated at ALPHA."""
    adjusted = holm([d.p_value for d in differences])
    out = []
    for d, p in zip(differences, adjusted, strict=True):
        verdict = "not separated"
        if p < ALPHA:
            verdict = "better" if d.mean > 0 else "worse"
        out.append(Difference(d.mean, d.low, d.high, d.p_value, p, d.prob_improvement, verdict))
    return out


# ----------------------------------------------------------------------------- compute to a target


def first_crossing(curve: Sequence[tuple[float, float]], target: float) -> float:
    """The compute of the first evaluation whose score reaches `target`; inf if none does. The base
    point (compute 0) counts only if it is already there: nothing is interpolated from it."""
    for compute, value in curve:
        if value >= target:
            return float(compute)
    return math.inf


@dataclass(frozen=True)
class Crossing:
    """Compute to a target over seeds: per seed, the median and its interval (seeds that reached it)."""

    per_seed: list[float]  # inf where a seed never reached the target
    median: float
    low: float
    high: float

    @property
    def reached(self) -> int:
        return sum(math.isfinite(c) for c in self.per_seed)


def compute_to_target(
    curves: Sequence[Sequence[tuple[float, float]]], target: float, seed: int = 0
) -> Crossing:
    """Per-seed crossings of `target` and the median's bootstrap interval over seeds (inf if a seed never
    reached it: the median is then at least the budget, and the interval stays open)."""
    per_seed = [first_crossing(curve, target) for curve in curves]
    values = np.asarray(per_seed, float)
    median = float(np.median(values)) if len(values) else math.nan
    if len(values) < 2 or not np.all(np.isfinite(values)):
        return Crossing(per_seed, median, math.nan, math.nan)
    from scipy.stats import bootstrap

    result = bootstrap((values,), np.median, n_resamples=N_RESAMPLES, confidence_level=CONFIDENCE,
                       method="percentile", rng=np.random.default_rng(seed))  # fmt: skip
    low, high = result.confidence_interval
    return Crossing(per_seed, median, float(low), float(high))
