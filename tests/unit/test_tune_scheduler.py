"""ResumableASHA: a killed sweep's ASHA rungs come back with the resumed experiment (Tune itself hands a
restored experiment the scheduler pickled at its start, with empty rungs)."""

from __future__ import annotations

from dataclasses import dataclass

from ray.tune.schedulers import TrialScheduler

from leapalign.distributed.tune_runner import ResumableASHA


@dataclass
class FakeTrial:
    trial_id: str  # all ASHA reads of a trial


def make(path) -> ResumableASHA:
    return ResumableASHA(
        path, time_attr="step", metric="score", mode="max", max_t=8, grace_period=2, reduction_factor=2
    )


def test_a_restarted_asha_stops_what_the_uninterrupted_one_stops(tmp_path):
    state = tmp_path / "asha_state.pkl"
    good, bad = FakeTrial("good"), FakeTrial("bad")

    # Uninterrupted: the good trial reaches rung 2 first, the bad one after it is cut.
    whole = make(tmp_path / "whole.pkl")
    for trial in (good, bad):
        whole.on_trial_add(None, trial)
    assert whole.on_trial_result(None, good, {"step": 2, "score": 1.0}) == TrialScheduler.CONTINUE
    assert whole.on_trial_result(None, bad, {"step": 2, "score": 0.1}) == TrialScheduler.STOP, (
        "uninterrupted ASHA stops the worse trial at the first rung"
    )

    # Killed after the good trial's rung result; the resumed experiment builds its scheduler afresh.
    before = make(state)
    for trial in (good, bad):
        before.on_trial_add(None, trial)
    before.on_trial_result(None, good, {"step": 2, "score": 1.0})
    assert state.is_file(), "the rungs are written after every result"
    after = make(state)  # what Tuner.restore hands back: a fresh instance, the same state path
    assert after.on_trial_result(None, bad, {"step": 2, "score": 0.1}) == TrialScheduler.STOP, (
        "the resumed ASHA remembers the good trial's rung value and stops the worse one"
    )
    fresh = make(tmp_path / "none.pkl")  # without saved rungs the same result would pass unchallenged
    fresh.on_trial_add(None, bad)
    assert fresh.on_trial_result(None, bad, {"step": 2, "score": 0.1}) == TrialScheduler.CONTINUE, (
        "the test needs a case that only the saved rungs decide"
    )


def test_a_trial_stopped_before_the_kill_stays_stopped_when_tune_resumes_it(tmp_path):
    """The driver may die between ASHA's STOP and Tune acting on it; Tune then resumes the trial from its
    checkpoint, and it reports the rung it was cut at (or a later step) again."""
    state = tmp_path / "asha_state.pkl"
    good, bad = FakeTrial("good"), FakeTrial("bad")
    before = make(state)
    for trial in (good, bad):
        before.on_trial_add(None, trial)
    before.on_trial_result(None, good, {"step": 2, "score": 1.0})
    assert before.on_trial_result(None, bad, {"step": 2, "score": 0.1}) == TrialScheduler.STOP, (
        "cut at rung 2"
    )
    after = make(state)
    for step in (2, 3, 4):
        assert after.on_trial_result(None, bad, {"step": step, "score": 5.0}) == TrialScheduler.STOP, (
            f"the resumed trial, cut before the kill, is stopped again at step {step}"
        )
    assert after.on_trial_result(None, good, {"step": 3, "score": 1.0}) == TrialScheduler.CONTINUE, (
        "a trial that was not cut goes on"
    )
