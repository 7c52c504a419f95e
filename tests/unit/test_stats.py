"""Statistics of comparisons against values computed by hand: bootstrap intervals, p-values, Holm's
correction, verdicts, the probability of improvement and compute-to-target."""

from __future__ import annotations

import math

import numpy as np
import pytest

from leapalign.stats import (
    Difference,
    Scores,
    bootstrap_difference,
    compute_to_target,
    first_crossing,
    holm,
    probability_of_improvement,
    verdicts,
)

STRATA = np.repeat(np.arange(3), 4)  # 3 categories x 4 prompts


def constant(seed_values) -> Scores:
    """Every prompt of a seed scores the seed's value: resampling prompts changes nothing, only seeds do."""
    return Scores(np.repeat(np.asarray(seed_values, float)[:, None], len(STRATA), axis=1), STRATA)


def test_separated_methods_by_hand():
    # A's seeds 0.8 and 0.9, B's 0.1 and 0.2: a resample's mean of A is 0.8, 0.85 or 0.9 (1/4, 1/2, 1/4),
    # B's 0.1, 0.15 or 0.2, so the difference lies in [0.6, 0.8] and P(0.6) = P(0.8) = 1/16 > 2.5%.
    d = bootstrap_difference(constant([0.8, 0.9]), constant([0.1, 0.2]), n_resamples=4000)
    assert d.mean == pytest.approx(0.7), f"mean difference {d.mean}"
    assert (d.low, d.high) == pytest.approx((0.6, 0.8)), f"95% interval [{d.low}, {d.high}]"
    assert d.p_value == pytest.approx(1 / 4001), "no resample at or below 0: the smallest p a bootstrap shows"


def test_overlapping_methods_by_hand():
    # A's seeds 0 and 1 against B at 0.5: the difference is -0.5, 0 or 0.5 with probabilities 1/4, 1/2, 1/4;
    # the 2.5% and 97.5% quantiles are -0.5 and 0.5, and P(d <= 0) = P(d >= 0) = 3/4 gives p = 1.
    d = bootstrap_difference(constant([0.0, 1.0]), constant([0.5, 0.5]), n_resamples=4000)
    assert d.mean == pytest.approx(0.0) and (d.low, d.high) == pytest.approx((-0.5, 0.5)), f"{d}"
    assert d.p_value == 1.0, f"p {d.p_value}"


def test_prompts_are_resampled_within_categories_and_paired():
    # One seed each; A is right on every prompt of category 0 and wrong elsewhere, B the opposite on
    # category 1. Paired: both see the same resampled prompts, and categories keep their weight 1/3 (a
    # stratum is never emptied), so every resample gives exactly 1/3 - 1/3 = 0.
    a = Scores(np.array([[1.0] * 4 + [0.0] * 8]), STRATA)
    b = Scores(np.array([[0.0] * 4 + [1.0] * 4 + [0.0] * 4]), STRATA)
    d = bootstrap_difference(a, b, n_resamples=2000)
    assert (d.mean, d.low, d.high) == pytest.approx((0.0, 0.0, 0.0)), f"stratified and paired: {d}"
    # Within a category the prompts do vary the score: A right on half of category 0's prompts.
    a = Scores(np.array([[1.0, 1.0, 0.0, 0.0] + [0.0] * 8]), STRATA)
    b = Scores(np.zeros((1, 12)), STRATA)
    d = bootstrap_difference(a, b, n_resamples=4000)
    assert (
        d.mean == pytest.approx(1 / 6) and d.low == pytest.approx(0.0) and d.high == pytest.approx(1 / 3)
    ), f"category 0's accuracy resamples in {{0, 1/4, ..., 1}}, overall = that / 3: {d}"


def test_holm_and_verdicts_by_hand():
    # p = (1.0, 1e-4, 0.03): sorted 1e-4 x 3 = 3e-4, 0.03 x 2 = 0.06, 1.0 x 1 = 1.0 (monotone).
    assert holm([1.0, 1e-4, 0.03]) == pytest.approx([1.0, 3e-4, 0.06]), "Holm's step-down"
    assert holm([0.01, 0.04]) == pytest.approx([0.02, 0.04]), "two rows: 2 x 0.01, then max(0.02, 0.04)"
    rows = [
        Difference(0.1, -0.1, 0.3, 1.0),
        Difference(-0.2, -0.3, -0.1, 1e-4),
        Difference(0.05, 0.01, 0.09, 0.03),
    ]
    judged = verdicts(rows)
    assert [r.verdict for r in judged] == ["not separated", "worse", "not separated"], (
        "the third row's raw p = 0.03 would pass alone; Holm makes it 0.06"
    )
    assert [r.p_holm for r in judged] == pytest.approx([1.0, 3e-4, 0.06])


def test_probability_of_improvement_by_hand():
    assert probability_of_improvement([0.3, 0.5], [0.4]) == pytest.approx(0.5), "one of two pairs"
    assert probability_of_improvement([0.4], [0.4, 0.2]) == pytest.approx(0.75), "a tie counts half"


def test_compute_to_target_never_interpolates_from_the_base_point():
    curve = [(0.0, 0.10), (2000.0, 0.14), (4000.0, 0.22), (6000.0, 0.30)]
    assert first_crossing(curve, 0.20) == 4000.0, "the first evaluation at or above the target"
    assert first_crossing(curve, 0.05) == 0.0, "already there at the base point"
    assert first_crossing(curve, 0.50) == math.inf, "never"
    crossing = compute_to_target([curve, [(0.0, 0.1), (2000.0, 0.25)], [(0.0, 0.1), (6000.0, 0.2)]], 0.20)
    assert crossing.per_seed == [4000.0, 2000.0, 6000.0] and crossing.median == 4000.0, f"{crossing}"
    assert 2000.0 <= crossing.low <= crossing.median <= crossing.high <= 6000.0, "an interval over the seeds"
    unreached = compute_to_target([curve, [(0.0, 0.1), (2000.0, 0.12)]], 0.20)
    assert unreached.reached == 1 and math.isnan(unreached.low), "a seed that never reached: no interval"
